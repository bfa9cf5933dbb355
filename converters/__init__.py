"""Trained PyTorch checkpoints → verified GGUF files for llama.cpp."""

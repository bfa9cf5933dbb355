"""Trained PyTorch checkpoints → verified GGUF files for llama.cpp.

families/       which checkpoint formats are read (the registry) and how each maps onto an architecture
architectures/  one module per llama.cpp architecture: config, GGUF keys and tensors, reference forward
checkpoint.py   the interface between the two sides; weights.py reads the tensors lazily
tokenizer.py    tokenizer → GGUF metadata; gguf_writer.py, quants.py + quantize.py: the output file
convert.py, verify.py, inspect_gguf.py, from_gguf.py, gguf_eval.py: the commands' work (commands.py)

Nothing is imported here: `parrot-edge --help` imports families/ and quants.py, and must stay light.
"""

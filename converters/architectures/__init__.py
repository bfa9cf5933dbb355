"""The llama.cpp architectures the converter writes: one module each, named after `general.architecture`.

A module holds everything about its architecture together, so its parts cannot drift apart (as litgpt
keeps a model's config beside the model):
1. the config: the architecture's sizes in llama.cpp's terms, checked when built;
2. the GGUF side: `gguf_metadata(config)` (the `<arch>.*` keys) and `tensor_shapes(config)` (every
   tensor's GGUF name and torch-order shape, in writing order);
3. any weight permutation between the checkpoints' layout and what llama.cpp's graph expects;
4. the `Checkpoint` class (converters/checkpoint.py) that families hand their tensors to, by GGUF name;
5. the PyTorch reference forward: what the checkpoint computes, written out plainly, which
   verification compares llama.cpp against.

Families (converters/families/) import the module of the architecture they convert to; nothing imports
this package at start-up, so a module may import torch at the top. llama.py is the one to copy.
"""

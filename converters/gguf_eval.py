"""The llama.cpp side of verification: a GGUF's logits for given tokens, and its own tokenisation of text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.llamacpp import Batch, lib, load_model, recent_log


def gguf_logits(path: Path, token_lists: list[list[int]], threads: int | None = None) -> list[np.ndarray]:
    """Logits [len(tokens), n_vocab] (float32) of every position of every token list, each run from scratch."""
    llama = lib()
    model = load_model(path)
    longest = max(map(len, token_lists))
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = longest
    params.n_seq_max = 1
    # Verification measures the file, not attention shortcuts: an F16 KV cache and the CPU flash-attention
    # kernel (which rounds to F16) alone move logits by ~0.03 on a 135M model.
    params.type_k = params.type_v = llama.GGML_TYPE_F32
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    params.no_perf = True
    context = llama.llama_init_from_model(model, params)
    batch = Batch(longest)
    try:
        if not context:
            raise ParrotEdgeError(f"llama.cpp could not create a context for {path}: {recent_log()}")
        n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        results = []
        for tokens in token_lists:
            llama.llama_memory_clear(llama.llama_get_memory(context), True)
            batch.clear()
            batch.add(tokens, 0, 0, logits=True)
            if llama.llama_decode(context, batch.raw) != 0:
                raise ParrotEdgeError(f"llama.cpp failed to evaluate {path}: {recent_log()}")
            logits = np.ctypeslib.as_array(llama.llama_get_logits(context), shape=(len(tokens), n_vocab))
            results.append(logits.copy())
        return results
    finally:
        batch.free()
        if context:
            llama.llama_free(context)
        llama.llama_model_free(model)


def gguf_tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text, adding BOS/EOS as the GGUF says (special tokens not parsed)."""
    llama = lib()
    model = load_model(path, vocab_only=True)
    try:
        vocab = llama.llama_model_get_vocab(model)
        results = []
        for text in texts:
            data = text.encode()
            capacity = len(data) + 8
            buffer = (llama.llama_token * capacity)()
            count = llama.llama_tokenize(vocab, data, len(data), buffer, capacity, True, False)
            if count < 0:
                raise ParrotEdgeError(f"llama.cpp could not tokenise a text of {len(data)} bytes")
            results.append(list(buffer[:count]))
        return results
    finally:
        llama.llama_model_free(model)

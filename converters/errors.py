"""The converter's own error: input it cannot convert (checkpoint, config, tokenizer or options)."""

from __future__ import annotations

from parrot_edge.errors import ParrotEdgeError


class BadInput(ParrotEdgeError):
    """A checkpoint, config, tokenizer or option the converter refuses, with the reason (exit code 2).

    Exit codes of convert/verify: 1 environment (unwritable output, llama.cpp failure), 2 bad input,
    3 verification failed, 130 interrupted.
    """

    exit_code = 2

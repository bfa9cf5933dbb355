"""The reference forward as layers: what verification runs whole and calibration runs one layer at a time.

Every architecture's (or family's) forward is written as a `LayeredForward`: `embed` (token ids → the residual
stream), `block(i)` (one transformer layer), `final` (the last norm: the input of the output matrix) and the key
of the output matrix. `Reference.logits` chains them, which is what the forward always computed. Splitting it
this way lets calibration (converters/importance.py) load one layer's weights, push every calibration window
through that layer, and move on: memory stays near one layer plus the residual stream of the windows, whatever
the model's size.

A block reports the input of each group of its matrices to `observe(role, x)` just before multiplying, under
the roles below (a role is what the input is, not which tensor reads it: Q, K and V, or a fused QKV, all read
ATTN_IN). Which GGUF tensors read a role is calibration's business (importance.ROLE_TENSORS), so a forward
written in its checkpoint's own key names needs to know nothing about the GGUF side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

Weight = Callable[[str], torch.Tensor]  # a checkpoint key (or GGUF name) → its float32 value
Observe = Callable[[str, torch.Tensor], None]  # (role, the input [..., columns] of that role's matrices)

ATTN_IN = "attn_in"  # the normalised residual entering Q, K, V (or the fused QKV)
ATTN_OUT = "attn_out"  # the attention heads' output entering the output projection
FFN_IN = "ffn_in"  # the normalised residual entering the MLP's gate and up (or its first) matrix
FFN_HIDDEN = "ffn_hidden"  # the MLP's hidden activation entering its down (last) matrix
OUTPUT = "output"  # the final normalised residual entering the output (vocabulary) matrix


def ignore(role: str, x: torch.Tensor) -> None:
    """The observer of a plain forward: nothing is gathered."""


class LayeredForward(Protocol):
    n_layer: int
    output_key: str  # the output (vocabulary) matrix, [n_vocab, n_embd]

    def embed(self, weight: Weight, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, time] → the residual stream [batch, time, n_embd]."""
        ...

    def block(self, weight: Weight, i: int, x: torch.Tensor, observe: Observe) -> torch.Tensor:
        """Layer i on the residual stream; only layer i's weights are asked for."""
        ...

    def final(self, weight: Weight, x: torch.Tensor) -> torch.Tensor:
        """The residual stream → the input of the output matrix (the final norm)."""
        ...


@dataclass(frozen=True)
class Reference:
    """A checkpoint's own function: its layered forward and where its weights come from."""

    forward: LayeredForward
    weight: Weight

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, time, n_vocab] (float32) for token ids [batch, time]."""
        x = self.forward.embed(self.weight, tokens)
        for i in range(self.forward.n_layer):
            x = self.forward.block(self.weight, i, x, ignore)
        return self.forward.final(self.weight, x) @ self.weight(self.forward.output_key).T

"""Verification: does the GGUF, run by llama.cpp, compute what the checkpoint computes?

Both sides read the same token ids (from the source tokenizer) of a few bilingual texts; the PyTorch
reference forward gives the checkpoint's logits, llama.cpp the GGUF's. Reported: max |Δlogit| over every
position and vocabulary entry, top-1 agreement (same most likely next token), mean KL(reference ‖ GGUF)
per position, and the perplexity of each on the texts. Separately, llama.cpp must tokenise every text
exactly as the source tokenizer does, whatever the quant type.

F32/F16/BF16 files must be within TOLERANCES (else exit 3). Quantised files are reported, not judged:
their error is the price of the quant type, not a conversion bug. So are approximate conversions (the
checkpoint's `approximations`): their figures are the price of the closest llama.cpp architecture,
measured against the checkpoint's own reference forward; the tokenizer must still match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from parrot_edge.converters.checkpoint import Checkpoint
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.gguf_eval import gguf_logits, gguf_tokenize
from parrot_edge.converters.tokenizer import Vocabulary
from parrot_edge.errors import VerificationFailed
from parrot_edge.store.gguf_check import read_header
from parrot_edge.store.manifest import Verification

TEXTS = [
    "The library opens at eight in the morning. Students borrow books about rivers, volcanoes and the "
    "history of their region, and the teacher asks them to write a short summary of what they learned.",
    "La maestra explicó por qué el año tiene 365 días: la Tierra tarda ese tiempo en dar una vuelta "
    "completa alrededor del Sol. ¿Cuántas horas tiene un día? Veinticuatro, respondió Sofía con alegría.",
    "Order #4721 shipped on 2024-03-15 at 09:41; total $1,284.50 for 12 items (3.5 kg). "
    "Call +34 612 345 678 or write to info@escuela.example before 31/12.",
    "¡Feliz cumpleaños! 🎂🎉 We planted 15 trees 🌳 today and the kids loved it 😊. Mañana, más. 👍",
    "def mean(values):\n    \"\"\"Average of a list; 0 for an empty one.\"\"\"\n"
    "    if not values:\n        return 0.0\n    return sum(values) / len(values)\n\nprint(mean([3, 5, 8]))  # 5.333\n",
]
MAX_TOKENS_PER_TEXT = 256


@dataclass(frozen=True)
class Tolerance:
    max_abs_dlogit: float
    mean_kl: float
    top1_agreement: float


# What a faithful conversion stays within. F32 differs from PyTorch only by summation order; F16/BF16
# round every weight (and llama.cpp rounds activations to F16 for F16 matmuls). Measured on SmolLM2-135M
# (30 layers): F32 9.6e-5 / 1.5e-11, F16 0.087 / 4.8e-6, BF16 0.54 / 2.2e-4 (max |Δlogit| / mean KL);
# a wrong permutation or another checkpoint gives KL > 0.1.
TOLERANCES = {
    "F32": Tolerance(max_abs_dlogit=0.01, mean_kl=1e-6, top1_agreement=0.99),
    "F16": Tolerance(max_abs_dlogit=0.5, mean_kl=1e-4, top1_agreement=0.98),
    "BF16": Tolerance(max_abs_dlogit=2.0, mean_kl=2e-3, top1_agreement=0.95),
}


@dataclass
class Report:
    file_type: str  # F32, F16, BF16, Q4_K_M, …
    tokenizer_matches: int
    tokenizer_mismatch: str | None  # first difference, for the message
    figures: Verification
    tolerance: Tolerance | None
    approximations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        f, tol = self.figures, self.tolerance
        limits = ("",) * 3
        if tol:
            limits = (f"≤ {tol.max_abs_dlogit:g}", f"≥ {tol.top1_agreement:.0%}", f"≤ {tol.mean_kl:g}")
        max_limit, top1_limit, kl_limit = (f"  (tolerance {limit})" if limit else "" for limit in limits)
        lines = [
            f"verification: {f.texts} texts, {f.tokens} tokens, GGUF type {self.file_type}",
            f"  tokenizer        {self.tokenizer_matches}/{f.texts} texts tokenised identically by llama.cpp",
            f"  max |Δlogit|     {f.max_abs_dlogit:.4g}{max_limit}",
            f"  top-1 agreement  {f.top1_agreement:.2%}{top1_limit}",
            f"  mean KL          {f.mean_kl:.3g}{kl_limit}",
            f"  perplexity       {f.perplexity_reference:.6g} (PyTorch checkpoint) vs "
            f"{f.perplexity_gguf:.6g} (llama.cpp GGUF)",
        ]
        if self.tokenizer_mismatch:
            lines.append(f"  tokenizer differs: {self.tokenizer_mismatch}")
        if self.approximations:
            lines.append(f"  APPROXIMATE conversion ({len(self.approximations)} approximation(s)): the figures are "
                         "what they cost; reported, not judged")
        elif tol is None:
            lines.append(f"  {self.file_type} is quantised: figures are reported, not judged")
        lines.append("PASSED" if f.passed else "FAILED: the GGUF does not compute what the checkpoint computes")
        return lines


def read_texts(path: Path | None) -> list[str]:
    """Built-in texts, or a UTF-8 file's paragraphs (separated by blank lines)."""
    if path is None:
        return TEXTS
    try:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read verification texts from {path}: {exc}") from None
    if not paragraphs:
        raise BadInput(f"{path} holds no text")
    return paragraphs


def gguf_file_type(path: Path) -> str:
    metadata = read_header(path).metadata
    file_type = gguf.LlamaFileType(metadata.get("general.file_type", gguf.LlamaFileType.GUESSED))
    return {"ALL_F32": "F32"}.get(file_type.name, file_type.name.removeprefix("MOSTLY_"))


def verify(checkpoint: Checkpoint, vocabulary: Vocabulary, path: Path, texts: list[str],
           threads: int | None = None) -> Report:
    file_type = gguf_file_type(path)
    source_ids = [vocabulary.encode(text) for text in texts]
    llama_ids = gguf_tokenize(path, texts)
    matches = sum(a == b for a, b in zip(source_ids, llama_ids, strict=True))
    mismatch = next((_first_difference(text, a, b) for text, a, b in zip(texts, source_ids, llama_ids, strict=True)
                     if a != b), None)

    limit = min(MAX_TOKENS_PER_TEXT, checkpoint.context_length)
    token_lists = [ids[:limit] for ids in source_ids if len(ids) >= 2]
    if not token_lists:
        raise BadInput("the verification texts are too short (need at least 2 tokens)")
    if threads:
        torch.set_num_threads(threads)
    reference = _reference_logits(checkpoint, token_lists)
    llama = gguf_logits(path, token_lists, threads)
    if llama[0].shape[-1] != checkpoint.n_vocab:
        raise VerificationFailed(f"{path} has {llama[0].shape[-1]} tokens but the checkpoint's embedding has "
                                 f"{checkpoint.n_vocab} rows: it was not converted from this checkpoint")
    figures = compare(reference, llama, token_lists)
    tolerance = None if checkpoint.approximations else TOLERANCES.get(file_type)
    within = tolerance is None or (figures["max_abs_dlogit"] <= tolerance.max_abs_dlogit
                                   and figures["mean_kl"] <= tolerance.mean_kl
                                   and figures["top1_agreement"] >= tolerance.top1_agreement)
    verification = Verification(texts=len(token_lists), tokens=sum(map(len, token_lists)),
                                passed=within and matches == len(texts), **figures)
    return Report(file_type, matches, mismatch, verification, tolerance, list(checkpoint.approximations))


def _reference_logits(checkpoint: Checkpoint, token_lists: list[list[int]]) -> list[np.ndarray]:
    # One batch, right-padded: causal attention never lets a position see the padding after it.
    longest = max(map(len, token_lists))
    batch = torch.zeros(len(token_lists), longest, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        batch[row, : len(ids)] = torch.tensor(ids)
    logits = checkpoint.reference_logits(batch)
    return [logits[row, : len(ids)].numpy() for row, ids in enumerate(token_lists)]


def compare(reference: list[np.ndarray], llama: list[np.ndarray], token_lists: list[list[int]]) -> dict[str, float]:
    """The figures over all texts (computed text by text in float64: a vocabulary-wide row is large)."""
    max_abs, agree, kl_sum, nll_ref, nll_gguf, positions, predicted = 0.0, 0, 0.0, 0.0, 0.0, 0, 0
    for ref, other, ids in zip(reference, llama, token_lists, strict=True):
        ref, other = ref.astype(np.float64), other.astype(np.float64)
        log_p, log_q = log_softmax(ref), log_softmax(other)
        max_abs = max(max_abs, float(np.abs(ref - other).max()))
        agree += int((ref.argmax(-1) == other.argmax(-1)).sum())
        kl_sum += float((np.exp(log_p) * (log_p - log_q)).sum())
        # position t predicts token t+1
        rows, targets = np.arange(len(ids) - 1), np.asarray(ids[1:])
        nll_ref -= float(log_p[rows, targets].sum())
        nll_gguf -= float(log_q[rows, targets].sum())
        positions += len(ids)
        predicted += len(ids) - 1
    return {
        "max_abs_dlogit": max_abs,
        "top1_agreement": agree / positions,
        "mean_kl": max(kl_sum / positions, 0.0),
        "perplexity_reference": float(np.exp(nll_ref / predicted)),
        "perplexity_gguf": float(np.exp(nll_gguf / predicted)),
    }


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _first_difference(text: str, source: list[int], llama: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(source, llama, strict=False)) if a != b), min(len(source), len(llama)))
    return (f"in {text[:40]!r}…, token {at}: source tokenizer {source[at:at + 4]} vs llama.cpp {llama[at:at + 4]} "
            f"({len(source)} vs {len(llama)} tokens)")

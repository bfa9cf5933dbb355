"""Why batching and prefix reuse change nothing: under the engine's context parameters, llama.cpp computes a
row's logits (and so its keys and values) bit for bit the same whatever batch it is evaluated in, as long as
no micro-batch holds 64 rows of one sequence (the engine's steps never do) or is a lone row over more than
256 cells, which the engine avoids (`lone_long_rows`).

Each case evaluates the same 300-token sequence (sequence 0) in a different way, then reads the logits of
its last token; every case must equal the reference bit for bit."""

from __future__ import annotations

import contextlib
import platform

import gguf
import numpy as np
import pytest

from parrot_edge import llamacpp
from parrot_edge.engine.context import GEMV_UBATCH_ROWS, UBATCH_ROWS, context_params
from parrot_edge.engine.exactness import SEQ_ROWS, SPLIT_KV_CELLS, lone_long_rows
from parrot_edge.engine.kv_cache import GGML_BF16, GGML_F16, GGML_Q8_0, KV_TYPES

LENGTH = 300
SLOTS = 4


# The default model (Q4_1), and the same weights as Q4_0 and as Q4_K_M (K-quant tensors: the repacked and
# tiled kernels the engine keeps off, see parrot_edge.llamacpp), over an f16 KV cache (the one with the split
# and tiled attention kernels); the default model over the default cache (f16 keys, bf16 values) and q8_0;
# and Q4_K_M repacked in micro-batches of 3 rows, as a server of one slot runs it (context.GEMV_UBATCH_ROWS).
GEMV = "q4_k_m repacked, micro-batches of 3, f16-bf16 KV cache"
MODELS = ["default", "q4_0", "q4_k_m", "default, f16-bf16 KV cache", "default, q8_0 KV cache", GEMV]


def model_path(default_gguf, requantized_gguf, name: str):
    stem = name.split(",")[0].split()[0]
    return default_gguf if stem == "default" else requantized_gguf(stem)


@contextlib.contextmanager
def opened(path, repack: bool, kv_type: str, ubatch_rows: int = UBATCH_ROWS):
    """A llama.cpp context under the engine's parameters: (llama, ctx, batch, n_vocab, ubatch rows)."""
    llama = llamacpp.lib()
    model = llamacpp.load_model(path, repack=repack)
    params = context_params(llama, slots=SLOTS, ctx_per_slot=1024, prefill_chunk=LENGTH, kv_type=kv_type,
                            ubatch_rows=ubatch_rows)
    ctx = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(512, 0, 1)
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    try:
        yield llama, ctx, batch, n_vocab, params.n_ubatch
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
        llama.llama_model_free(model)


def kv_type(model: str) -> str:
    last = model.split(", ")[-1]
    return last.removesuffix(" KV cache") if last.endswith(" KV cache") else "f16"


@pytest.fixture(scope="module", params=MODELS)
def llama_context(request, default_gguf, requantized_gguf):
    path = model_path(default_gguf, requantized_gguf, request.param)
    gemv = request.param == GEMV
    if gemv and llamacpp.repack_policy(path) != "padded":
        pytest.skip("Q4_K weights are repacked into gemm and gemv kernels only on x86")
    with opened(path, repack=gemv or llamacpp.repack_policy(path) == "exact", kv_type=kv_type(request.param),
                ubatch_rows=GEMV_UBATCH_ROWS if gemv else UBATCH_ROWS) as context:
        yield context


SEQUENCES = [list(np.random.default_rng(seq).integers(100, 20_000, LENGTH + 64)) for seq in range(SLOTS)]


def last_logits(llama_context, steps: list[dict[int, int]], second_row_when_lone: bool = False) -> np.ndarray:
    """Evaluate `steps` (each: sequence → rows it adds this step) from an empty cache; sequence 0 must reach
    LENGTH tokens. With `second_row_when_lone`, a lone long row also re-evaluates its sequence's previous
    token, as the engine does."""
    llama, ctx, batch, n_vocab, ubatch_rows = llama_context
    memory = llama.llama_get_memory(ctx)
    llama.llama_memory_clear(memory, True)
    held = dict.fromkeys(range(SLOTS), 0)
    index_of_last = None
    for step in steps:
        starts = dict(held)
        if second_row_when_lone:
            for seq in lone_long_rows({seq: (held[seq], rows) for seq, rows in step.items()}, ubatch_rows):
                assert llama.llama_memory_seq_rm(memory, seq, held[seq] - 1, -1)
                starts[seq] -= 1
        n = 0
        for seq in sorted(step):
            for pos in range(starts[seq], held[seq] + step[seq]):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = int(SEQUENCES[seq][pos]), pos, 1, 0
                batch.seq_id[n][0] = seq
                n += 1
            held[seq] += step[seq]
            if seq == 0 and held[0] == LENGTH:
                batch.logits[n - 1] = 1
                index_of_last = n - 1
        batch.n_tokens = n
        assert llama.llama_decode(ctx, batch) == 0
    assert held[0] == LENGTH and index_of_last is not None
    return np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, index_of_last), shape=(n_vocab,)).copy()


def pieces(size: int, total: int = LENGTH, **others: int) -> list[dict[int, int]]:
    steps = []
    done = 0
    while done < total:
        steps.append({0: min(size, total - done)} | {int(seq[1:]): rows for seq, rows in others.items()})
        done += steps[-1][0]
    return steps


CASES = {
    "pieces of 63, the most the engine puts in a step": pieces(SEQ_ROWS),
    "pieces of 7": pieces(7),
    "pieces of 62 and 1": [{0: 62}, {0: 1}] * 4 + [{0: LENGTH - 4 * 63}],
    "decoded one token at a time after 20": [{0: 20}] + [{0: 1}] * (LENGTH - 20),
    "pieces of 16 beside three decoding students": pieces(16, s1=1, s2=1, s3=1),
    "decoded beside a neighbour and a student across a gap": [{0: 40}] + [{0: 1, 1: 1, 3: 1}] * (LENGTH - 40),
    "pieces of 2 beside a student across a gap": pieces(2, s2=1),
}


@pytest.mark.parametrize("case", CASES)
def test_a_rows_logits_do_not_depend_on_its_batch(llama_context, request, case):
    if request.node.callspec.params["llama_context"] == GEMV and any(len(step) > 1 for step in CASES[case]):
        pytest.skip("micro-batches of 3 rows are what a server of one slot runs: it has no company")
    reference = last_logits(llama_context, pieces(32))
    assert np.array_equal(last_logits(llama_context, CASES[case], second_row_when_lone=True), reference)


def test_lone_long_rows_are_the_ones_the_engine_must_pair(llama_context, request):
    """The engine's pairing is what keeps a lone student's long answer exact over an f16 KV cache; over the
    default or a q8_0 one, which the split kernel never reads, it pairs nothing and relies on lone rows being
    exact."""
    reference = last_logits(llama_context, pieces(32))
    lone = [{0: 20}] + [{0: 1}] * (LENGTH - 20)
    assert np.array_equal(last_logits(llama_context, lone, second_row_when_lone=True), reference)
    alone_exact = np.array_equal(last_logits(llama_context, lone), reference)
    kv = kv_type(request.node.callspec.params["llama_context"])
    if not KV_TYPES[kv].split_kernel_possible:
        assert alone_exact, f"a lone row over a {kv} cache rounded differently: the engine must pair it"
    elif alone_exact:
        pytest.skip("this llama.cpp build rounds lone rows like the others: the pairing is harmless but unneeded")


def test_64_rows_of_one_sequence_are_why_a_step_holds_at_most_63(llama_context, request):
    """Over an f16 cache, the tiled kernel's; over the others, which it never reads, 64 rows are exact too."""
    reference = last_logits(llama_context, pieces(32))
    assert np.array_equal(last_logits(llama_context, pieces(SEQ_ROWS)), reference)
    exact_at_64 = np.array_equal(last_logits(llama_context, pieces(SEQ_ROWS + 1)), reference)
    if not KV_TYPES[kv_type(request.node.callspec.params["llama_context"])].split_kernel_possible:
        assert exact_at_64, "64 rows rounded differently over a cache the tiled kernel cannot read"
    elif exact_at_64:
        pytest.skip("this llama.cpp build rounds 64-row pieces like the others: the limit is harmless but unneeded")


def test_the_kv_cache_types_are_ggml_s():
    llama = llamacpp.lib()
    assert (GGML_F16, GGML_Q8_0) == (llama.GGML_TYPE_F16, llama.GGML_TYPE_Q8_0)
    types = gguf.GGMLQuantizationType
    assert (types.F16, types.Q8_0, types.BF16) == (GGML_F16, GGML_Q8_0, GGML_BF16)


def test_repacked_k_quants_are_why_the_engine_pads_their_steps(default_gguf, requantized_gguf):
    k_quants = requantized_gguf("q4_k_m")
    assert llamacpp.repack_policy(k_quants) == ("padded" if platform.machine() == "x86_64" else "off")
    assert llamacpp.repack_policy(k_quants, allow=False) == "off"
    assert llamacpp.repack_policy(default_gguf) == llamacpp.repack_policy(requantized_gguf("q4_0")) == "exact"
    with opened(k_quants, repack=True, kv_type="f16") as repacked:
        if np.array_equal(last_logits(repacked, pieces(7)), last_logits(repacked, pieces(32))):
            pytest.skip("this llama.cpp build's repacked K-quant kernels are exact: they could stay on")


def test_a_build_with_amx_kernels_loads_nothing_repacked(requantized_gguf, monkeypatch):
    """llama.cpp's AMX kernels crash on quantised models; the development build leaves them out, and a build
    that has them (e.g. an older cached wheel) gets no extra buffer types at all."""
    info = llamacpp.lib().llama_print_system_info().decode()
    if "AMX_INT8 = 1" in info:
        pytest.fail("this llama-cpp-python was compiled with AMX kernels: rebuild it as the Makefile does")
    monkeypatch.setattr(llamacpp, "amx_build", lambda: True)
    assert llamacpp.repack_policy(requantized_gguf("q4_k_m")) == "off"


def test_lone_long_rows_follows_llama_cpp_micro_batches():
    long, short, ubatch = SPLIT_KV_CELLS, 10, 256
    assert lone_long_rows({0: (long, 1)}, ubatch) == [0]  # one student alone, deep into a conversation
    assert lone_long_rows({0: (short, 1)}, ubatch) == []  # ... early in it: few cells, the ordinary kernel
    assert lone_long_rows({0: (long, 1), 1: (long, 1)}, ubatch) == []  # neighbours share a micro-batch
    assert lone_long_rows({0: (long, 1), 2: (long, 1)}, ubatch) == [0, 2]  # a gap splits them
    assert lone_long_rows({0: (long, 1), 1: (short, 2)}, ubatch) == []  # 0 and 1 together, then 1's second row
    assert lone_long_rows({0: (short, 1), 1: (long, 2)}, ubatch) == [1]  # ... long: alone over many cells
    assert lone_long_rows({0: (long, 2)}, ubatch) == []
    # Neighbours share micro-batches of equal rows each, as many as the micro-batch holds: 8 × 7 = 56 of 63,
    # then 8 × 1, leaving sequence 0 a lone last row.
    assert lone_long_rows({seq: (long, 9 if seq == 0 else 8) for seq in range(8)}, 63) == [0]
    assert lone_long_rows({seq: (long, 9 if seq == 0 else 8) for seq in range(8)}, ubatch) == [0]
    assert lone_long_rows({seq: (long, 8) for seq in range(8)}, 63) == []
    # A piece longer than a micro-batch leaves a remainder of one row.
    assert lone_long_rows({0: (long, 64)}, 63) == [0]
    assert lone_long_rows({0: (long, 65)}, 63) == []

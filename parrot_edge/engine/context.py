"""The llama.cpp side of the engine: the model, its vocabulary, and the one context every student shares.

The context holds `slots` sequences, each with its own `ctx_per_slot` KV cells (a stream per sequence:
attention never scans other students' tokens), and runs flash attention, which makes batching exact (see
exactness.py) and is faster. The vocabulary is read-only, so tokenising is safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from parrot_edge import llamacpp
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from parrot_edge.engine.padding import ROW_GROUP
from parrot_edge.errors import ParrotEdgeError

log = logging.getLogger(__name__)

# The engine's llama.cpp micro-batch, at most (here, not in the memory plan, which reads it without llama.cpp).
# A burst of short prompts fits in one; per row, 256-row micro-batches measured ~4% faster than 63-row ones.
UBATCH_ROWS = 256
# One slot over repacked Q4_K (or Q2_K) weights: ggml-cpu sends a micro-batch's rows in groups of 4 through the
# gemm kernel and the rest through the gemv kernel (padding.py), so micro-batches of 3 rows send every row, of
# a prompt and of an answer alike, through gemv, the kernel raw llama.cpp decodes one student with. Measured on
# ParrotAI-1.1B's shape as Q4_K_M (2-core AVX-512 EPYC, a one-slot context, a 48-row prompt, runs alternated):
# a lone row 21.8-23.5 ms against 27.7-29.5 as stored (the exact alternative), a prompt row 15.4-16.5 ms
# against 16.2-17.5 as stored; a prompt's last logits equal those of its tokens evaluated one by one (with
# 256-row micro-batches they differ).
GEMV_UBATCH_ROWS = ROW_GROUP - 1
# A server of this many slots or more over padded repacked weights forces ggml's tiled matmul for the weights it
# does not repack (llamacpp.force_tiled_matmul; in a Q4_K_M file the Q6_K ones). Measured on ParrotAI-1.1B's shape
# as Q4_K_M (2-core AVX-512 EPYC, `bench classroom --model-shape tiny_LLaMA_1b --requests 2 --tokens 64`, two
# runs alternated): 16 students 103.3 and 109.5 tok/s forced, 89.0 and 88.9 off (0.95x and 0.98x llama-server
# in the same runs, against 0.86x and 0.92x); 8 students 72.2 and 80.7 forced, 73.5 and 68.3 off (1.03x and
# 0.98x llama-server, against 1.03x and 1.05x): no gain there, and a step of 4 rows (a student alone) costs
# 71-81 ms forced against 50-67 off, so smaller classes keep it off.
TILED_MIN_SLOTS = 16
MAX_SLOTS = 64  # every slot's next token fits in one micro-batch, twice over
# Rows of a step asking for logits, at most, per slot: a padded step's four (padding.py), else a row and a guess.
# llama.cpp sizes its logits buffers by it (n_outputs_max; by default a whole batch: for ParrotAI-1.1B's 32,000
# tokens, 256 rows took 33 MB in the compute buffer and as much again in the output buffer).
OUTPUTS_PER_SLOT = 4
DECODE_OVER_OUTPUTS = -100  # decode's code for a batch asking more logits than that (llama.cpp would abort)


@dataclass(frozen=True)
class ModelFacts:
    """What the HTTP side needs to know of the served model."""

    name: str
    path: Path
    n_ctx_train: int
    n_vocab: int
    chat_template: str | None
    bos_text: str
    eos_text: str
    add_bos: bool
    bos_id: int


def context_params(llama, *, slots: int, ctx_per_slot: int, prefill_chunk: int, threads: int | None = None,
                   kv_type: str = DEFAULT_KV_TYPE, ubatch_rows: int = UBATCH_ROWS):
    """The llama_context_params the engine runs with (the memory plan's test measures exactly these)."""
    if slots > MAX_SLOTS:
        raise ParrotEdgeError(f"at most {MAX_SLOTS} slots")
    params = llama.llama_context_default_params()
    params.n_seq_max = slots
    params.n_ctx = slots * ctx_per_slot
    # A step's most: two rows per slot plus a prompt chunk, or (padded steps) four rows per slot.
    params.n_batch = max(prefill_chunk + 2 * slots, 4 * slots)
    params.n_ubatch = min(ubatch_rows, params.n_batch)
    params.n_outputs_max = OUTPUTS_PER_SLOT * slots
    params.kv_unified = False  # each slot owns its cells
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.no_perf = True
    params.type_k, params.type_v = KV_TYPES[kv_type].keys, KV_TYPES[kv_type].values  # see kv_cache.py
    # Default: one thread per CPU this process may use (llama.cpp's own default of 4 oversubscribes 2 cores).
    params.n_threads = params.n_threads_batch = threads or len(os.sched_getaffinity(0))
    return params


def forces_tiled(repack: str, slots: int) -> bool:
    """Whether a context of this repack policy and slots forces the tiled matmul (see TILED_MIN_SLOTS)."""
    return repack == "padded" and slots >= TILED_MIN_SLOTS


class LlamaContext:
    def __init__(self, model_path: Path, *, slots: int, ctx_per_slot: int, prefill_chunk: int,
                 threads: int | None = None, kv_type: str = DEFAULT_KV_TYPE, repack: bool = True,
                 tiled: bool = False):
        self.lib = llama = llamacpp.lib()
        policy = llamacpp.repack_policy(model_path, allow=repack)  # "exact", "padded" or "off"
        # Padded steps pay only where a step holds several students; with one slot, three of every four rows
        # would be thrown away. A server of one slot has no company to be exact with, only its own history (a
        # cached conversation must answer what it answers cold), so it sends every row through the repacked
        # gemv kernel instead: micro-batches of GEMV_UBATCH_ROWS (see the constant).
        self.repack = "gemv" if policy == "padded" and slots == 1 else policy
        if tiled and forces_tiled(self.repack, slots):
            llamacpp.force_tiled_matmul()
        self.tiled = llamacpp.tiled_matmul_forced()  # the process's, whoever forced it
        self.model = llamacpp.load_model(model_path, repack=self.repack != "off")
        self.vocab = llama.llama_model_get_vocab(self.model)
        params = context_params(llama, slots=slots, ctx_per_slot=ctx_per_slot, prefill_chunk=prefill_chunk,
                                threads=threads, kv_type=kv_type,
                                ubatch_rows=GEMV_UBATCH_ROWS if self.repack == "gemv" else UBATCH_ROWS)
        self.ctx = llama.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise ParrotEdgeError(f"llama.cpp could not create a context of {slots}×{ctx_per_slot} tokens: "
                                  f"{llamacpp.recent_log() or 'no reason given'}")
        self.memory = llama.llama_get_memory(self.ctx)
        self.ubatch_rows = params.n_ubatch
        self.outputs_max = params.n_outputs_max
        self.ctx_per_slot = llama.llama_n_ctx_seq(self.ctx)
        self.batch = llamacpp.Batch(params.n_batch)
        self._piece = ctypes.create_string_buffer(256)

    def facts(self, name: str, path: Path) -> ModelFacts:
        llama = self.lib
        template = llama.llama_model_chat_template(self.model, None)
        bos = llama.llama_vocab_bos(self.vocab)
        eos = llama.llama_vocab_eos(self.vocab)
        return ModelFacts(
            name=name, path=path, n_ctx_train=llama.llama_model_n_ctx_train(self.model),
            n_vocab=llama.llama_vocab_n_tokens(self.vocab),
            chat_template=template.decode("utf-8") if template else None,
            bos_text=self.token_text(bos) if bos >= 0 else "", eos_text=self.token_text(eos) if eos >= 0 else "",
            add_bos=bool(llama.llama_vocab_get_add_bos(self.vocab)), bos_id=bos,
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (ctypes.c_int32 * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return buf[:n]
            capacity = -n

    def token_text(self, token: int) -> str:
        """A token as text, special tokens rendered (for the chat template's bos/eos)."""
        return self._token_bytes(token, special=True).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes a generated token adds to the answer (special tokens render as nothing)."""
        return self._token_bytes(token, special=False)

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:  # longer than the buffer: llama.cpp says how long
            self._piece = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:max(n, 0)]

    def control_token_texts(self) -> list[str]:
        """The text of every control (and unknown) token: what llama.cpp turns into such a token when it parses
        special tokens (llama-vocab.cpp, tokenizer_st_partition). Read once per model, ~50 ms per 50k tokens."""
        lib, marks = self.lib, self.lib.LLAMA_TOKEN_ATTR_CONTROL | self.lib.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = (ctypes.string_at(lib.llama_vocab_get_text(self.vocab, token)).decode("utf-8", errors="replace")
                 for token in range(lib.llama_vocab_n_tokens(self.vocab))
                 if lib.llama_vocab_get_attr(self.vocab, token) & marks)
        return [text for text in texts if text]

    def ends_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def decode(self) -> int:
        """llama_decode of the batch: 0 on success."""
        if self.batch.outputs > self.outputs_max:  # never, by the steps' shapes; llama.cpp would abort
            log.error("a step asked for the logits of %d rows, more than the %d the context holds",
                      self.batch.outputs, self.outputs_max)
            return DECODE_OVER_OUTPUTS
        return self.lib.llama_decode(self.ctx, self.batch.raw)

    def sample(self, sampler, index: int) -> int:
        return self.lib.llama_sampler_sample(sampler, self.ctx, index)

    def close(self) -> None:
        self.batch.free()
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

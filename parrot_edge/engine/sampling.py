"""Sampling settings, and the llama.cpp native sampler chain built from them.

The chain runs in C over the logits llama.cpp already holds, so no token's full logit vector is ever
copied into Python. Order follows llama.cpp's own server: penalties, top-k, top-p, min-p, temperature,
then a seeded draw (or greedy when the temperature is 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PENALTY_LAST_N = 64  # how many recent tokens the repeat/frequency/presence penalties look at


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def build_chain(llama, vocab, params: SamplingParams):
    """A new llama_sampler chain for one sequence; free it with `llama.llama_sampler_free`."""
    chain_params = llama.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama.llama_sampler_chain_init(chain_params)
    add = llama.llama_sampler_chain_add
    if params.has_penalties:
        add(chain, llama.llama_sampler_init_penalties(llama.llama_vocab_n_tokens(vocab), PENALTY_LAST_N,
                                                      params.repeat_penalty, params.frequency_penalty,
                                                      params.presence_penalty))
    if params.temperature <= 0:
        add(chain, llama.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(chain, llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain

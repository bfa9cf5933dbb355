"""Sampling settings, and the llama.cpp native sampler chain built from them.

The chain runs in C over the logits llama.cpp already holds, so no token's full logit vector is ever
copied into Python. Order follows llama.cpp's own server: penalties, logit bias, grammar, top-k, top-p, min-p,
temperature, then a seeded draw (or greedy when the temperature is 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from parrot_edge.errors import ParrotEdgeError

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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -inf forbids it
    grammar: str | None = None  # GBNF the answer must follow (root rule "root"), e.g. from response_format

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def build_chain(llama, vocab, params: SamplingParams, prompt: list[int] = ()):
    """A new llama_sampler chain for one sequence; free it with `llama.llama_sampler_free`. Penalties look at
    the conversation so far (`prompt`), as llama.cpp's server does; a grammar starts at the answer."""
    grammar = grammar_sampler(llama, vocab, params.grammar) if params.grammar is not None else None  # may fail
    chain_params = llama.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama.llama_sampler_chain_init(chain_params)
    add = llama.llama_sampler_chain_add
    if params.has_penalties:
        penalties = llama.llama_sampler_init_penalties(llama.llama_vocab_n_tokens(vocab), PENALTY_LAST_N,
                                                       params.repeat_penalty, params.frequency_penalty,
                                                       params.presence_penalty)
        for token in prompt[-PENALTY_LAST_N:]:
            llama.llama_sampler_accept(penalties, token)
        add(chain, penalties)
    if params.logit_bias:
        biases = (llama.llama_logit_bias * len(params.logit_bias))(
            *(llama.llama_logit_bias(token, bias) for token, bias in params.logit_bias))
        add(chain, llama.llama_sampler_init_logit_bias(llama.llama_vocab_n_tokens(vocab), len(biases), biases))
    if grammar is not None:
        add(chain, grammar)
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


def grammar_sampler(llama, vocab, grammar: str):
    """llama.cpp's grammar sampler for a GBNF text; a ParrotEdgeError naming the problem if it does not parse."""
    sampler = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        from parrot_edge.llamacpp import recent_log

        raise ParrotEdgeError(f"the grammar does not parse: {recent_log() or 'no reason given'}")
    return sampler

"""The converter's PyTorch reference forward against independent implementations (no llama.cpp here).

The lit-gpt families have no implementation at run time but this one, so it is proven against
transformers' LlamaForCausalLM and the litgpt package's GPT: GQA, two head sizes, a head size that is not
n_embd / n_head, tied embeddings, linear RoPE scaling, and the grouped TinyLlama layout built by the test.
"""

from __future__ import annotations

import pytest
import torch
from converter_fixtures import (
    hf_llama,
    hf_logits,
    lit_config,
    lit_logits,
    litgpt_checkpoint,
    tinyllama_checkpoint,
)

from parrot_edge.converters.architectures.llama import interleaved_to_rotate_half, rotate_half_to_interleaved
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import open_checkpoint

TOKENS = [[1, 17, 250, 3, 99, 42, 7, 300, 12, 5, 480, 64, 2, 77, 150, 9]]


def reference(checkpoint) -> torch.Tensor:
    return checkpoint.reference_logits(torch.tensor(TOKENS))[0]


@pytest.mark.parametrize("shape", [
    dict(heads=4, kv_heads=2),  # head size 64, GQA
    dict(heads=8, kv_heads=2, ff=768, rope_scaling={"rope_type": "linear", "factor": 2.0}),  # head size 32
    dict(heads=4, kv_heads=1, head_dim=48),  # head size ≠ n_embd / n_head, MQA
    dict(heads=4, kv_heads=4, tied=True),  # MHA, tied embeddings
], ids=["gqa-hd64", "gqa-hd32-linear-rope", "mqa-hd48", "mha-tied"])
def test_reference_matches_transformers(tmp_path, shape):
    model = hf_llama(tmp_path, vocab_size=500, **shape)
    ours = reference(open_checkpoint(tmp_path))
    theirs = hf_logits(model, TOKENS[0])
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_reference_matches_transformers_on_bf16_shards(tmp_path):
    model = hf_llama(tmp_path, vocab_size=500, dtype=torch.bfloat16, shard_size="1MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = reference(open_checkpoint(tmp_path))
    assert torch.allclose(ours, hf_logits(model, TOKENS[0]), atol=1e-4, rtol=1e-4)


def test_reference_matches_litgpt(tmp_path):
    config = lit_config(500, n_head=8, n_query_groups=2)
    model = litgpt_checkpoint(tmp_path, config)
    ours = reference(open_checkpoint(tmp_path))
    assert torch.allclose(ours, lit_logits(model, TOKENS[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_head,n_query_groups,condense,prefix", [(8, 2, 4, ""), (4, 1, 1, "module._orig_mod.")],
                         ids=["gqa-rope-x4", "mqa-wrapped-keys"])
def test_reference_matches_litgpt_on_tinyllama_layout(tmp_path, n_head, n_query_groups, condense, prefix):
    config = lit_config(500, n_head=n_head, n_query_groups=n_query_groups, condense_ratio=condense)
    model = tinyllama_checkpoint(tmp_path, config, prefix=prefix)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.source.family == "tinyllama"
    assert torch.allclose(reference(checkpoint), lit_logits(model, TOKENS[0]), atol=1e-4, rtol=1e-4)


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE as llama.cpp's `llama` applies it: pairs (2i, 2i+1), written independently of the converter."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    pairs = x.reshape(*x.shape[:-1], half, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()), -1)
    return rotated.reshape(x.shape)


def _rope_rotate_half(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    half = x.shape[-1] // 2
    angles = positions[:, None] * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def test_permutation_turns_rotate_half_scores_into_interleaved_scores():
    torch.manual_seed(0)
    n_heads, head_dim, n_embd, length = 2, 16, 32, 7
    w_q, w_k = torch.randn(n_heads * head_dim, n_embd, dtype=torch.float64), torch.randn(n_heads * head_dim, n_embd,
                                                                                         dtype=torch.float64)
    x, positions = torch.randn(length, n_embd, dtype=torch.float64), torch.arange(length, dtype=torch.float64)

    def scores(rope, wq, wk):
        q = (x @ wq.T).view(length, n_heads, head_dim).transpose(0, 1)
        k = (x @ wk.T).view(length, n_heads, head_dim).transpose(0, 1)
        return rope(q, positions) @ rope(k, positions).transpose(-1, -2)

    expected = scores(_rope_rotate_half, w_q, w_k)
    permuted = scores(_rope_interleaved, rotate_half_to_interleaved(w_q, n_heads),
                      rotate_half_to_interleaved(w_k, n_heads))
    assert torch.allclose(expected, permuted, atol=1e-9)
    assert not torch.allclose(expected, scores(_rope_interleaved, w_q, w_k), atol=1e-3)  # the permutation matters
    assert torch.equal(interleaved_to_rotate_half(rotate_half_to_interleaved(w_q, n_heads), n_heads), w_q)


def test_family_override_and_license(tmp_path):
    hf_llama(tmp_path, vocab_size=500)
    (tmp_path / "README.md").write_text("---\nlanguage: [en, es]\nlicense: apache-2.0\n---\n# A model\n")
    assert open_checkpoint(tmp_path, family="hf-llama").source.license == "apache-2.0"
    with pytest.raises(BadInput, match="no checkpoint file"):
        open_checkpoint(tmp_path, family="tinyllama")
    with pytest.raises(BadInput, match="unknown family 'gguf'"):
        open_checkpoint(tmp_path, family="gguf")


def test_registry_keeps_detection_order_and_refuses_clashes():
    from parrot_edge.converters import families

    known = families.registered()
    assert [f.name for f in known] == ["tinyllama", "parrotllm", "parakeet", "litgpt", "hf-llama"]  # specific first
    assert list(families.presets()) == ["tiny_LLaMA_1b", "tiny_LLaMA_120M", "code_tiny_LLaMA_1b", "micro-llama-300M"]
    twin = known[0]
    for clash, message in ((dict(priority=99), "two checkpoint families are named"),
                           (dict(name="other", presets={}), "share priority"),
                           (dict(name="other", priority=99), "both define the presets")):
        with pytest.raises(ValueError, match=message):
            families.register(families.Family(**{**vars(twin), **clash}))
    assert families.registered() == known


@pytest.mark.parametrize("preset,parameters,context,rope_scale", [
    ("tiny_LLaMA_1b", 1_100_048_384, 2048, 1.0),  # ParrotAI-1.1B / TinyLlama (checkpoint-formats.md §2.1)
    ("code_tiny_LLaMA_1b", 1_100_048_384, 8192, 4.0),
    ("micro-llama-300M", 304_636_928, 2048, 1.0),  # MicroLlama's safetensors, counted by shape (§2.3)
])
def test_presets_describe_the_published_models(preset, parameters, context, rope_scale):
    import math

    from parrot_edge.converters.architectures.llama import tensor_shapes
    from parrot_edge.converters.families import presets
    from parrot_edge.converters.families._lit_checkpoint import llama_config

    config, vocab = llama_config(presets()[preset], preset)
    assert sum(math.prod(shape) for shape in tensor_shapes(config).values()) == parameters
    assert (config.context_length, config.rope_scale, vocab, config.n_vocab) == (context, rope_scale, 32000, 32000)

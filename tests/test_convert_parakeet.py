"""Parakeet: a random checkpoint in its real format (state dict, main.py's file name, 18 heads, c_kv shared by
layer pairs), converted to `mpt` and checked against a plainly written implementation below (ALiBi built
as its model.py builds it).

The conversion is approximate in two labelled ways and exact in everything else, which is proven by
changing only those two things in the independent implementation: with ggml's slopes and tanh-GELU it
matches llama.cpp to float16-GELU rounding (the embedding's LayerNorm folded into token_embd, the shared
c_kv copied, the fused QKV, all exact); with Parakeet's own slopes and erf-GELU the difference is
measured and recorded. Heads 0-15 get Parakeet's slopes exactly, 16 and 17 do not.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from converter_fixtures import TEXTS
from seed_checkpoints import parakeet_state, save_parakeet
from test_convert_vocab_files import parakeet_tiktoken

from parrot_edge.converters.architectures.mpt import alibi_slopes
from parrot_edge.converters.convert import convert, open_source
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.gguf_eval import gguf_logits, gguf_tokenize
from parrot_edge.converters.verify import compare, verify
from parrot_edge.store.gguf_check import read_header

HEADS = 18


def independent(state: dict, tokens: list[int], slopes: list[float], gelu: str = "none") -> torch.Tensor:
    """Parakeet's forward written out plainly: the ALiBi offsets filled row by row as ALiBi.bias does."""
    t = len(tokens)
    wte = state["transformer.wte.weight"]
    d = wte.shape[1]
    hd = d // HEADS
    x = F.layer_norm(wte[torch.tensor(tokens)], (d,), state["transformer.wte.norm.weight"],
                     state["transformer.wte.norm.bias"], 1e-5)
    offsets = torch.zeros(t, t)
    for i in range(t):
        offsets[i, :i] = -torch.arange(i, 0, -1)
    bias = torch.tensor(slopes, dtype=torch.float32)[:, None, None] * offsets
    causal = torch.tril(torch.ones(t, t))
    layer = 0
    while f"transformer.h.{layer}.ln_1.weight" in state:
        def w(name, layer=layer):
            return state[f"transformer.h.{layer}.{name}.weight"]
        h = F.layer_norm(x, (d,), w("ln_1"), None, 1e-5)
        q = (h @ w("attn.c_query").T).view(t, HEADS, hd).transpose(0, 1)
        k, v = (h @ w("attn.c_kv").T).split(d, dim=1)
        k, v = k.reshape(t, HEADS, hd).transpose(0, 1), v.reshape(t, HEADS, hd).transpose(0, 1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + bias
        att = att.masked_fill(causal == 0, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(t, d) @ w("attn.c_proj").T
        u = F.layer_norm(x, (d,), w("ln_2"), None, 1e-5)
        x = x + F.gelu(u @ w("mlp.c_fc").T, approximate=gelu) @ w("mlp.c_proj").T
        layer += 1
    return F.layer_norm(x, (d,), state["transformer.ln_f.weight"], None, 1e-5) @ wte.T


def parakeet_slopes(n: int) -> list[float]:
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    return [start * start**i for i in range(n)]


@pytest.fixture(scope="module")
def parakeet(tmp_path_factory, cl100k_file):
    root = tmp_path_factory.mktemp("parakeet")
    state = parakeet_state()
    path = save_parakeet(root / "assets" / "models", state)
    shutil.copy(cl100k_file, path.parent / "cl100k_base.tiktoken")
    checkpoint, vocabulary = open_source(path, None, None, None)
    output = root / "parakeet-f32.gguf"
    messages = []
    convert(checkpoint, vocabulary, output, "f32", progress=messages.append)
    return state, checkpoint, vocabulary, output, messages


def test_checkpoint_is_recognised_and_labelled(parakeet):
    _, checkpoint, _, output, messages = parakeet
    assert checkpoint.source.family == "parakeet" and checkpoint.arch == "mpt"
    assert [a.split(":")[0] for a in checkpoint.approximations] == ["ALiBi", "GELU"]
    assert "heads 0-15 are exact, head 16 0.8572 instead of 0.005316, head 17 0.63 instead of 0.003906" in \
        checkpoint.approximations[0]
    assert sum("warning: APPROXIMATE conversion to `mpt`" in m for m in messages) == 2
    meta = read_header(output).metadata
    assert meta["mpt.attention.head_count"] == HEADS and meta["mpt.attention.max_alibi_bias"] == pytest.approx(64 / 9)
    assert meta["tokenizer.ggml.tokens"].length == 100288 and meta["tokenizer.ggml.eos_token_id"] == 100276
    names = {t.name for t in read_header(output).tensors}
    assert names >= {"output.weight", "token_embd.weight", "blk.3.attn_qkv.weight"}


def test_ggml_gives_heads_0_to_15_parakeets_slopes():
    ours, theirs = alibi_slopes(HEADS, 64 / 9), parakeet_slopes(HEADS)
    assert all(abs(a - b) <= 1e-9 * b for a, b in zip(ours[:16], theirs[:16], strict=True))
    assert ours[16] / theirs[16] == pytest.approx(2 ** (22 / 3)) and ours[17] > 100 * theirs[17]
    assert alibi_slopes(16, 8.0) == pytest.approx(parakeet_slopes(16))  # a power of two: all exact


def test_reference_forward_matches_the_independent_implementation(parakeet):
    state, checkpoint, vocabulary, _, _ = parakeet
    ids = vocabulary.encode(TEXTS[1])
    ours = checkpoint.reference_logits(torch.tensor([ids]))[0]
    theirs = independent(state, ids, parakeet_slopes(HEADS))
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_f32_gguf_is_exact_but_for_the_two_labelled_approximations(parakeet):
    state, checkpoint, vocabulary, output, _ = parakeet
    token_lists = [vocabulary.encode(t)[:64] for t in TEXTS]
    llama = gguf_logits(output, token_lists, threads=1)

    def figures(slopes, gelu):
        reference = [independent(state, ids, slopes, gelu).numpy() for ids in token_lists]
        return compare(reference, llama, token_lists)

    as_ggml = figures(alibi_slopes(HEADS, 64 / 9), "tanh")
    assert as_ggml["max_abs_dlogit"] <= 0.1 and as_ggml["top1_agreement"] == 1.0 and as_ggml["mean_kl"] <= 1e-4
    as_parakeet = figures(parakeet_slopes(HEADS), "none")
    assert as_parakeet["mean_kl"] > 100 * as_ggml["mean_kl"]  # heads 16-17: the price, on these random weights
    report = verify(checkpoint, vocabulary, output, TEXTS, threads=1)
    assert report.tokenizer_matches == len(TEXTS) and report.figures.passed and report.tolerance is None


def test_tokenizer_chat_template_and_stop_tokens(parakeet, cl100k_file):
    from parrot_edge import llamacpp
    from parrot_edge.api.chat_template import render_chat

    output = parakeet[3]
    template = read_header(output).metadata["tokenizer.chat_template"]
    messages = [{"role": "system", "content": "You are Parakeet."}, {"role": "user", "content": " ¿Qué es un río? "},
                {"role": "assistant", "content": "Agua que corre."}, {"role": "user", "content": "Thanks 😊"}]
    text = render_chat(template, messages, bos_token="", eos_token="<|endofprompt|>")
    assert text == ("\n\nSystem: You are Parakeet.<|endofprompt|>\n\nHuman: ¿Qué es un río?<|endofprompt|>"
                    "\n\nAssistant: Agua que corre.<|endofprompt|>\n\nHuman: Thanks 😊<|endofprompt|>\n\nAssistant: ")
    encoding = parakeet_tiktoken(cl100k_file)  # as Parakeet's TikTokenizer.encode allows its specials
    allowed = {"<|endoftext|>", "<|endofprompt|>", "\n\nSystem: ", "\n\nHuman: ", "\n\nAssistant: "}
    lib = llamacpp.lib()
    model = llamacpp.load_model(output, vocab_only=True)
    try:
        vocab = lib.llama_model_get_vocab(model)
        data = text.encode()
        buffer = (lib.llama_token * (len(data) + 8))()
        count = lib.llama_tokenize(vocab, data, len(data), buffer, len(data) + 8, False, True)
        assert list(buffer[:count]) == encoding.encode(text, allowed_special=allowed)
        assert [bool(lib.llama_vocab_is_eog(vocab, t)) for t in (100276, 100277, 100279, 13)] == [True, True, False,
                                                                                                  False]
    finally:
        lib.llama_model_free(model)
    assert gguf_tokenize(output, TEXTS) == [encoding.encode(t) for t in TEXTS]


def test_q4_0_loads_and_answers_and_k_quants_fall_back_plainly(parakeet, tmp_path):
    from parrot_edge.converters.quantize import fallbacks

    _, checkpoint, vocabulary, output, _ = parakeet
    ids = vocabulary.encode(TEXTS[0])
    f32 = torch.from_numpy(gguf_logits(output, [ids], threads=1)[0])
    q4 = tmp_path / "q4_0.gguf"
    convert(checkpoint, vocabulary, q4, "q4_0", progress=lambda _: None)
    assert fallbacks(q4, "q4_0") == []
    assert (torch.from_numpy(gguf_logits(q4, [ids], threads=1)[0]).argmax(-1) == f32.argmax(-1)).float().mean() >= 0.6
    messages = []
    convert(checkpoint, vocabulary, tmp_path / "k.gguf", "q4_k_m", progress=messages.append)
    assert any("256-value blocks" in m and "q4_0 / q4_1 / iq4_nl" in m for m in messages), messages


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path, cl100k_file):
    path = save_parakeet(tmp_path, parakeet_state(n_embd=288, n_layers=2), n_head=7)
    with pytest.raises(BadInput, match="7 heads do not divide the embedding width 288"):
        open_source(path, None, None, cl100k_file)

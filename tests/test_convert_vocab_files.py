"""The real vocabularies of the seeds' models, from their own file formats: GPT-2's vocab.json + merges.txt
(ParrotLLM) and tiktoken's cl100k_base.tiktoken (Parakeet). llama.cpp must tokenise exactly as the source
tokenizer libraries do (transformers' GPT2Tokenizer, tiktoken itself) on bilingual text, emoji and code,
and as llama.cpp's own vendored test vectors say where one applies (ggml-vocab-gpt-2: GPT-2's vocabulary).
llama.cpp has no vector file for cl100k, so its Llama-3 vector inputs (the same pre-tokenizer regex, and
hard cases: runs of spaces and newlines, digits, apostrophes, scripts) are used as extra texts for tiktoken.
"""

from __future__ import annotations

import pytest
from converter_fixtures import CORPUS, TEXTS
from seed_checkpoints import llama_cpp_vectors
from test_convert_tokenizer import vocab_gguf

from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.gguf_eval import gguf_tokenize
from parrot_edge.converters.tokenizer import CONTROL, UNUSED, USER_DEFINED, TokenizerHints, load_vocabulary

EXTRA = ["Hola, ¿qué tal? Ça va très bien — 東京は晴れです。", "x  =  [1,2,3]\n\n\tif x:\n        return '''done'''",
         "😀😃🇪🇸👩‍👩‍👧 1234567 3.14159 I'm you'll they've", "   leading and trailing   ", "\n\n\n", "a\r\nb"]
PARAKEET_ADDED = {100277: ("<|padding|>", CONTROL), 100278: ("\n\nSystem: ", USER_DEFINED),
                  100279: ("\n\nHuman: ", USER_DEFINED), 100280: ("\n\nAssistant: ", USER_DEFINED)}


@pytest.fixture(scope="module")
def vectors():
    return {name: llama_cpp_vectors(name) for name in ("gpt-2", "llama-bpe")}


@pytest.fixture(scope="module")
def gpt2_gguf(gpt2_vocabulary, tmp_path_factory):
    hints = TokenizerHints(added={50256: ("<|endoftext|>", CONTROL), 50257: ("<|pad|>", CONTROL)},
                           special={"bos": 50256, "eos": 50256, "pad": 50257})
    vocabulary = load_vocabulary(gpt2_vocabulary / "vocab.json", 50258, hints=hints)
    return vocabulary, vocab_gguf(tmp_path_factory.mktemp("gpt2") / "v.gguf", vocabulary)


def test_gpt2_files_match_transformers_and_llama_cpp_vectors(gpt2_vocabulary, gpt2_gguf, vectors):
    from transformers import GPT2Tokenizer

    vocabulary, path = gpt2_gguf
    meta = vocabulary.metadata
    assert vocabulary.kind == "byte-level-bpe (gpt-2)" and len(meta["tokenizer.ggml.merges"]) == 50000
    special = [meta[f"tokenizer.ggml.{name}"] for name in ("bos_token_id", "eos_token_id", "padding_token_id",
                                                            "add_bos_token")]
    assert special == [50256, 50256, 50257, False]
    assert vocabulary.tokens[50256:] == ["<|endoftext|>", "<|pad|>"] and vocabulary.types[50256:] == [CONTROL] * 2
    reference = GPT2Tokenizer(str(gpt2_vocabulary / "vocab.json"), str(gpt2_vocabulary / "merges.txt"))
    texts = TEXTS + CORPUS + EXTRA
    assert gguf_tokenize(path, texts) == [reference.encode(t) for t in texts] == [vocabulary.encode(t) for t in texts]
    inputs, expected = vectors["gpt-2"]
    assert len(inputs) > 40 and gguf_tokenize(path, inputs) == expected


@pytest.fixture(scope="module")
def cl100k_gguf(cl100k_file, tmp_path_factory):
    hints = TokenizerHints(added=PARAKEET_ADDED, special={"bos": 100257, "eos": 100276, "pad": 100277, "eot": 100277})
    vocabulary = load_vocabulary(cl100k_file, 100288, declared_vocab=100281, hints=hints)
    return vocabulary, vocab_gguf(tmp_path_factory.mktemp("cl100k") / "v.gguf", vocabulary)


def parakeet_tiktoken(cl100k_file):
    """Parakeet's own tokenizer (lib/tokenizer/tiktoken.py): cl100k_base's ranks, tiktoken 0.7's cl100k pattern,
    cl100k's special tokens and Parakeet's four."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from parrot_edge.converters.bpe_files import CL100K_PATTERN, CL100K_SPECIALS

    specials = CL100K_SPECIALS | {content: i for i, (content, _) in PARAKEET_ADDED.items()}
    return tiktoken.Encoding("cl100k_base_prk", pat_str=CL100K_PATTERN,
                             mergeable_ranks=load_tiktoken_bpe(str(cl100k_file)), special_tokens=specials)


def test_cl100k_from_tiktokens_file_matches_tiktoken(cl100k_file, cl100k_gguf, vectors):
    vocabulary, path = cl100k_gguf
    encoding = parakeet_tiktoken(cl100k_file)
    assert vocabulary.kind == "byte-level-bpe (llama-bpe)" and len(vocabulary.tokens) == 100288
    assert vocabulary.metadata["tokenizer.ggml.add_bos_token"] is False
    assert len(vocabulary.metadata["tokenizer.ggml.merges"]) == 100256 - 256  # one per multi-byte token
    holes = [i for i, t in enumerate(vocabulary.types) if t == UNUSED]
    assert holes == [100256, *range(100261, 100276), *range(100281, 100288)]
    assert [vocabulary.types[i] for i in (100257, 100276, 100277, 100278, 100280)] == [CONTROL] * 3 + [USER_DEFINED] * 2
    llama_inputs, _ = vectors["llama-bpe"]
    allowed = {"\n\nSystem: ", "\n\nHuman: ", "\n\nAssistant: "}
    texts = [*TEXTS, *CORPUS, *EXTRA, *llama_inputs, "Hi\n\nHuman: ¿qué es un volcán?\n\nAssistant: Una montaña."]
    expected = [encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
    assert gguf_tokenize(path, texts) == expected
    assert [vocabulary.encode(t) for t in texts] == expected
    assert encoding.encode(texts[-1], allowed_special=allowed)[1] == 100279  # Parakeet's own "Human" token


def test_tiktoken_files_other_than_cl100k_are_refused(tmp_path):
    (tmp_path / "o200k_base.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(BadInput, match=r"knows the pattern and special tokens of cl100k_base\.tiktoken only"):
        load_vocabulary(tmp_path / "o200k_base.tiktoken", 1)


def test_vocab_json_without_merges_is_a_clear_error(gpt2_vocabulary, tmp_path):
    (tmp_path / "vocab.json").write_bytes((gpt2_vocabulary / "vocab.json").read_bytes())
    with pytest.raises(BadInput, match=r"vocab.json needs merges.txt beside it"):
        load_vocabulary(tmp_path / "vocab.json", 50257)

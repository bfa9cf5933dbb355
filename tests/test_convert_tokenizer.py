"""Tokenizer export: llama.cpp must tokenise text exactly as the source tokenizer library does.

A SentencePiece model trained here (Llama 2 style, byte fallback) and byte-level BPE tokenizer.json
files built here for each pre-tokenizer the converter maps; parity is checked on English, Spanish with
accents, digits, emoji, code and odd whitespace against the sentencepiece / tokenizers libraries
themselves, not against the converter's own encode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from converter_fixtures import SPECIAL_TOKENS, TEXTS, build_bpe_tokenizer, train_sentencepiece

from parrot_edge.api.chat_template import DEFAULT_CHAT_TEMPLATE
from parrot_edge.converters.architectures.llama import LlamaConfig, gguf_metadata
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.gguf_eval import gguf_tokenize
from parrot_edge.converters.gguf_writer import write_gguf
from parrot_edge.converters.tokenizer import BYTE, CONTROL, UNUSED, Vocabulary, find_tokenizer, load_vocabulary


def vocab_gguf(path: Path, vocabulary: Vocabulary) -> Path:
    """A GGUF with a tokenizer and no weights: enough for llama.cpp to load its vocabulary."""
    config = LlamaConfig(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, head_dim=64, n_ff=64,
                         n_vocab=len(vocabulary.tokens), context_length=64)
    write_gguf(path, "llama", gguf_metadata(config) | vocabulary.gguf_metadata(), [], None)
    return path


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_sentencepiece_parity_with_llama_cpp(tmp_path, sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    vocabulary = load_vocabulary(sentencepiece_model, processor.get_piece_size())
    assert vocabulary.kind == "sentencepiece"
    assert vocabulary.types[0] == 2 and vocabulary.types[1] == vocabulary.types[2] == CONTROL
    assert vocabulary.types[3:259] == [BYTE] * 256 and vocabulary.tokens[3] == "<0x00>"
    llama = gguf_tokenize(vocab_gguf(tmp_path / "v.gguf", vocabulary), TEXTS)
    expected = [[processor.bos_id(), *processor.encode(text)] for text in TEXTS]
    assert llama == expected
    assert any(vocabulary.types[i] == BYTE for ids in expected for i in ids)  # the emoji went through byte fallback


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_bpe_parity_with_llama_cpp(tmp_path, pre):
    from tokenizers import Tokenizer

    path = build_bpe_tokenizer(tmp_path, pre)
    tokenizer = Tokenizer.from_file(str(path))
    vocabulary = load_vocabulary(path, tokenizer.get_vocab_size())
    assert vocabulary.metadata["tokenizer.ggml.pre"] == pre
    assert vocabulary.metadata["tokenizer.ggml.add_bos_token"] is False
    llama = gguf_tokenize(vocab_gguf(tmp_path / "v.gguf", vocabulary), TEXTS)
    assert llama == [tokenizer.encode(text).ids for text in TEXTS]


def test_bpe_special_tokens_template_and_add_bos(tmp_path):
    from tokenizers import Tokenizer, processors

    path = build_bpe_tokenizer(tmp_path, "smollm")
    tokenizer = Tokenizer.from_file(str(path))
    bos = tokenizer.token_to_id("<|im_start|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                             special_tokens=[("<|im_start|>", bos)])
    tokenizer.save(str(path))
    vocabulary = load_vocabulary(path, tokenizer.get_vocab_size())
    meta = vocabulary.metadata
    assert meta["tokenizer.ggml.bos_token_id"] == bos
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is True  # what the tokenizer's post-processor does
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert [vocabulary.types[tokenizer.token_to_id(t)] for t in SPECIAL_TOKENS] == [CONTROL] * 3
    llama = gguf_tokenize(vocab_gguf(tmp_path / "v.gguf", vocabulary), TEXTS)
    assert llama == [tokenizer.encode(text).ids for text in TEXTS]


def test_base_model_without_template_gets_the_default(tmp_path):
    path = build_bpe_tokenizer(tmp_path, "gpt-2", settings={})
    vocabulary = load_vocabulary(path, 600)
    assert vocabulary.metadata["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert any("default" in note for note in vocabulary.notes)
    # no tokenizer_config.json naming it: GPT-2's convention, <|endoftext|> ends (and begins) a text
    assert vocabulary.metadata["tokenizer.ggml.eos_token_id"] == vocabulary.tokens.index("<|endoftext|>")


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    path = build_bpe_tokenizer(tmp_path, "metaspace")
    with pytest.raises(BadInput, match=r"pre-tokenizer llama\.cpp is not known to reproduce"):
        load_vocabulary(path, 600)


def test_vocabulary_is_padded_only_where_a_trainer_pads(sentencepiece_model):
    padded = load_vocabulary(sentencepiece_model, 512)
    assert padded.tokens[500:] == [f"[PAD{i}]" for i in range(500, 512)]
    assert padded.types[500:] == [UNUSED] * 12 and len(padded.scores) == 512
    assert len(load_vocabulary(sentencepiece_model, 1024, declared_vocab=500).tokens) == 1024  # config says 500
    with pytest.raises(BadInput, match="has 500 tokens but the model's embedding has 600 rows"):
        load_vocabulary(sentencepiece_model, 600)
    with pytest.raises(BadInput, match="has 500 tokens but the model's embedding has 400 rows"):
        load_vocabulary(sentencepiece_model, 400)


def test_tokens_added_to_a_sentencepiece_model(tmp_path, sentencepiece_model):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    settings = {"added_tokens_decoder": {"500": {"content": "<|im_start|>", "special": True},
                                         "501": {"content": "<|im_end|>", "special": True}},
                "eos_token": "<|im_end|>", "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    vocabulary = load_vocabulary(tmp_path / "tokenizer.model", 502)
    assert vocabulary.tokens[500:] == ["<|im_start|>", "<|im_end|>"] and vocabulary.types[500:] == [CONTROL] * 2
    assert vocabulary.metadata["tokenizer.ggml.eos_token_id"] == 501
    assert vocabulary.metadata["tokenizer.ggml.add_bos_token"] is False


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(BadInput, match=r"no tokenizer in .* pass the checkpoint's tokenizer with --tokenizer"):
        find_tokenizer(tmp_path)

"""Tokenizer training: byte-level BPE, WordPiece and Unigram (Zhao et al. §4.1.2).

Each kind trains on a slice of the stdlib corpus and must: hold lmlab's special tokens,
encode every string without an unknown token and decode it back exactly, give token byte
lengths that add up to the text's UTF-8 length (what bits per byte divides by), train
to the same file twice, load in transformers, and carry a smoke run through its stages.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmlab.data.sources import read_stdlib
from lmlab.errors import UsageError
from lmlab.model.scoring import token_byte_lengths
from lmlab.run.recipe import load_recipe
from lmlab.tokenizer import (
    EOS,
    SPECIAL_TOKENS,
    USER,
    format_chat,
    load_tokenizer,
    save_tokenizer,
    special_id,
)
from lmlab.tokenizer.train import (
    CONTINUATION,
    KINDS,
    MAX_WORD,
    MIN_VOCAB,
    UTF8_BYTES,
    byte_chars,
    train_tokenizer,
)

from .conftest import lmlab_cmd

VOCAB = 800
MODEL_TYPE = {"bpe": "BPE", "wordpiece": "WordPiece", "unigram": "Unigram"}

# What a corpus can throw at a tokenizer: every script and plane, combining marks,
# control characters, long words and runs of whitespace, and the strings each kind's
# markers are made of (BERT's "##", our continuation sign, SentencePiece's "▁").
HOSTILE = [
    "naïve café, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 😀👩‍👩‍👧 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, e\u0301 (combining), \u200b zero width",
    "\x00\x01\x07\x1b[0m\x7f\x85 controls\r\n\tTabs\x0b\x0c",
    "x" * 3 * MAX_WORD + " " + "é" * MAX_WORD + " " + "😀" * 60 + " " + "9" * 250,
    " " * 500 + "\n" * 300 + "\t" * 130 + "end",
    "## heading, a##b, ##c, #, ＃＃x, \uff03 alone, ▁x ▁▁, <0x41>, [UNK], <unk>",
    "<|endoftext|> and <|user|> written in text, <|end",
    "",
    "a",
]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """Train on every 25th document of the stdlib corpus; check on others: a disjoint
    slice, every document with a non-ASCII character, and the hostile lines."""
    docs = [d.text for d in read_stdlib()]
    check = [
        d for i, d in enumerate(docs) if i % 25 and (i % 25 == 12 or any(ord(c) > 127 for c in d))
    ]
    return docs[::25], check + HOSTILE


@pytest.fixture(scope="module")
def tokenizers(corpus) -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(kind, iter(corpus[0]), VOCAB) for kind in KINDS}


@pytest.fixture(params=KINDS)
def trained(request, tokenizers) -> tuple[str, Tokenizer]:
    return request.param, tokenizers[request.param]


def test_each_kind_has_the_special_tokens_first_and_the_asked_vocabulary(trained):
    kind, tok = trained
    assert [special_id(tok, t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() == VOCAB
    assert json.loads(tok.to_str())["model"]["type"] == MODEL_TYPE[kind]
    added = [t.content for t in tok.get_added_tokens_decoder().values()]
    assert added == SPECIAL_TOKENS  # nothing else is matched in raw text
    chat = format_chat(
        [{"role": "user", "content": "Hi ## ＃＃"}, {"role": "assistant", "content": "ok"}]
    )
    ids = tok.encode(chat).ids
    assert ids[0] == special_id(tok, USER) and ids.count(special_id(tok, USER)) == 1
    assert tok.decode(ids, skip_special_tokens=False) == chat


def test_every_string_round_trips_without_an_unknown_token(trained, corpus):
    kind, tok = trained
    vocab = tok.get_vocab()
    assert not {"[UNK]", "<unk>"} & set(vocab)
    for text in corpus[1]:
        enc = tok.encode(text)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text, (kind, text[:60])


def test_token_byte_lengths_add_up_to_the_utf8_length(trained, corpus):
    """Bits per byte divides by these lengths: they must be exact for every kind (a
    WordPiece continuation prefix or a multi-byte character split across pieces included)."""
    kind, tok = trained
    lengths = token_byte_lengths(tok, tok.get_vocab_size())
    texts = [t for t in corpus[1] if not any(s in t for s in SPECIAL_TOKENS)]
    assert len(texts) > 40
    for text in texts:
        assert int(lengths[tok.encode(text).ids].sum()) == len(text.encode()), (kind, text[:60])
    assert lengths[: len(SPECIAL_TOKENS)].tolist() == [0] * len(SPECIAL_TOKENS)
    assert lengths.min() >= 0 and (lengths[len(SPECIAL_TOKENS) :] >= 1).all()


def test_training_is_deterministic(trained, corpus):
    kind, tok = trained
    assert train_tokenizer(kind, iter(corpus[0]), VOCAB).to_str() == tok.to_str()


def test_saved_tokenizer_loads_in_lmlab_and_transformers_with_the_same_ids(
    trained, corpus, tmp_path
):
    transformers = pytest.importorskip("transformers")
    kind, tok = trained
    save_tokenizer(tok, tmp_path)
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in corpus[1][:5] + HOSTILE:
        ids = ours.encode(text).ids
        assert ids == tok.encode(text).ids == hf(text)["input_ids"]
        assert hf.decode(ids) == text
    assert hf.eos_token == EOS


def test_wordpiece_holds_every_utf8_byte_inside_a_word(tokenizers):
    tok = tokenizers["wordpiece"]
    vocab = tok.get_vocab()
    chars = byte_chars()
    assert all(CONTINUATION + chars[b] in vocab for b in UTF8_BYTES)
    assert not any(c in "".join(chars) for c in CONTINUATION)  # no piece reads two ways
    # a word longer than WordPiece's limit is cut, not replaced by an unknown token
    enc = tok.encode("y" * 5 * MAX_WORD)
    assert len(enc.ids) > 1 and tok.decode(enc.ids) == "y" * 5 * MAX_WORD


def test_byte_lengths_of_a_sentencepiece_style_tokenizer():
    """Outside byte-level: "▁" is one space and a byte-fallback piece `<0xNN>` one byte."""
    pieces = [("<unk>", 0.0), ("▁the", -1.0), ("▁", -2.0), ("t", -3.0), ("h", -3.0)]
    pieces += [("e", -3.0), ("é", -3.0)] + [(f"<0x{b:02X}>", -9.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    lengths = token_byte_lengths(tok, tok.get_vocab_size())
    for text in ["the thé", "thé 中 😀 the"]:
        enc = tok.encode(text)
        assert tok.decode(enc.ids) == text
        assert int(lengths[enc.ids].sum()) == len(text.encode())
    assert lengths[tok.token_to_id("<0x41>")] == 1 and lengths[tok.token_to_id("é")] == 2


def test_recipe_kind_and_vocabulary_bounds(tmp_path):
    assert load_recipe("smoke").tokenizer.kind == "bpe"
    for kind in KINDS:
        assert load_recipe("smoke", [f"tokenizer.kind={kind}"]).tokenizer.kind == kind
        too_small = [f"tokenizer.kind={kind}", f"tokenizer.vocab_size={MIN_VOCAB[kind] - 1}"]
        with pytest.raises(UsageError, match=f"byte-level {kind} needs at least {MIN_VOCAB[kind]}"):
            load_recipe("smoke", too_small)
    p = lmlab_cmd("tokenizer", "smoke", "--set", "tokenizer.kind=sentencepiece", cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1
    assert "tokenizer.kind: Input should be 'bpe', 'wordpiece' or 'unigram'" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_smoke_runs_every_stage(kind, tmp_path):
    """Token shards, pre-training, SFT's chat template, evaluation's bits per byte and
    generation all work on the kind's ids."""
    short = ["pretrain.max_steps=10", "sft.train.max_steps=4", "eval.questions=2", "eval.tasks=[]"]
    sets = [a for s in [f"tokenizer.kind={kind}", *short] for a in ("--set", s)]
    lmlab_cmd("run", "smoke", "--quiet", *sets, cwd=tmp_path, check=True)
    run = tmp_path / "runs" / "smoke"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()) and "report" in stages
    assert stages["tokenizer"]["summary"]["kind"] == kind
    tok = load_tokenizer(run)  # the SFT model's
    assert json.loads(tok.to_str())["model"]["type"] == MODEL_TYPE[kind]
    shards = json.loads((run / "tokenizer/tokens/manifest.json").read_text())
    ids = np.fromfile(run / "tokenizer/tokens/val.bin", dtype=shards["dtype"])
    assert shards["vocab_size"] == tok.get_vocab_size() > ids.max()
    lm = json.loads((run / "eval/results.json").read_text())["lm"]
    assert 0 < lm["sft"]["bits_per_byte"] < 16
    # evaluation counts the bytes of exactly the tokens it scored, with this kind's lengths
    scored = ids[1 : 1 + lm["sft"]["tokens"]]
    assert lm["sft"]["bytes"] == int(token_byte_lengths(tok, tok.get_vocab_size())[scored].sum())

"""Tokenizer training (Zhao et al. §4.1.2): byte-level BPE, WordPiece and Unigram.

All three use the `tokenizers` library and cut text the same way: GPT-2's regex splits it
into words, and every UTF-8 byte is shown as one of 256 printable characters
(`pre_tokenizers.ByteLevel`). They differ only in the subword model, so a comparison
measures the algorithm. Byte-level input is what makes every string encodable with no
unknown token, decoding exact, and each character of a piece worth one byte (which is
what `lmlab.model.scoring.token_byte_lengths` counts).

- **BPE** learns merges, most frequent pair first, and encodes by replaying them.
- **WordPiece** marks pieces inside a word with a prefix and encodes greedily, longest
  piece first. The library's trainer picks merges by frequency as BPE does, not by the
  likelihood gain of the original (Schuster & Nakajima).
- **Unigram** starts from many substrings and prunes those whose loss hurts the corpus
  likelihood least; encoding is the most probable segmentation (Viterbi).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.tokenizer import SPECIAL_TOKENS

KINDS = ("bpe", "wordpiece", "unigram")

# Smallest vocabulary per kind: the byte pieces and special tokens, plus room to learn.
MIN_VOCAB = {"bpe": 300, "wordpiece": 470, "unigram": 300}

# Marks a WordPiece piece that continues a word. BERT writes "##", but "#" is a byte of
# the alphabet: the piece "##x" would then mean "x" inside a word and "##x" at a start.
# The fullwidth sign is no byte's character, so every piece reads one way.
CONTINUATION = "\uff03\uff03"

# WordPiece's longest-match-first is quadratic in a word's length, and the library
# gives up (an unknown token) on words longer than this; longer words are cut first.
MAX_WORD = 100


def byte_chars() -> list[str]:
    """The character `ByteLevel` shows each byte value as (GPT-2's table)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# Bytes of valid UTF-8 (the only input a Python `str` gives): any byte but C0, C1 and
# F5-FF; a character (and so a word) starts with one below 0x80 or a lead byte C2-F4.
UTF8_BYTES = [*range(0x00, 0xC0), *range(0xC2, 0xF5)]
START_BYTES = [*range(0x00, 0x80), *range(0xC2, 0xF5)]


def _byte_level(tok: Tokenizer) -> None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts (streamed, never held whole)."""
    tok = Tokenizer(models.BPE())
    _byte_level(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level WordPiece whose vocabulary holds every byte both at a word's
    start and inside a word, so no text needs an unknown token.

    The vocabulary is the special tokens, the 179 bytes a character can start with, the
    243 bytes of UTF-8 with the continuation prefix, then the trainer's learned pieces in
    the order it learned them (so a smaller vocabulary is a shorter training)."""
    chars = byte_chars()
    # inside a long word, cut after at most MAX_WORD - 4 characters and the rest of the
    # last one's bytes (at most 3 continuation bytes), so a cut word starts a character
    cont = "".join(chars[b] for b in range(0x80, 0xC0))
    cut = pre_tokenizers.Split(Regex(f".{{1,{MAX_WORD - 4}}}[{cont}]{{0,3}}"), "isolated")
    tok = Tokenizer(
        models.WordPiece(
            unk_token="[UNK]",  # never in the vocabulary, and never needed
            continuing_subword_prefix=CONTINUATION,
            max_input_chars_per_word=MAX_WORD,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), cut]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Strip(CONTINUATION[0], len(CONTINUATION), 0), decoders.ByteLevel()]
    )
    start = [chars[b] for b in START_BYTES]
    inner = [CONTINUATION + chars[b] for b in UTF8_BYTES]
    fixed = SPECIAL_TOKENS + start + inner
    trainer = trainers.WordPieceTrainer(
        # The trainer numbers the continuation bytes as it meets them in a hash map, and
        # breaks ties between merges by those numbers; given as special tokens they are
        # numbered in order, so training is deterministic. Its plain bytes are at most 64
        # more than `start`, so at least vocab_size - len(fixed) pieces are learned
        # whenever the corpus has that many.
        vocab_size=vocab_size + 64,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS + inner,
        initial_alphabet=start,
        continuing_subword_prefix=CONTINUATION,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    learned = [p for p in trained if len(p.removeprefix(CONTINUATION)) > 1]
    learned = [p for p in learned if p not in SPECIAL_TOKENS][: max(vocab_size - len(fixed), 0)]
    spec["model"]["vocab"] = {p: i for i, p in enumerate(fixed + learned)}
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    return Tokenizer.from_str(json.dumps(spec))


def train_unigram(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level Unigram model; every byte stays a piece, so no text needs an
    unknown token.

    The trainer's EM sums floats in hash-map order, and the bytes it has no score for
    (absent from the corpus, or dropped by EM as too rare) it adds back with descending
    scores in hash-set order, so two runs differ in the last digits and in those bytes.
    Scores are rounded to 1e-6, every byte scored at or below the lowest learned piece
    gets that score, and pieces are sorted by score: the same corpus gives the same file."""
    tok = Tokenizer(models.Unigram())
    _byte_level(tok)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    n = len(SPECIAL_TOKENS)
    vocab = [(p, round(s, 6)) for p, s in spec["model"]["vocab"]]
    floor = min((s for p, s in vocab[n:] if len(p) > 1), default=0.0)
    rest = sorted(
        ((p, max(s, floor) if len(p) == 1 else s) for p, s in vocab[n:]),
        key=lambda ps: (-ps[1], ps[0]),
    )
    spec["model"]["vocab"] = [list(ps) for ps in vocab[:n] + rest]
    return Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> Tokenizer:
    """Train a tokenizer of `kind` (one of KINDS) with lmlab's special tokens.
    `min_frequency` (a merge must occur this often) is BPE's and WordPiece's; Unigram
    prunes by likelihood and has no such threshold."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size, min_frequency)
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size, min_frequency)
    if kind == "unigram":
        return train_unigram(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r} (allowed: {', '.join(KINDS)})")

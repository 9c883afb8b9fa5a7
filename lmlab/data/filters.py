"""Normalization and Gopher-style statistic rules (Rae et al. 2021, as in Zhao et al. §4.1.2).

Each rule returns None to keep a document or a short reason string to drop it, so every
removal is counted by rule and auditable. Thresholds are the recipe's; the defaults in
`QualityConfig` are relaxed from Gopher's web-text values for the source-code corpus
(code has short "words" and many symbols) and are documented in docs/recipes.md.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from lmlab.config import STRICT, Fraction, NonNegFloat, PosInt

_WS_TAIL = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANKS = re.compile(r"\n{4,}")
_WORD = re.compile(r"\S+")


def normalize(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, at most two blank lines in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _WS_TAIL.sub("", text)
    text = _BLANKS.sub("\n\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


@dataclass
class QualityConfig:
    __pydantic_config__ = STRICT

    min_words: PosInt = 50
    max_words: PosInt = 100_000
    min_mean_word_length: NonNegFloat = 2.0
    max_mean_word_length: NonNegFloat = 12.0
    max_symbol_ratio: NonNegFloat = 0.5
    min_alpha_word_fraction: Fraction = 0.5
    max_duplicate_line_fraction: Fraction = 0.6
    max_bullet_line_fraction: Fraction = 0.9


def quality_reason(text: str, cfg: QualityConfig) -> str | None:
    """First Gopher-style rule the text fails, or None when it passes them all."""
    words = _WORD.findall(text)
    n = len(words)
    if n < cfg.min_words:
        return "gopher_min_words"
    if n > cfg.max_words:
        return "gopher_max_words"
    mean_len = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > cfg.max_symbol_ratio:
        return "gopher_symbol_ratio"
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    if alpha / n < cfg.min_alpha_word_fraction:
        return "gopher_alpha_words"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        counts = Counter(lines)
        dup = sum(c for c in counts.values() if c > 1)
        if dup / len(lines) > cfg.max_duplicate_line_fraction:
            return "gopher_duplicate_lines"
        bullets = sum(1 for ln in lines if ln[0] in "-*\u2022")
        if bullets / len(lines) > cfg.max_bullet_line_fraction:
            return "gopher_bullet_lines"
    return None

"""Detecting the KGW watermark (Kirchenbauer et al. 2023): count the tokens that fall in the
green list their context seeds, and test that count against chance with a one-proportion
z-test, z = (green - gamma T) / sqrt(T gamma (1 - gamma)), one-sided p = P(N(0,1) > z).

The scoring is transformers' `WatermarkDetector`'s, so the two agree on z for the same
settings and tokens: each token after the first `context_width` is scored against the
green list of the tokens before it (lefthash), or of the window that ends with it
(selfhash, which scores from the first token). With `ignore_repeated_ngrams` (the default
here, off in transformers) each distinct (context, token) n-gram counts once: repeated
text ("the the the", a copied list) would otherwise add the same green hit again and
again and inflate z for unwatermarked text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from lmlab.errors import UsageError
from lmlab.infer.watermark import WatermarkConfig, is_green

__all__ = ["WatermarkConfig", "detect", "detect_text"]


def detect(
    token_ids: Sequence[int],
    vocab_size: int,
    cfg: WatermarkConfig | None = None,
    ignore_repeated_ngrams: bool = True,
    threshold: float = 4.0,
) -> dict:
    """{z, p_value, green, scored, green_fraction, prediction} for one token sequence
    (give the generated text without its prompt: prompt tokens were not watermarked).
    `prediction` is z > threshold; 4 is the paper's (a false positive rate of 3e-5)."""
    cfg = (cfg or WatermarkConfig()).validate()
    ids = [int(t) for t in token_ids]
    if any(not 0 <= t < vocab_size for t in ids):
        raise UsageError(f"detect-watermark: token ids must be in [0, {vocab_size})")
    selfhash = cfg.seeding_scheme == "selfhash"
    n = cfg.context_width + 1 - int(selfhash)  # tokens per scored n-gram
    if len(ids) - cfg.context_width < 1:
        raise UsageError(
            f"detect-watermark: {len(ids)} tokens; at least {cfg.context_width + 1} are needed "
            f"(the first {cfg.context_width} only seed the green list)"
        )
    grams = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    hit = {g: is_green(g if selfhash else g[:-1], g[-1], vocab_size, cfg) for g in grams}
    if ignore_repeated_ngrams:
        scored, green = len(grams), sum(hit.values())
    else:
        scored = sum(grams.values())
        green = sum(count for g, count in grams.items() if hit[g])
    gamma = cfg.gamma
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    p_value = 0.5 * math.erfc(z / math.sqrt(2))
    return {
        "z": z,
        "p_value": p_value,
        "green": green,
        "scored": scored,
        "green_fraction": green / scored,
        "prediction": z > threshold,
    }


def detect_text(
    text: str,
    tokenizer,
    vocab_size: int,
    cfg: WatermarkConfig | None = None,
    ignore_repeated_ngrams: bool = True,
    threshold: float = 4.0,
) -> dict:
    """`detect` on text, tokenized without special tokens (a BOS would be scored as if the
    model had chosen it). Re-tokenizing may split text differently from how it was
    generated; for a byte-level BPE tokenizer the ids mostly come back the same."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise UsageError("detect-watermark: the text is empty")
    return detect(ids, vocab_size, cfg, ignore_repeated_ngrams, threshold)

"""Metrics with their error bars. ROUGE-L comes from the reference `rouge-score` package."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from rouge_score import rouge_scorer

_PUNCT = str.maketrans("", "", string.punctuation)
_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and extra whitespace (SQuAD-style normalisation)."""
    return " ".join(s.lower().translate(_PUNCT).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), Porter-stemmed as in rouge-score."""
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of b - a over the same items and its standard error (a paired comparison)."""
    if len(a) != len(b):
        raise ValueError("paired_difference: the two score lists must cover the same items")
    return mean_stderr([y - x for x, y in zip(a, b, strict=True)])


_WS = re.compile(r"\s+")


def clean_generation(text: str) -> str:
    return _WS.sub(" ", text).strip()

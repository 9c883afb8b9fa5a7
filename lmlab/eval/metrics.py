"""Per-item metrics for generated text, and pass@k.

Reference implementations wherever one exists: BLEU and chrF come from `sacrebleu`, ROUGE from
`rouge-score`, so scores agree with published numbers and with lm-evaluation-harness. Token F1
and exact match follow the SQuAD evaluation script; pass@k is the unbiased estimator of Chen
et al. (2021). Error bars for any of these live in `lmlab.eval.stats`; reading the answer out
of a generation (lm-eval's filters, "the answer is", numbers) lives in `lmlab.prompt.answers`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

from lmlab.errors import UsageError

_PUNCT = str.maketrans("", "", string.punctuation)
_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_rouge_all = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


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


# --- SQuAD token F1 and exact match ------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_squad(s: str) -> str:
    """The SQuAD script's normalisation: lower-case, drop punctuation, then the articles
    a/an/the, then collapse whitespace. Stricter than `normalize_answer`, which keeps
    articles (`exact_match` is unchanged for the callers that rely on that)."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def _as_refs(references: str | Sequence[str], fn: str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise UsageError(f"{fn}: references must be a string or a non-empty list of strings")
    return refs


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:  # SQuAD v2: an empty answer scores 1 only against an empty one
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token-level F1: bag-of-words overlap after `normalize_squad`, the best over
    the references (several gold answers are common in QA data)."""
    pred = normalize_squad(prediction).split()
    return max(
        _f1_tokens(pred, normalize_squad(r).split()) for r in _as_refs(references, "token_f1")
    )


def squad_exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD exact match: 1.0 if the prediction equals any reference after `normalize_squad`."""
    pred = normalize_squad(prediction)
    refs = _as_refs(references, "squad_exact_match")
    return float(any(pred == normalize_squad(r) for r in refs))


# --- BLEU, chrF (sacrebleu) and ROUGE (rouge-score) ---------------------------------------


def _ref_streams(references: Sequence[str | Sequence[str]], n: int, fn: str) -> list[list]:
    """Per-item references -> sacrebleu's reference streams (one list per reference
    position), padding items that have fewer references with None, which sacrebleu skips."""
    if len(references) != n:
        raise UsageError(f"{fn}: {n} predictions but {len(references)} reference entries")
    per_item = [_as_refs(r, fn) for r in references]
    width = max((len(r) for r in per_item), default=1)
    return [[r[j] if j < len(r) else None for r in per_item] for j in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation, exp smoothing).

    `references[i]` is the reference of prediction i, or a list of its references. BLEU is a
    corpus statistic: it is not the mean of sentence BLEU, so bootstrap it over items."""
    streams = _ref_streams(references, len(predictions), "corpus_bleu")
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def sentence_bleu(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence BLEU (0-100), sacrebleu's sentence defaults (exp smoothing, effective order)."""
    return float(sacrebleu.sentence_bleu(prediction, _as_refs(references, "sentence_bleu")).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (0-100; character 6-grams, beta 2), sacrebleu's defaults."""
    streams = _ref_streams(references, len(predictions), "corpus_chrf")
    return float(sacrebleu.corpus_chrf(list(predictions), streams).score)


def sentence_chrf(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence chrF (0-100), sacrebleu's defaults."""
    return float(sacrebleu.sentence_chrf(prediction, _as_refs(references, "sentence_chrf")).score)


def rouge(prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Porter-stemmed, rouge-score), each the best
    over the references: {"rouge1", "rouge2", "rougeL"}."""
    scores = [_rouge_all.score(r, prediction) for r in _as_refs(references, "rouge")]
    return {k: max(s[k].fmeasure for s in scores) for k in ("rouge1", "rouge2", "rougeL")}


# --- pass@k --------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for n samples of
    which c pass. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
    binomials; exactly 1.0 when every k-subset must contain a passing sample (n - c < k)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise UsageError("pass_at_k: n, c and k must be integers")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise UsageError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(samples: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c passing)."""
    if not samples:
        raise UsageError("mean_pass_at_k: no problems")
    return sum(pass_at_k(n, c, k) for n, c in samples) / len(samples)

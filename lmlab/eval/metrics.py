"""Per-item metrics for generated text, answer-extraction filters and pass@k.

Reference implementations wherever one exists: BLEU and chrF come from `sacrebleu`, ROUGE from
`rouge-score`, so scores agree with published numbers and with lm-evaluation-harness. Token F1
and exact match follow the SQuAD evaluation script; pass@k is the unbiased estimator of Chen
et al. (2021). Error bars for any of these live in `lmlab.eval.stats`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence
from decimal import Decimal, InvalidOperation

import sacrebleu
from rouge_score import rouge_scorer

from lmlab.errors import UsageError

_PUNCT = str.maketrans("", "", string.punctuation)
_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_rouge_all = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

INVALID = "[invalid]"
"""What an extraction filter returns when nothing matches (lm-evaluation-harness's fallback)."""


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


# --- answer extraction (lm-evaluation-harness filters) ------------------------------------


def extract_regex(
    text: str, pattern: str | re.Pattern, group_select: int = 0, fallback: str = INVALID
) -> str:
    """lm-eval's `regex` filter: `findall` matches of `pattern`, pick one by index
    (0 = first, -1 = last); with several groups the first non-empty one is kept; stripped.
    Returns `fallback` when nothing matches or the index is out of range."""
    try:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as e:
        raise UsageError(f"extract_regex: invalid regex {pattern!r}: {e}") from None
    matches = regex.findall(text)
    if not matches or not -len(matches) <= group_select < len(matches):
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*(.+?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)


def extract_answer_is(text: str, fallback: str = INVALID) -> str:
    """The X in "... the answer is X." (also "Answer: X"); the last such phrase wins, as
    chain-of-thought output may restate intermediate answers. X ends at a sentence-ending
    period, a newline or the end of text; surrounding quotes/asterisks/$ are dropped."""
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return fallback
    answer = matches[-1].strip().strip("*\"'`$ ").strip()
    return answer or fallback


# A number: optional minus (not a hyphen inside a word), digits with optional thousands
# commas, optional decimals. "$1,234.50" -> 1234.5; "x-5" -> 5; "3-4" -> 3.
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-\u2212])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
)


def canonical_number(s: str) -> str:
    """A number's canonical text, so that "1,000", "1000.00" and "1000" compare equal:
    no commas, no trailing zeros, "-0" is "0". Non-numbers come back stripped, unchanged."""
    text = s.strip().replace(",", "").replace("\u2212", "-").lstrip("$")
    try:
        d = Decimal(text)
    except InvalidOperation:
        return s.strip()
    if not d.is_finite():
        return s.strip()
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_number(text: str, which: str = "first", fallback: str = INVALID) -> str:
    """The first (or "last") number in the text, canonicalised by `canonical_number`.
    Handles thousands commas, negatives and decimals; GSM8K-style chain-of-thought is
    usually scored with "last"."""
    if which not in ("first", "last"):
        raise UsageError(f"extract_number: which must be 'first' or 'last', not {which!r}")
    matches = _NUMBER.findall(text)
    if not matches:
        return fallback
    return canonical_number(matches[0] if which == "first" else matches[-1])


def strip_lower(text: str) -> str:
    """lm-eval's `remove_whitespace` + `lowercase` filters in one."""
    return text.strip().lower()


def majority_vote(answers: Sequence[str], ignore: Collection[str] = (INVALID,)) -> str:
    """Self-consistency (Wang et al. 2023): the most frequent extracted answer.

    Ties go to the answer that appears first in `answers` (the order samples were drawn),
    which is also what lm-eval's `majority_vote` filter does, so the vote is deterministic.
    Answers in `ignore` (failed extractions) do not vote unless nothing else is left."""
    if not answers:
        raise UsageError("majority_vote: no answers to vote over")
    valid = [a for a in answers if a not in ignore] or list(answers)
    counts = Counter(valid)  # insertion-ordered: the first-seen answer wins a tie
    return max(counts, key=counts.__getitem__)


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

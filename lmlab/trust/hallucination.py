"""Hallucination checks: is an answer likely made up? Two signals that need no labels and
no access to the model's internals (Kaddour et al. on hallucination; `docs/hallucination.md`).

- `selfcheck`: self-consistency across samples, after SelfCheckGPT (Manakul et al. 2023).
  A model that knows a fact says it again when sampled; one that invents it says something
  else each time. The answer's sentences are scored against n more samples from the same
  backend by (a) SelfCheck-Unigram: a unigram model of the samples and the answer, each
  sentence's mean and max negative log-probability under it; (b) answer agreement: the
  share of samples whose normalised answer equals the answer's (self-consistency's vote,
  read as a confidence); (c) semantic: one minus the mean over samples of the best cosine
  between the sentence and that sample's sentences (MiniLM in place of the paper's
  BERTScore).
- `grounded`: retrieval-grounded verification. Each claim (sentence) of the answer is
  looked up in a RAG index; it is supported when some retrieved sentence says nearly the
  same (cosine) and the best passage holds most of its content words. No NLI model is
  available offline, so support is similarity, not entailment: a claim that swaps one
  entity of a retrieved sentence ("Lyon is the capital of France") can pass.

Every per-answer score lies in [0, 1], higher = more likely hallucinated."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.errors import UsageError
from lmlab.eval.metrics import normalize_squad
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.backend import Backend, greedy
from lmlab.prompt.retrieval import METHODS, Index

SHORT_WORDS = 8  # a normalised answer of at most this many words is "short": agreement applies
MIN_SIMILARITY = 0.6  # grounded: a claim's best cosine to a retrieved sentence, to be supported
MIN_LEXICAL = 0.75  # grounded: the share of its content words in the best passage, likewise

# a sentence ends at . ! or ? followed by space, or at a line break; not inside e.g./i.e.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)\s+|\s*\n\s*")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
# function words that carry no claim of their own (lexical support counts the rest)
_STOP = (
    "a an the and or but if then of to in on at by for with from as into about over under "
    "is are was were be been being am do does did has have had it its this that these those "
    "there here which who whom whose what when where why how not no nor so than too very can "
    "could may might must shall should will would i you he she we they me him her us them my "
    "your his our their also only just such any all each some more most other same own"
)
STOP_WORDS = frozenset(_STOP.split())
Encode = Callable[[list[str]], torch.Tensor]  # texts -> unit vectors, one row each


def sentences(text: str) -> list[str]:
    """`text` split into sentences (the unit every score is given for); blank ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: what the unigram model counts."""
    return _TOKEN.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The lower-cased words of `text` that are not function words."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


# --- SelfCheck-Unigram -------------------------------------------------------------------


@dataclass
class Unigram:
    """Add-`smoothing` unigram probabilities over `texts`; words never seen share the
    `<unk>` entry, which is part of the vocabulary (as in SelfCheckGPT)."""

    counts: Counter
    total: int
    smoothing: float = 1.0

    @classmethod
    def fit(cls, texts: list[str], smoothing: float = 1.0) -> Unigram:
        counts = Counter(t for text in texts for t in tokens(text))
        return cls(counts, sum(counts.values()), smoothing)

    def logprob(self, token: str) -> float:
        vocab = len(self.counts) + 1  # + <unk>
        return math.log(
            (self.counts.get(token, 0) + self.smoothing) / (self.total + self.smoothing * vocab)
        )

    def floor(self) -> float:
        """The largest negative log-probability a token of a fitted text can have (seen
        once): what `unigram_score` divides by, so it lies in [0, 1]."""
        return -self.logprob("\0never\0") - math.log1p(1.0 / self.smoothing)


# --- self-consistency ----------------------------------------------------------------------


@dataclass
class SentenceCheck:
    """One answer sentence's scores (higher = less consistent with the samples)."""

    text: str
    avg_neg_logprob: float  # mean of -log p(token) under the unigram model
    max_neg_logprob: float  # the rarest token's -log p
    semantic: float | None = None  # 1 - mean over samples of the best cosine (None: no encoder)


@dataclass
class SelfCheck:
    """`selfcheck`'s result. `score` is the per-answer score, taken from `score_from`:
    "agreement" (1 - agreement) for a short answer, else "semantic" when the sentence
    encoder is there, else "unigram"."""

    answer: str
    samples: list[str]
    sentences: list[SentenceCheck]
    avg_neg_logprob: float  # over all the answer's tokens (the paper's passage "Avg(-log p)")
    avg_max_neg_logprob: float  # the mean of the sentences' max (the paper's "Avg(Max(-log p))")
    unigram_score: float  # avg_neg_logprob / the largest it can be, in [0, 1]
    agreement: float  # share of samples whose normalised answer equals the answer's
    short: bool  # the normalised answer has at most SHORT_WORDS words
    semantic: float | None  # mean of the sentences' semantic scores
    score: float
    score_from: str
    question: list[dict] = field(default_factory=list)  # the conversation that was sampled

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unigram_check(answer: str, samples: list[str], smoothing: float = 1.0) -> dict:
    """SelfCheck-Unigram: the unigram model fitted on the samples and the answer, and under
    it each answer sentence's mean and max -log p, the passage mean over all tokens and the
    mean of the sentence maxima. A sentence without tokens scores 0."""
    lm = Unigram.fit([*samples, answer], smoothing)
    per, every = [], []
    for s in sentences(answer):
        neg = [-lm.logprob(t) for t in tokens(s)]
        every += neg
        per.append((s, sum(neg) / len(neg) if neg else 0.0, max(neg, default=0.0)))
    avg = sum(every) / len(every) if every else 0.0
    return {
        "sentences": per,
        "avg_neg_logprob": avg,
        "avg_max_neg_logprob": sum(p[2] for p in per) / len(per) if per else 0.0,
        "unigram_score": min(avg / lm.floor(), 1.0) if every else 0.0,
    }


def agreement(answer: str, samples: list[str]) -> float:
    """The share of `samples` whose SQuAD-normalised text (lower case, no punctuation, no
    articles) equals the answer's."""
    if not samples:
        raise UsageError("agreement: no samples to compare with")
    want = normalize_squad(answer)
    return sum(normalize_squad(s) == want for s in samples) / len(samples)


def semantic_check(answer_sentences: list[str], samples: list[str], encode: Encode) -> list[float]:
    """Per answer sentence: 1 - the mean over samples of the best cosine between it and one
    of that sample's sentences (clipped to [0, 1]); a sample with no text counts 0. This is
    SelfCheck-BERTScore's shape with sentence embeddings in place of BERTScore."""
    per_sample = [sentences(s) for s in samples]
    flat = [t for ss in per_sample for t in ss]
    if not answer_sentences:
        return []
    vecs = encode(answer_sentences + flat)
    a, rest = vecs[: len(answer_sentences)], vecs[len(answer_sentences) :]
    sims = (a @ rest.T).clamp(0.0, 1.0) if flat else torch.zeros(len(a), 0)
    best, at = [], 0
    for ss in per_sample:
        block = sims[:, at : at + len(ss)]
        best.append(block.max(dim=1).values if ss else torch.zeros(len(a)))
        at += len(ss)
    return [float(1.0 - x) for x in torch.stack(best, dim=1).mean(dim=1)]


@functools.cache
def _sentence_encoder() -> Encode | None:
    """MiniLM's `encode` (loaded once per process), or None when the package is not
    installed."""
    from lmlab.model.sentence import load_sentence_encoder

    try:
        return load_sentence_encoder().encode
    except UsageError:
        return None


def _messages(question: str | list[dict]) -> list[dict]:
    if isinstance(question, str):
        if not question.strip():
            raise UsageError("the question is empty")
        return [{"role": "user", "content": question}]
    if not question or not all(isinstance(m, dict) and "content" in m for m in question):
        raise UsageError("the question must be text or a list of chat messages")
    return list(question)


def selfcheck(
    backend: Backend,
    question_or_messages: str | list[dict],
    answer: str | None = None,
    n: int = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int | None = 0,
    encode: Encode | str | None = "minilm",
) -> SelfCheck:
    """Score `answer` against `n` answers sampled from `backend` for the same question.
    `answer` None: the backend's own greedy answer is checked. `encode` maps texts to unit
    vectors for the semantic score: "minilm" (the packaged all-MiniLM-L6-v2, skipped when
    not installed), a function, or None (off)."""
    if n < 1:
        raise UsageError(f"--samples {n}: must be at least 1")
    if temperature <= 0:
        raise UsageError(f"temperature {temperature}: sampling needs a temperature above 0")
    conv = _messages(question_or_messages)
    if answer is None:
        answer = backend.chat([conv], greedy(max_new_tokens))[0][0].strip()
    cfg = dataclasses.replace(
        GenerationConfig(),
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    ).validate()
    samples = [s.strip() for s in backend.chat([conv], cfg)[0]]
    uni = unigram_check(answer, samples)
    if isinstance(encode, str):
        if encode != "minilm":
            raise UsageError(f"encode {encode!r}: 'minilm', a function or None")
        encode = _sentence_encoder()
    sem = semantic_check([s for s, _, _ in uni["sentences"]], samples, encode) if encode else []
    checks = [
        SentenceCheck(s, avg, mx, sem[i] if sem else None)
        for i, (s, avg, mx) in enumerate(uni["sentences"])
    ]
    agree = agreement(answer, samples)
    short = len(normalize_squad(answer).split()) <= SHORT_WORDS
    semantic = sum(sem) / len(sem) if sem else None
    if short:
        score, source = 1.0 - agree, "agreement"
    elif semantic is not None:
        score, source = semantic, "semantic"
    else:
        score, source = uni["unigram_score"], "unigram"
    return SelfCheck(
        answer,
        samples,
        checks,
        uni["avg_neg_logprob"],
        uni["avg_max_neg_logprob"],
        uni["unigram_score"],
        agree,
        short,
        semantic,
        score,
        source,
        conv,
    )


# --- retrieval-grounded verification -------------------------------------------------------


@dataclass
class ClaimCheck:
    """One claim and its best evidence among the passages retrieved for it."""

    claim: str
    similarity: float | None  # best cosine to a retrieved sentence (None: no encoder)
    lexical: float | None  # share of its content words in the best passage (None: it has none)
    supported: bool
    evidence: str  # the best-matching retrieved sentence ("" when nothing was retrieved)
    passage: str  # the id of the passage holding it
    passages: list[str] = field(default_factory=list)  # the ids retrieved for the claim


@dataclass
class Grounded:
    """`grounded`'s result: `score` is the share of unsupported claims; `soft_score` is one
    minus the mean of each claim's weaker support (min of similarity and lexical)."""

    answer: str
    claims: list[ClaimCheck]
    score: float
    soft_score: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _support(check: ClaimCheck) -> float:
    parts = [x for x in (check.similarity, check.lexical) if x is not None]
    return min(parts) if parts else 0.0


def grounded(
    index: Index,
    answer: str,
    k: int = 4,
    method: str = "hybrid",
    min_similarity: float = MIN_SIMILARITY,
    min_lexical: float = MIN_LEXICAL,
) -> Grounded:
    """Check each sentence of `answer` against the `k` passages `index` retrieves for it by
    `method`. A claim is supported when its best cosine to a retrieved sentence is at least
    `min_similarity` and at least `min_lexical` of its content words are in the passage
    holding that sentence (a claim without content words is judged by cosine alone)."""
    if k < 1:
        raise UsageError(f"--k {k}: must be at least 1")
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    claims = sentences(answer)
    if not claims:
        raise UsageError("the answer is empty: nothing to check")
    try:
        index.encode(["probe"])
        semantic = True
    except UsageError:  # no sentence encoder installed: lexical support only
        semantic = False
    out = []
    for claim in claims:
        hits = index.search(claim, k, method)
        pieces = [(h.id, h.text, s) for h in hits for s in sentences(h.text)]
        sim, best = None, 0
        if semantic and pieces:
            vecs = index.encode([claim] + [s for _, _, s in pieces])
            sims = (vecs[1:] @ vecs[0]).clamp(0.0, 1.0)
            best = int(sims.argmax())
            sim = float(sims[best])
        elif semantic:
            sim = 0.0
        words = content_words(claim)
        lex = None
        if words:
            held = content_words(pieces[best][1]) if pieces else set()
            lex = len(words & held) / len(words)
        ok = (sim is None or sim >= min_similarity) and (lex is None or lex >= min_lexical)
        ok = ok and bool(pieces)
        pid, evidence = (pieces[best][0], pieces[best][2]) if pieces else ("", "")
        out.append(ClaimCheck(claim, sim, lex, ok, evidence, pid, [h.id for h in hits]))
    score = sum(not c.supported for c in out) / len(out)
    soft = 1.0 - sum(_support(c) for c in out) / len(out)
    return Grounded(answer, out, score, soft)

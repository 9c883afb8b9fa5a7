"""Perplexity under a small reference language model (Zhao et al. §4.1.1 "metric" filters;
Wenzek et al. 2020, CCNet): documents unlike the reference text score high and can be cut.

The reference model is CCNet's kind: a word-level n-gram model with interpolated,
modified Kneser–Ney smoothing (Chen & Goodman 1998; KenLM's estimator), trained here in
numpy so nothing needs compiling or downloading. Word level with an `<unk>` cap, as in
CCNet, rather than bytes: a 4-gram of words sees far more context than one of bytes, and
the vocabulary cap bounds the model's size. Text is lower-cased, digits become 0 (as
CCNet normalises), and every line is a sentence framed by `<s>` … `</s>`.

The trained model is stored in ARPA's backoff form: the interpolated probability of every
seen n-gram and the backoff weight of every context, in sorted arrays keyed by a 64-bit
hash of the n-gram. Scoring a document is then a handful of vector searches per order,
not a Python loop over tokens. An lmlab checkpoint can be the reference model instead.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from lmlab.config import STRICT, PosFloat, PosInt
from lmlab.console import warn
from lmlab.data.contamination import ngram_hashes
from lmlab.errors import UsageError
from lmlab.utils import atomic_path

FORMAT = "lmlab-ngram-lm/1"
UNK, EOS, BOS = 0, 1, 2  # ids of <unk>, </s> and <s>; words follow
SPECIALS = ["<unk>", "</s>", "<s>"]
_NEWLINE = -1
_TOKEN = re.compile(r"\w+|\S|\n")
_DIGITS = str.maketrans("123456789", "000000000")


@dataclass
class PerplexityConfig:
    """Reference model (a saved n-gram model or an lmlab checkpoint, or text to train an
    n-gram model on) and the cut-offs; `keep_percentile` is applied over the corpus."""

    __pydantic_config__ = STRICT

    model: str | None = None
    reference: list[str] | None = None
    order: Annotated[int, Field(ge=2, le=6)] = 4
    vocab_size: PosInt = 50_000
    max_perplexity: PosFloat | None = None
    keep_percentile: Annotated[float, Field(gt=0, le=100)] | None = None
    label_only: bool = False

    def __post_init__(self) -> None:
        if (self.model is None) == (self.reference is None):
            raise UsageError(
                "perplexity: give either `model` (a saved n-gram model or an lmlab "
                "checkpoint) or `reference` (text/JSONL files to train an n-gram model on)"
            )
        for p in [self.model] if self.model else self.reference or []:
            if not Path(p).exists():
                raise UsageError(f"perplexity: {p} does not exist")


def tokens(text: str) -> list[str]:
    """Normalised tokens: lower-case words, digits as 0, single symbols, and newlines."""
    return _TOKEN.findall(text.lower().translate(_DIGITS))


def _frame(ids: np.ndarray) -> np.ndarray:
    """Ids with newline markers → `<s> w … </s> <s> w … </s>` (empty lines dropped)."""
    nl = ids == _NEWLINE
    keep = ~nl
    keep[1:] |= nl[1:] & ~nl[:-1]  # one marker per run of newlines...
    keep &= np.cumsum(~nl) > 0  # ...and none before the first token
    ids, nl = ids[keep], nl[keep]
    if len(ids) and nl[-1]:
        ids, nl = ids[:-1], nl[:-1]
    counts = np.where(nl, 2, 1)
    out = np.repeat(ids, counts)
    at = np.cumsum(counts)[nl] - 2  # each marker became two slots: </s> then <s>
    out[at] = EOS
    out[at + 1] = BOS
    return np.concatenate(([BOS], out, [EOS])).astype(np.int64)


def _positions(seq: np.ndarray) -> np.ndarray:
    """For each slot, how many tokens of its sentence precede it (`<s>` is at 0)."""
    idx = np.arange(len(seq))
    return idx - np.maximum.accumulate(np.where(seq == BOS, idx, 0))


def _end_hashes(seq: np.ndarray, order: int) -> list[np.ndarray]:
    """`h[k][i]` hashes the k-gram ending at slot i (meaningful where position ≥ k − 1)."""
    out = [seq, seq]  # order 1 is looked up by id, not by hash (index 0 is unused)
    for k, h in enumerate(ngram_hashes(seq, order), 1):
        if k > 1:
            out.append(np.concatenate((np.zeros(k - 1, np.uint64), h)))
    return out


def _lookup(keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query in sorted `keys`, and whether it is there."""
    j = np.searchsorted(keys, q)
    j[j == len(keys)] = 0
    return j, keys[j] == q if len(keys) else np.zeros(len(q), bool)


@dataclass
class NGramLM:
    """An interpolated modified Kneser–Ney model in backoff form (see the module doc).

    `keys[k]`, `logp[k]`, `backoff[k]` for k ≥ 2: sorted n-gram hashes, ln p(w | h) and
    ln γ(h w) when `h w` is itself a context; index 1 holds dense arrays over word ids.
    """

    order: int
    vocab: list[str]
    keys: list[np.ndarray]
    logp: list[np.ndarray]
    backoff: list[np.ndarray]
    discounts: list[list[float]] = field(default_factory=list)
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self._ids.pop("<s>", None)  # never read from text
        self._ids["\n"] = _NEWLINE

    def encode(self, text: str) -> np.ndarray:
        toks = tokens(text)
        ids = np.fromiter(map(self._ids.get, toks, repeat(UNK)), np.int64, len(toks))
        return _frame(ids)

    def logprobs(self, seq: np.ndarray, pos: np.ndarray | None = None) -> np.ndarray:
        """ln p of each slot of a framed sequence given its sentence so far (0 at `<s>`).

        `pos[i]` is how many slots before i belong to its sentence (the orders that can
        be used); by default counted from each `<s>`.
        """
        pos = _positions(seq) if pos is None else pos
        # p of the longest seen n-gram ending at each slot, times the backoff weights of
        # the longer contexts that were not seen (ARPA). Orders ascend: a hit at order k
        # replaces the lower estimate, a miss multiplies it by γ of the (k−1)-gram context,
        # which is the order-(k−1) n-gram ending at the slot before, looked up already.
        out = self.logp[1][seq].astype(np.float64)  # 0 at <s>: its slot holds p = 1
        prev_rows = prev_hit = None
        for k, h in enumerate(ngram_hashes(seq, self.order), 1):
            if k == 1:
                continue
            (ends,) = np.nonzero(pos >= k - 1)
            rows, hit = _lookup(self.keys[k], h[ends - (k - 1)])
            if k == 2:
                bo = self.backoff[1][seq[ends - 1]]
            elif len(self.backoff[k - 1]):
                ctx = ends - 1
                bo = np.where(prev_hit[ctx], self.backoff[k - 1][prev_rows[ctx]], 0.0)
            else:  # no (k−1)-grams were seen at all
                bo = 0.0
            seen = self.logp[k][rows] if len(rows) and len(self.keys[k]) else 0.0
            out[ends] = np.where(hit, seen, out[ends] + bo)
            prev_rows = np.zeros(len(seq), np.int64)
            prev_hit = np.zeros(len(seq), bool)
            prev_rows[ends], prev_hit[ends] = rows, hit
        return out

    def perplexity(self, text: str) -> float:
        """exp of the mean negative log-likelihood per token, `</s>` of each line included.

        A text with no tokens is scored as one empty line.
        """
        seq = self.encode(text)
        lp = self.logprobs(seq)
        return math.exp(-float(lp.sum()) / int((seq != BOS).sum()))

    def logprob(self, word: str, context: Sequence[str] = ()) -> float:
        """ln p(word | context), the context being the words before it (`<s>` included
        when it starts a sentence); tests and inspection use this."""
        ids = [BOS if w == "<s>" else self._ids.get(w, UNK) for w in context]
        seq = np.array([*ids, self._ids.get(word, UNK)], np.int64)[-self.order :]
        return float(self.logprobs(seq, np.arange(len(seq)))[-1])

    def save(self, path: str | Path) -> None:
        """One `.npz` (arrays, and the vocabulary and settings as JSON text); no pickle."""
        arrays = {}
        for k in range(1, self.order + 1):
            if k > 1:
                arrays[f"keys{k}"] = self.keys[k]
            arrays[f"logp{k}"] = self.logp[k]
            if k < self.order:
                arrays[f"backoff{k}"] = self.backoff[k]
        meta = {"format": FORMAT, "order": self.order, "discounts": self.discounts}
        arrays["meta"] = np.array(json.dumps(meta))
        arrays["vocab"] = np.array(json.dumps(self.vocab, ensure_ascii=False))
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> NGramLM:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
                n = meta["order"]
                empty = np.zeros(0)
                return cls(
                    order=n,
                    vocab=json.loads(str(z["vocab"])),
                    keys=[empty, empty] + [z[f"keys{k}"] for k in range(2, n + 1)],
                    logp=[empty] + [z[f"logp{k}"] for k in range(1, n + 1)],
                    backoff=[empty] + [z[f"backoff{k}"] for k in range(1, n)] + [empty],
                    discounts=meta["discounts"],
                )
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{path}: not an lmlab n-gram model ({e})") from None


# --- training -------------------------------------------------------------------------


def _discounts(a: np.ndarray) -> np.ndarray:
    """Modified Kneser–Ney discounts D1, D2, D3+ from counts-of-counts (Chen & Goodman).

    Clipped into (0, c] so that every context keeps some mass for lower orders and the
    probabilities still sum to one on tiny corpora, where the estimates break down.
    """
    n1, n2, n3, n4 = (int((a == c).sum()) for c in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    d = np.array(
        [
            1 - 2 * y * n2 / n1 if n1 else 0.5,
            2 - 3 * y * n3 / n2 if n2 else 1.0,
            3 - 4 * y * n4 / n3 if n3 else 1.5,
        ]
    )
    return np.clip(d, [0.05, 0.1, 0.15], [1.0, 2.0, 3.0])


def _discounted(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    return a - d[np.minimum(a, 3) - 1]


def train_ngram(
    texts: Iterable[str], order: int = 4, vocab_size: int = 50_000, max_tokens: int = 50_000_000
) -> NGramLM:
    """Count n-grams of `texts` (read once, as a stream) and estimate the model.

    The vocabulary is the `vocab_size` most frequent words; the rest become `<unk>`.
    Training holds the token ids in memory, so it stops reading after `max_tokens`.
    """
    if not 2 <= order <= 6:
        raise UsageError(f"perplexity.order must be between 2 and 6, got {order}")
    provisional: dict[str, int] = {"\n": _NEWLINE}
    chunks, total = [], 0
    for text in texts:
        toks = tokens(text)
        chunks.append(
            np.fromiter(
                (provisional.setdefault(t, len(provisional) - 1) for t in toks),
                np.int64,
                len(toks),
            )
        )
        total += len(toks)
        if total >= max_tokens:
            warn(f"perplexity: reference text truncated at {total:,} tokens")
            break
    words = [w for w in provisional if w != "\n"]  # provisional id i is words[i]
    if not words:
        raise UsageError("perplexity: the reference text has no words to train on")
    ids = np.concatenate(chunks)
    counts = np.bincount(ids[ids >= 0], minlength=len(words))
    ranked = sorted(range(len(words)), key=lambda i: (-counts[i], words[i]))[:vocab_size]
    remap = np.full(len(words) + 1, UNK, np.int64)  # last slot: the newline marker
    remap[np.array(ranked)] = np.arange(len(SPECIALS), len(SPECIALS) + len(ranked))
    remap[-1] = _NEWLINE
    seq = np.concatenate([_frame(remap[c]) for c in chunks])
    vocab = SPECIALS + [words[i] for i in ranked]
    return _estimate(seq, order, vocab)


def _estimate(seq: np.ndarray, order: int, vocab: list[str]) -> NGramLM:
    """Modified Kneser–Ney estimation on a framed id sequence (see `NGramLM`)."""
    pos = _positions(seq)
    hashes = _end_hashes(seq, order)
    predicted = seq != BOS
    # unique n-grams per order: sorted keys, a representative slot, raw counts
    uniq, rep, raw = [None] * (order + 1), [None] * (order + 1), [None] * (order + 1)
    for k in range(1, order + 1):
        (slots,) = np.nonzero(predicted & (pos >= k - 1))
        uniq[k], first, raw[k] = np.unique(hashes[k][slots], return_index=True, return_counts=True)
        rep[k] = slots[first]
    # adjusted counts: distinct left extensions, except at the top order and for n-grams
    # that start with <s> (nothing can precede them), which keep their raw counts
    adj = [None] * (order + 1)
    adj[order] = raw[order]
    for k in range(order - 1, 0, -1):
        suffix = np.searchsorted(uniq[k], hashes[k][rep[k + 1]])
        a = np.bincount(suffix, minlength=len(uniq[k]))
        starts_sentence = pos[rep[k]] == k - 1
        if k > 1:
            a[starts_sentence] = raw[k][starts_sentence]
        adj[k] = a

    def entry(k: int, slots: np.ndarray) -> np.ndarray:
        """Row of the k-gram ending at each slot in order k's arrays (ids at order 1)."""
        return seq[slots] if k == 1 else np.searchsorted(uniq[k], hashes[k][slots])

    V = len(vocab)
    keys = [np.zeros(0, np.uint64)] * 2
    logp = [np.zeros(0)]
    backoff = [np.zeros(0)]
    discounts = []
    # order 1: dense over ids, interpolated with the uniform distribution over V − 1 words
    # (everything but <s>, which is never predicted)
    a1 = np.zeros(V, np.int64)
    a1[uniq[1].astype(np.int64)] = adj[1]
    d = _discounts(adj[1])
    discounts.append(d.tolist())
    total = a1.sum()
    gamma = (d[0] * (a1 == 1).sum() + d[1] * (a1 == 2).sum() + d[2] * (a1 >= 3).sum()) / total
    p1 = np.where(a1 > 0, _discounted(np.maximum(a1, 1), d), 0.0) / total + gamma / (V - 1)
    p1[BOS] = 1.0  # placeholder, never used
    prob_prev = p1
    logp.append(np.log(p1).astype(np.float32))
    backoff.append(np.zeros(V, np.float32))
    for k in range(2, order + 1):
        a = adj[k]
        d = _discounts(a)
        discounts.append(d.tolist())
        ctx = entry(k - 1, rep[k] - 1)  # the (k−1)-gram before each n-gram's last word
        ctx_u, inv = np.unique(ctx, return_inverse=True)
        s = np.bincount(inv, weights=a)
        mass = np.bincount(inv, weights=d[np.minimum(a, 3) - 1])
        gamma = mass / s
        lower = prob_prev[entry(k - 1, rep[k])]  # p of the n-gram without its first word
        p = _discounted(a, d) / s[inv] + gamma[inv] * lower
        # each context's backoff weight is stored on its own (k−1)-gram entry
        backoff[k - 1][ctx_u] = np.log(gamma).astype(np.float32)
        keys.append(uniq[k])
        logp.append(np.log(p).astype(np.float32))
        backoff.append(np.zeros(len(uniq[k]), np.float32))
        prob_prev = p
    backoff[order] = np.zeros(0, np.float32)
    return NGramLM(order, vocab, keys, logp, backoff, discounts)


# --- reference text, checkpoints, and the step's entry points -------------------------


def read_reference(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts of reference files: JSONL (`text` field, `.gz` too) or plain text, or
    directories of them; unreadable files and bad lines are skipped with a warning."""
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"perplexity.reference: {p} does not exist")
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            if f.name.endswith((".jsonl", ".jsonl.gz")):
                opener = gzip.open if f.suffix == ".gz" else open
                with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
                    for lineno, line in enumerate(fh, 1):
                        try:
                            text = json.loads(line)["text"] if line.strip() else None
                        except (json.JSONDecodeError, TypeError, KeyError):
                            warn(f"{f}:{lineno}: not a JSON object with a `text`, skipped")
                            continue
                        if isinstance(text, str):
                            yield text
            else:
                try:
                    yield f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError) as e:
                    warn(f"{f}: cannot read as UTF-8 text ({e}), skipped")


def checkpoint_scorer(path: str | Path, device: str = "cpu") -> Callable[[str], float]:
    """`text -> perplexity per token` under an lmlab (or Hugging Face) checkpoint.

    The text is framed as in token shards (`<|endoftext|>` before and after) and cut into
    windows of the model's context length that overlap by one token, so every token but
    the first is predicted once. The model reads each whole window (its last token has
    no target); a short last window is padded.
    """
    from lmlab.model.loading import load_model
    from lmlab.model.scoring import IGNORE, score
    from lmlab.tokenizer import EOS as EOS_TOKEN
    from lmlab.tokenizer import load_tokenizer, special_id

    model = load_model(path, device)
    tok = load_tokenizer(path)
    eos = special_id(tok, EOS_TOKEN)
    cfg = getattr(model, "cfg", None)
    max_len = cfg.max_seq_len if cfg is not None else model.config.max_position_embeddings

    def rows(ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(ids) - 1, max_len - 1):
            w = ids[s : s + max_len]
            yield w, np.append(w[1:], IGNORE)

    def perplexity(text: str) -> float:
        ids = np.array([eos, *tok.encode(text).ids, eos], dtype=np.int64)
        return score(model, rows(ids), 16, device=device, per_row=True, pad_id=eos).perplexity

    return perplexity


def prepare_model(cfg: PerplexityConfig, out: str | Path) -> str:
    """The model the step scores with: `cfg.model` as given, or an n-gram model trained on
    `cfg.reference` and saved at `out` (`.npz`). Returns its path for `load_scorer`."""
    if cfg.model is not None:
        return str(cfg.model)
    lm = train_ngram(read_reference(cfg.reference or []), cfg.order, cfg.vocab_size)
    path = Path(out).with_suffix(".npz")
    lm.save(path)
    return str(path)


def load_scorer(path: str | Path) -> Callable[[str], float]:
    """A saved n-gram model file, or an lmlab checkpoint / run directory."""
    p = Path(path)
    if p.is_file():
        return NGramLM.load(p).perplexity
    return checkpoint_scorer(p)


def percentile_cutoff(scores: np.ndarray, keep_percentile: float) -> float:
    """The perplexity at or below which `keep_percentile`% of the documents lie.

    The smallest observed score whose share of scores at or below it reaches the
    percentile (numpy's `inverted_cdf`), so at least that share is kept; non-finite
    scores are ignored, and with none left every document is kept (infinity).
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return math.inf
    return float(np.percentile(s, keep_percentile, method="inverted_cdf"))

"""In-context learning's choices (Zhao et al. §6.2): which demonstrations, in which order,
and how to correct the label bias of the prompt they make.

- Selection (`select_demos`): `random`; `bm25` (the pool's best BM25 matches for the
  query); `knn`, KATE (Liu et al. 2022): the nearest neighbours of the query in a
  sentence encoder's space (all-MiniLM-L6-v2 by default); `mmr`, maximal marginal
  relevance (Carbonell & Goldstein 1998): greedily the candidate that maximises
  λ·sim(query, d) − (1 − λ)·max sim(d, chosen), relevant yet unlike the ones chosen.
- Order (`order_demos`): `random`; `similarity`, least similar first so that the most
  similar demonstration stands next to the query (KATE's reversed order); and
  `entropy`, Lu et al. 2022's GlobalE: among candidate orderings, the one whose
  predicted labels over a probe set are the most balanced (highest entropy), since the
  orderings that fail are the ones that collapse onto one label. The probe set can be
  unlabelled inputs the user has, or, as Lu et al. build it, inputs the model writes
  itself after the demonstrations (`generated_probe`), so no data is spent on it.
- Calibration (`contextual_calibration`), Zhao et al. 2021: the label probabilities the
  prompt gives a content-free input ("N/A") estimate its bias; each prediction is
  divided by them (W = diag(p_cf)⁻¹) and renormalised.

Scoring labels goes through a backend's `logprobs` (`lmlab.prompt.backend`), so the
same code runs on a local model or a served one."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmlab.errors import UsageError

SELECTORS = ("random", "bm25", "knn", "mmr")
ORDERS = ("random", "similarity", "entropy")
CONTENT_FREE = "N/A"


@functools.cache
def _default_encoder():
    from lmlab.model.sentence import load_sentence_encoder

    return load_sentence_encoder()


def _embed(texts: list[str], encoder) -> torch.Tensor:
    return (encoder or _default_encoder()).encode(texts)


@functools.lru_cache(maxsize=8)
def pool_index(pool: tuple[str, ...], method: str):
    """A pool's embeddings (knn, mmr) or BM25 index (bm25), kept for the next query on the
    same pool (an evaluation asks once per document)."""
    if method == "bm25":
        from lmlab.prompt.retrieval import build_bm25

        return build_bm25(list(pool))
    return _embed(list(pool), None)


def select_demos(
    query: str,
    pool: Sequence[str],
    k: int,
    method: str = "random",
    seed: int = 0,
    encoder=None,
    lam: float = 0.5,
    pool_vectors: torch.Tensor | None = None,
    pool_bm25=None,
) -> list[int]:
    """Indices of `k` demonstrations from `pool` for `query`, best first (random: drawn).
    `pool_vectors` (the pool's embeddings) and `pool_bm25` (its BM25 index) are reused
    across queries when given."""
    if method not in SELECTORS:
        raise UsageError(f"demo selection {method!r}: choose one of {', '.join(SELECTORS)}")
    if not 0 <= k <= len(pool):
        raise UsageError(f"{k} demonstrations asked for, the pool has {len(pool)}")
    if k == 0:
        return []
    if method == "random":
        return [int(i) for i in np.random.default_rng(seed).choice(len(pool), k, replace=False)]
    if method == "bm25":
        index = pool_bm25 if pool_bm25 is not None else pool_index(tuple(pool), "bm25")
        scores = np.asarray(index.get_scores(_query_words(query)))
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
    if pool_vectors is None:
        pool_vectors = pool_index(tuple(pool), method) if encoder is None else encoder.encode(pool)
    vecs = pool_vectors
    q = _embed([query], encoder)[0]
    sims = vecs @ q
    if method == "knn":
        return [int(i) for i in torch.argsort(sims, descending=True, stable=True)[:k]]
    chosen: list[int] = []  # MMR
    left = set(range(len(pool)))
    while len(chosen) < k:
        redundancy = (vecs @ vecs[chosen].T).max(-1).values if chosen else torch.zeros(len(pool))
        gain = lam * sims - (1 - lam) * redundancy
        best = max(left, key=lambda i: (float(gain[i]), -i))
        chosen.append(best)
        left.remove(best)
    return chosen


def _query_words(query: str) -> list[str]:
    """bm25s's tokens of one query, as `BM25.get_scores` takes them."""
    import bm25s

    return bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]


def label_probs(backend, prompts: list[str], label_words: Sequence[str]) -> np.ndarray:
    """[prompts, labels]: each label word's probability after each prompt, normalised
    over the labels (from the backend's log-probabilities)."""
    pairs = [(p, w) for p in prompts for w in label_words]
    lps = np.asarray(backend.logprobs(pairs), dtype=np.float64).reshape(len(prompts), -1)
    lps -= lps.max(-1, keepdims=True)
    p = np.exp(lps)
    return p / p.sum(-1, keepdims=True)


def contextual_calibration(probs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Zhao et al. 2021: W = diag(p_cf)⁻¹, b = 0; q = softmax-free renormalisation of W p."""
    q = probs / np.clip(content_free, 1e-12, None)
    return q / q.sum(-1, keepdims=True)


def order_demos(
    demos: list[int],
    method: str = "random",
    seed: int = 0,
    similarity: Sequence[float] | None = None,
    probe: Callable[[list[int]], np.ndarray] | None = None,
    candidates: int = 8,
) -> list[int]:
    """`demos` reordered. `similarity[i]` is demo i's similarity to the query (for
    "similarity"); `probe(order)` gives the predicted label probabilities [probes,
    labels] over a probe set under that order (for "entropy")."""
    if method not in ORDERS:
        raise UsageError(f"demo order {method!r}: choose one of {', '.join(ORDERS)}")
    rng = np.random.default_rng(seed)
    if method == "random":
        return [demos[i] for i in rng.permutation(len(demos))]
    if method == "similarity":
        if similarity is None:
            raise UsageError("order by similarity needs the demonstrations' similarities")
        return [d for _, d in sorted(zip(similarity, demos, strict=True), key=lambda x: x[0])]
    if probe is None:
        raise UsageError("order by entropy needs a probe set")
    seen, best, best_h = set(), list(demos), -1.0
    for _ in range(candidates):
        order = [demos[i] for i in rng.permutation(len(demos))]
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        h = global_entropy(probe(order))
        if h > best_h:
            best, best_h = order, h
    return best


def global_entropy(probs: np.ndarray) -> float:
    """GlobalE: the entropy of the histogram of predicted labels over the probe set."""
    counts = np.bincount(probs.argmax(-1), minlength=probs.shape[-1]).astype(float)
    share = counts / counts.sum()
    return float(-sum(p * math.log(p) for p in share if p > 0))


def generated_probe(
    backend,
    demonstrations: str,
    input_prefix: str,
    n: int,
    seed: int = 0,
    max_new_tokens: int = 48,
) -> list[str]:
    """Lu et al. 2022's probe set: `n` inputs sampled from the model itself (temperature
    1) after the demonstrations and the input's prefix (e.g. "Review:"), each cut at its
    first line break; empty and repeated ones are dropped, so fewer than `n` may come
    back. Labels play no part: the probe only asks which labels an ordering predicts."""
    from lmlab.infer.options import GenerationConfig

    if n < 1:
        raise UsageError(f"probe: n must be >= 1, got {n}")
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=seed, stop_strings=["\n"]
    ).validate()
    outs = backend.complete([demonstrations + input_prefix], cfg)[0]
    probe = [o.split("\n")[0].strip() for o in outs]
    return list(dict.fromkeys(p for p in probe if p))

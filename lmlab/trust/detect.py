"""Detecting generated text without a watermark: zero-shot scores from the likelihood a
language model gives the text, and their AUROC on human against machine text.

Each text is tokenized without special tokens, cut to its first `max_tokens` tokens and
scored after the end-of-text token (what an empty context is conditioned on in
`lmlab.prompt.likelihood`), so its first token is scored too. Higher always means "more
likely machine":

- `loglik`: the mean token log-likelihood, (1/T) sum_t log p(x_t | x_<t). A model's own
  text sits where the model puts its mass.
- `logrank`: minus the mean log-rank, -(1/T) sum_t log r_t, where r_t is 1 + the number
  of vocabulary entries whose logit is above x_t's (the log-rank baseline of Mitchell et
  al. 2023, after GLTR, Gehrmann et al. 2019). Sampling rarely strays far down the ranking,
  even where the top choice is not sure.
- `curvature`: DetectGPT's normalised perturbation discrepancy (Mitchell et al. 2023, the
  "z" variant), (loglik(x) - mean_i loglik(x~_i)) / std_i loglik(x~_i) over n perturbed
  copies x~_i of x (population std, 1 where it is 0). Machine text sits near a local
  maximum of log p, so perturbing it costs more likelihood than perturbing human text.

The perturbations are NOT DetectGPT's: there, T5 rewrites masked spans of words into
fluent alternatives. lmlab has no mask-filling model, so its own seeded character-level
noise from `lmlab.eval.perturb` stands in (typos by default: letters swapped, dropped or
doubled; or case flips, extra whitespace). Those copies are not fluent text, so the
curvature measures how sharply the likelihood falls under noise rather than along
plausible rewrites, and it is expected to be weaker than the paper's.

One forward per text gives both `loglik` and `logrank`; `curvature` adds one forward per
perturbed copy. Rows run longest first in right-padded batches (a causal row never sees
the padding behind it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmlab.errors import UsageError
from lmlab.eval.perturb import Perturbation, perturb_text
from lmlab.model.scoring import logits_tensor

METHODS = ("loglik", "logrank", "curvature")
DEFAULT_PERTURBATION = Perturbation("typos", 0.03)  # ~13% of words touched, as T5's ~15%


@dataclass
class TextScore:
    """One text's scores (higher: more likely machine); `curvature` is None unless asked."""

    tokens: int
    loglik: float
    logrank: float
    curvature: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods, validated (UsageError naming what is allowed)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"detect-generated: unknown method {', '.join(bad) or '(none)'}; "
            f"allowed: {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(methods))


def _context_id(tok) -> int:
    from lmlab.prompt.likelihood import prefix_token

    return prefix_token(tok)


def _max_len(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "max_seq_len", 0) or 1 << 30)


def encode(tok, text: str, max_tokens: int = 200) -> list[int]:
    """The first `max_tokens` token ids of `text`, without special tokens."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("detect-generated: empty text")
    if max_tokens < 1:
        raise UsageError("detect-generated: --tokens must be at least 1")
    ids = tok.encode(text, add_special_tokens=False).ids[:max_tokens]
    if not ids:
        raise UsageError(f"detect-generated: no tokens in {text[:40]!r}")
    return ids


@torch.no_grad()
def token_scores(
    model, rows: Sequence[Sequence[int]], context_id: int, batch_size: int = 8
) -> list[tuple[float, float]]:
    """(mean log-likelihood, mean log-rank) of each row of token ids, every token scored
    after `context_id` and the tokens before it; a row longer than the model's context
    keeps its first tokens. The rank counts the logits strictly above the target's, over
    every logit the model outputs (the softmax's support)."""
    cfg = getattr(model, "cfg", None)
    family = getattr(cfg, "family", "decoder")
    if family == "encoder_decoder":
        raise UsageError("detect-generated: needs a decoder-only model, not encoder_decoder")
    limit = _max_len(model) - 1
    rows = [list(r)[:limit] for r in rows]
    if any(not r for r in rows):
        raise UsageError("detect-generated: a text has no tokens to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = len(rows[idx[0]])
        ids = torch.full((len(idx), width + 1), context_id, dtype=torch.long)
        tgt = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, 1 : len(rows[i]) + 1] = torch.tensor(rows[i])
            tgt[r, : len(rows[i])] = torch.tensor(rows[i])
        kwargs = {}
        if family == "prefix":  # only the context token is prefix: the text stays causal
            kwargs["prefix_len"] = torch.ones(len(idx), dtype=torch.long, device=device)
        logits = logits_tensor(model(ids[:, :-1].to(device), **kwargs)).float()
        tgt = tgt.to(device)
        picked = logits.gather(-1, tgt[..., None])
        lp = picked[..., 0] - logits.logsumexp(-1)
        rank = 1 + (logits > picked).sum(-1)
        for r, i in enumerate(idx):
            n = len(rows[i])
            out[i] = (
                float(lp[r, :n].double().mean()),
                float(rank[r, :n].double().log().mean()),
            )
    model.train(was_training)
    return out


def perturbations_of(
    text: str, n: int, perturbation: Perturbation = DEFAULT_PERTURBATION, seed: int = 0
) -> list[str]:
    """`n` seeded perturbed copies of `text` (copy j draws with seed "seed|j"). A copy
    the noise left unchanged is drawn again with another seed, at most 10 times."""
    out = []
    for j in range(n):
        copy = text
        for attempt in range(10):
            copy = perturb_text(text, perturbation, seed=f"{seed}|{j}|{attempt}")
            if copy != text:
                break
        out.append(copy)
    return out


def curvature_z(loglik: float, perturbed: Sequence[float]) -> float:
    """DetectGPT's normalised discrepancy: (loglik - mean) / std of the perturbed copies'
    log-likelihoods (population std, as the paper's code; 1 where it is 0)."""
    p = np.asarray(perturbed, dtype=np.float64)
    std = float(p.std()) if len(p) > 1 else 0.0
    return (loglik - float(p.mean())) / (std if std > 0 else 1.0)


def score_texts(
    model,
    tok,
    texts: Sequence[str],
    methods: Sequence[str] = ("loglik", "logrank"),
    max_tokens: int = 200,
    perturbations: int = 10,
    perturbation: Perturbation = DEFAULT_PERTURBATION,
    seed: int = 0,
    batch_size: int = 8,
) -> list[TextScore]:
    """Scores of each text (its first `max_tokens` tokens) under `model`.

    With "curvature" in `methods`, each truncated text (decoded back from its tokens) gets
    `perturbations` copies from `perturbation`; a copy is scored whole (up to the model's
    context), since noise splits words into more tokens."""
    methods = check_methods(methods)
    ctx = _context_id(tok)
    if max_tokens < 1:
        raise UsageError("detect-generated: --tokens must be at least 1")
    limit = min(max_tokens, _max_len(model) - 1)  # the context token takes one position
    rows = [encode(tok, t, limit) for t in texts]
    base = token_scores(model, rows, ctx, batch_size)
    scores = [TextScore(len(r), ll, -lr) for r, (ll, lr) in zip(rows, base, strict=True)]
    if "curvature" not in methods:
        return scores
    if perturbations < 1:
        raise UsageError("detect-generated: curvature needs --perturbations of at least 1")
    copies: list[list[int]] = []
    for i, r in enumerate(rows):
        cut = tok.decode(r, skip_special_tokens=False)
        for c in perturbations_of(cut, perturbations, perturbation, seed * 1_000_003 + i):
            copies.append(tok.encode(c, add_special_tokens=False).ids or r)
    lls = [ll for ll, _ in token_scores(model, copies, ctx, batch_size)]
    for i, s in enumerate(scores):
        s.curvature = curvature_z(s.loglik, lls[i * perturbations : (i + 1) * perturbations])
    return scores


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of `scores` for labels 1 (positive: machine) against 0:
    the Mann-Whitney U statistic over all (positive, negative) pairs, a tie counting 1/2,
    divided by the number of pairs; computed from mid-ranks in O(n log n)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise UsageError("auroc: scores and labels must be two lists of the same length")
    if not np.isin(y, (0, 1)).all():
        raise UsageError("auroc: labels must be 0 (human) or 1 (machine)")
    if np.isnan(s).any():
        raise UsageError("auroc: a score is NaN")
    n1 = int((y == 1).sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        raise UsageError("auroc: needs at least one text of each label (0 human, 1 machine)")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # each run of equal scores gets the mean of the 1-based ranks it spans
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2
    u = ranks[y == 1].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def evaluate(
    model,
    tok,
    texts: Sequence[str],
    labels: Sequence[int],
    methods: Sequence[str] = METHODS,
    **kwargs,
) -> dict:
    """{"n", "machine", "human", "auroc": {method: AUROC}, "scores": [per text]} for
    labelled texts (1 machine, 0 human); `kwargs` go to `score_texts`."""
    methods = check_methods(methods)
    if len(texts) != len(labels):
        raise UsageError("detect-generated: one label per text")
    auroc([0.0] * len(labels), labels)  # check the labels before any forward
    scores = score_texts(model, tok, texts, methods, **kwargs)
    result = {m: auroc([getattr(s, m) for s in scores], labels) for m in methods}
    n1 = int(sum(1 for y in labels if y == 1))
    return {
        "n": len(labels),
        "machine": n1,
        "human": len(labels) - n1,
        "auroc": result,
        "scores": [s.as_dict() for s in scores],
    }

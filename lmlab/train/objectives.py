"""Pre-training objectives (Zhao et al. §4.3.1): language modelling, prefix LM, denoising.

Each builder turns a block of token windows (`rows` [B, L], L = seq_len + 1, cut from the
token shards) into a `Batch`, so the training loop never branches on the objective:

- `causal`: next-token prediction on every position (GPT);
- `prefix`: a random split per row; attention is bidirectional over the prefix and the
  loss covers only the suffix (prefix decoders: GLM, U-PaLM's prefix mode);
- `span`: T5 span corruption. Noise spans are cut out and replaced by sentinels; the model
  writes back each sentinel followed by the tokens it hides. Encoder-decoders read the
  corrupted text in the encoder; decoders read it as a prefix and generate the answer
  after it (decoder-only denoising, as UL2 and GLM do).

`make_batch` mixes them UL2-style: one objective per batch, drawn by weight from the
batch's own generator, so a given (seed, step) always makes the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

from lmlab.config import STRICT, Fraction, NonNegFloat, PosFloat, PosInt
from lmlab.errors import UsageError
from lmlab.train.batch import Batch

OBJECTIVES = ("causal", "prefix", "span")
FAMILIES = ("decoder", "prefix", "encoder_decoder")
SENTINEL = "<extra_id_{}>"  # T5's names; <extra_id_0> marks the first span


@dataclass
class ObjectiveConfig:
    """Mixture weights (normalised; at least one > 0) and each objective's settings."""

    __pydantic_config__ = STRICT

    causal: NonNegFloat = 1.0
    prefix: NonNegFloat = 0.0
    span: NonNegFloat = 0.0
    noise_density: PosFloat = 0.15  # share of tokens corrupted (T5)
    mean_span_length: PosFloat = 3.0  # mean length of a noise span (T5)
    sentinels: PosInt = 100  # sentinel tokens added to the tokenizer (T5 has 100)
    prefix_min: Fraction = 0.1  # the prefix LM's split point, as a share of seq_len
    prefix_max: Fraction = 0.9

    def __post_init__(self) -> None:
        # the annotated ranges hold when a recipe is validated; direct construction is
        # checked here as well, with the cross-field rules
        for name in OBJECTIVES:
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise UsageError(f"objective.{name}={w}: a mixture weight must be >= 0")
        if sum(getattr(self, n) for n in OBJECTIVES) <= 0:
            raise UsageError(
                "objective: the weights causal, prefix and span are all 0; give one a weight > 0"
            )
        if not 0 < self.noise_density < 1:
            raise UsageError(
                f"objective.noise_density={self.noise_density}: must be between 0 and 1 (exclusive)"
            )
        if not self.mean_span_length >= 1:
            raise UsageError(
                f"objective.mean_span_length={self.mean_span_length}: must be >= 1 (tokens)"
            )
        if self.sentinels < 1:
            raise UsageError(f"objective.sentinels={self.sentinels}: must be >= 1")
        if not 0 <= self.prefix_min <= self.prefix_max <= 1:
            raise UsageError(
                f"objective.prefix_min={self.prefix_min}, prefix_max={self.prefix_max}: "
                "need 0 <= prefix_min <= prefix_max <= 1"
            )

    @property
    def weights(self) -> dict[str, float]:
        """The normalised mixture, objectives with weight 0 left out."""
        total = sum(getattr(self, n) for n in OBJECTIVES)
        return {n: getattr(self, n) / total for n in OBJECTIVES if getattr(self, n) > 0}


def needs_sentinels(cfg: ObjectiveConfig) -> bool:
    return cfg.span > 0


def add_sentinels(tok: Tokenizer, n: int) -> list[int]:
    """Add `<extra_id_0>` … `<extra_id_{n-1}>` as special tokens (those already present are
    kept) and return their ids in order. New ids land above the existing vocabulary, so the
    model's vocab_size must grow to cover them."""
    names = [SENTINEL.format(i) for i in range(n)]
    missing = [name for name in names if tok.token_to_id(name) is None]
    if missing:
        tok.add_special_tokens(
            [AddedToken(name, special=True, normalized=False) for name in missing]
        )
    return [tok.token_to_id(name) for name in names]


# --- span corruption ---------------------------------------------------------------------


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length`, as T5 computes them.

    Noise is round(length·density) kept within [1, length−1]; spans round(noise/mean), at
    least 1, and at most the non-noise tokens (each noise span follows a non-noise one)."""
    if length < 2:
        raise UsageError(f"span corruption needs at least 2 tokens, got {length}")
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(1, round(noise / mean_span_length))
    return noise, min(spans, length - noise)


def span_lengths(length: int, cfg: ObjectiveConfig) -> tuple[int, int]:
    """(encoder, decoder) lengths after corrupting `length` tokens, EOS included: T5's
    `compute_input_and_target_lengths` (inputs = length − noise + spans + 1, targets =
    noise + spans + 1)."""
    noise, spans = span_counts(length, cfg.noise_density, cfg.mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def decoder_span_tokens(window: int, cfg: ObjectiveConfig) -> int:
    """How many tokens of a window of `window` (= seq_len + 1) a decoder-only span batch
    corrupts: the most whose `corrupted + target` sequence, less its last token, fits in
    seq_len (the extra sentinels and EOSs displace text, as T5 sizes its inputs)."""
    for m in range(window, 1, -1):
        enc, dec = span_lengths(m, cfg)
        if enc + dec - 1 <= window - 1:
            return m
    raise UsageError(f"pretrain.seq_len={window - 1} is too short for decoder-only span corruption")


def _segment_lengths(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of n_items into n_segments positive parts: cut at
    n_segments−1 distinct gaps (T5 shuffles a cut indicator, the same distribution)."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def random_spans_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: bool [length], True on the tokens to corrupt.

    Exactly `span_counts` noise tokens in that many spans; non-noise and noise segments
    alternate, starting with non-noise (so the mask ends with noise), and both partitions
    are drawn uniformly."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    noise_len = _segment_lengths(noise, spans, rng)
    keep_len = _segment_lengths(length - noise, spans, rng)
    lengths = np.stack([keep_len, noise_len], axis=1).ravel()
    return np.repeat(np.tile([False, True], spans), lengths)


def corrupt_spans(
    tokens: np.ndarray, mask: np.ndarray, sentinel_ids: list[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted inputs, targets) for tokens/mask [B, n] with the same counts in each row.

    inputs: every noise span replaced by its sentinel (i-th span → sentinel i), then EOS;
    targets: each span's sentinel followed by the span's tokens, then EOS."""
    b = tokens.shape[0]
    start = mask.copy()
    start[:, 1:] &= ~mask[:, :-1]
    span_idx = np.maximum(np.cumsum(start, axis=1) - 1, 0)
    sentinel = np.asarray(sentinel_ids, dtype=np.int64)[span_idx]
    # slot 0 of each position holds the sentinel a span opens with, slot 1 the token itself
    pair = np.stack([sentinel, tokens], axis=2)
    keep_in = np.stack([start, ~mask], axis=2)
    keep_out = np.stack([start, mask], axis=2)
    n_in, n_out = keep_in.sum(axis=(1, 2)), keep_out.sum(axis=(1, 2))
    assert (n_in == n_in[0]).all() and (n_out == n_out[0]).all(), "rows differ in span counts"
    eos = np.full((b, 1), eos_id, dtype=np.int64)
    inputs = np.concatenate([pair[keep_in].reshape(b, -1), eos], axis=1)
    targets = np.concatenate([pair[keep_out].reshape(b, -1), eos], axis=1)
    return inputs, targets


# --- batch builders ----------------------------------------------------------------------


def _rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise UsageError(f"objective: token windows must be [batch, >= 2], got {rows.shape}")
    return rows


def _doc_ids(doc_ids: np.ndarray | None, rows: np.ndarray) -> torch.Tensor | None:
    if doc_ids is None:
        return None
    d = np.asarray(doc_ids, dtype=np.int64)
    if d.shape != rows.shape:
        raise UsageError(f"objective: doc_ids {d.shape} must match the windows {rows.shape}")
    return torch.from_numpy(d[:, :-1].copy())


def causal_batch(rows: np.ndarray, doc_ids: np.ndarray | None = None) -> Batch:
    """Next-token prediction everywhere: inputs rows[:, :-1], targets rows[:, 1:].

    The shards put an EOS between documents, so the last token of a document predicts the
    EOS that ends it; `doc_ids` [B, L] (optional) keeps attention inside each document."""
    rows = _rows(rows)
    t = torch.from_numpy(rows)
    return Batch(t[:, :-1], t[:, 1:], doc_ids=_doc_ids(doc_ids, rows))


def prefix_split(seq_len: int, cfg: ObjectiveConfig) -> tuple[int, int]:
    """The range [lo, hi] the prefix length is drawn from, uniformly: prefix_min·seq_len to
    prefix_max·seq_len, kept within [1, seq_len] so prefix and suffix are never empty."""
    eps = 1e-9  # 0.3·10 is 3.0000000000000004 in floating point
    lo = min(max(1, math.ceil(cfg.prefix_min * seq_len - eps)), seq_len)
    hi = max(lo, min(seq_len, math.floor(cfg.prefix_max * seq_len + eps)))
    return lo, hi


def prefix_batch(
    rows: np.ndarray,
    rng: np.random.Generator,
    cfg: ObjectiveConfig,
    doc_ids: np.ndarray | None = None,
) -> Batch:
    """Prefix LM: per row a split p (`prefix_split`); the window's first p tokens are the
    prefix, the rest the suffix. inputs rows[:, :-1] with `prefix_len = p` (those p
    positions attend both ways); targets rows[:, 1:], -100 at positions < p−1, so the loss
    covers exactly the suffix tokens rows[:, p:] (position p−1, the last prefix token,
    predicts the first suffix token; it cannot see it, the prefix ends before it)."""
    rows = _rows(rows)
    seq_len = rows.shape[1] - 1
    lo, hi = prefix_split(seq_len, cfg)
    p = rng.integers(lo, hi + 1, size=rows.shape[0])
    targets = rows[:, 1:].copy()
    targets[np.arange(seq_len)[None, :] < (p - 1)[:, None]] = -100
    t = torch.from_numpy(rows)
    return Batch(
        t[:, :-1],
        torch.from_numpy(targets),
        doc_ids=_doc_ids(doc_ids, rows),
        prefix_len=torch.from_numpy(p.astype(np.int64)),
    )


def span_batch(
    rows: np.ndarray,
    rng: np.random.Generator,
    cfg: ObjectiveConfig,
    sentinel_ids: list[int],
    family: str,
    eos_id: int,
    decoder_start_id: int,
) -> Batch:
    """T5 span corruption (`corrupt_spans`), laid out for the model family.

    - encoder_decoder: the whole window is corrupted; `inputs` (encoder) are the corrupted
      text + EOS, `targets` the sentinels with their spans + EOS, and `decoder_inputs` the
      targets shifted right behind `decoder_start_id`. Lengths: `span_lengths(L, cfg)`.
    - decoder / prefix: the first `decoder_span_tokens(L, cfg)` tokens are corrupted and
      the sequence `corrupted + targets` is trained as a prefix LM: `prefix_len` =
      len(corrupted), loss only on the targets. (A `decoder` model ignores prefix_len and
      reads the corrupted part causally.)

    Every row has the same lengths (the counts depend only on the window length), so no
    padding is needed. Document boundaries are not kept: spans may cross them, as in T5."""
    rows = _rows(rows)
    b, window = rows.shape
    n = window if family == "encoder_decoder" else decoder_span_tokens(window, cfg)
    _, spans = span_counts(n, cfg.noise_density, cfg.mean_span_length)
    _check_sentinels(spans, n, cfg, sentinel_ids)
    mask = np.stack(
        [random_spans_mask(n, cfg.noise_density, cfg.mean_span_length, rng) for _ in range(b)]
    )
    inputs, targets = corrupt_spans(rows[:, :n], mask, sentinel_ids, eos_id)
    if family == "encoder_decoder":
        start = np.full((b, 1), decoder_start_id, dtype=np.int64)
        decoder_inputs = np.concatenate([start, targets[:, :-1]], axis=1)
        return Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            decoder_inputs=torch.from_numpy(decoder_inputs),
        )
    n_in = inputs.shape[1]
    seq = np.concatenate([inputs, targets], axis=1)
    labels = seq[:, 1:].copy()
    labels[:, : n_in - 1] = -100
    return Batch(
        torch.from_numpy(seq[:, :-1].copy()),
        torch.from_numpy(labels),
        prefix_len=torch.full((b,), n_in, dtype=torch.int64),
    )


def _check_sentinels(spans: int, n: int, cfg: ObjectiveConfig, sentinel_ids: list[int]) -> None:
    have = min(cfg.sentinels, len(sentinel_ids))
    if spans > have:
        raise UsageError(
            f"pretrain.objective: span corruption of {n} tokens makes {spans} noise spans but "
            f"only {have} sentinels are available; raise objective.sentinels (and add that "
            "many to the tokenizer) or objective.mean_span_length"
        )


# --- the mixture -------------------------------------------------------------------------


def check_objective(
    cfg: ObjectiveConfig,
    family: str,
    window: int | None = None,
    sentinel_ids: list[int] | None = None,
) -> None:
    """Raise UsageError when the family cannot train an objective with weight > 0, or (given
    the window length L = seq_len + 1 and the sentinel ids) when spans outnumber sentinels.
    Called by `make_batch`; call it once before training to fail early."""
    if family not in FAMILIES:
        raise UsageError(f"model.family={family!r}: allowed {', '.join(FAMILIES)}")
    if family == "encoder_decoder" and (cfg.causal > 0 or cfg.prefix > 0):
        raise UsageError(
            "pretrain.objective: family encoder_decoder trains only with the span objective; "
            "set objective.causal: 0, objective.prefix: 0 and objective.span > 0"
        )
    if family == "decoder" and cfg.prefix > 0:
        raise UsageError(
            "pretrain.objective.prefix > 0 needs a prefix decoder (a causal decoder cannot "
            "attend both ways over the prefix): set model.family: prefix, or objective.prefix: 0"
        )
    if cfg.span > 0 and window is not None and sentinel_ids is not None:
        n = window if family == "encoder_decoder" else decoder_span_tokens(window, cfg)
        _check_sentinels(
            span_counts(n, cfg.noise_density, cfg.mean_span_length)[1], n, cfg, sentinel_ids
        )


def choose_objective(cfg: ObjectiveConfig, rng: np.random.Generator) -> str:
    """One objective, drawn by weight with one uniform draw from `rng`."""
    u = rng.random()
    acc = 0.0
    items = list(cfg.weights.items())
    for name, w in items:
        acc += w
        if u < acc:
            return name
    return items[-1][0]  # u within rounding of 1


def make_batch(
    rows: np.ndarray,
    rng: np.random.Generator,
    cfg: ObjectiveConfig,
    family: str,
    sentinel_ids: list[int],
    eos_id: int,
    decoder_start_id: int,
    doc_ids: np.ndarray | None = None,
) -> Batch:
    """The batch of one training step: the objective is drawn first from `rng` (seed it with
    (seed, step)), then the objective's own random choices. `doc_ids` [B, L] are kept by the
    causal and prefix objectives; span corruption rewrites the sequence and drops them."""
    check_objective(cfg, family, np.shape(rows)[-1], sentinel_ids if cfg.span > 0 else None)
    kind = choose_objective(cfg, rng)
    if kind == "causal":
        return causal_batch(rows, doc_ids)
    if kind == "prefix":
        return prefix_batch(rows, rng, cfg, doc_ids)
    return span_batch(rows, rng, cfg, sentinel_ids, family, eos_id, decoder_start_id)

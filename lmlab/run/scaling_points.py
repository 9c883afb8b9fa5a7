"""What a point of the scaling sweep is: its shape, its training settings, its label.

A point is the recipe's model (its preset and every architecture choice) at another
shape, and the recipe's pre-training settings with the point's own budget:

- shape: layers = round((N / (12·ASPECT²))^(1/3)), the depth at which width = ASPECT ×
  layers gives N (a block has ~12·width² parameters), so depth never falls as N grows;
  then the width (a multiple of `WIDTH_STEP`) whose non-embedding count is nearest N, with
  the preset's default heads. Kaplan et al. found the loss nearly flat over a wide range of
  aspect ratios, so the shape rule matters less than keeping it one rule;
- schedule: warm-up of the recipe's `warmup_steps` but at most `WARMUP_SHARE` of the
  point's steps, then cosine to `min_lr_ratio` exactly at the point's token budget: every
  point decays fully at its own budget (Hoffmann et al.'s fix of Kaplan's setup, and what
  makes the final losses comparable);
- the recipe's sequence length and peak learning rate (`--set pretrain.lr=...`) and its
  batch, halved until the smallest budget takes at least `MIN_STEPS` optimizer steps: a
  small model spends its first few hundred steps near the unigram plateau (loss ≈ the
  entropy of token frequencies), which no power law describes;
- loss spikes are not rolled back (`spike_rollback` off): the loop drops the spiking
  step's update, skips its batch and goes on with the next (a `loss_spike` event with
  action `skip_batch` in metrics.jsonl), so D still counts only tokens trained on. A
  rollback would retrain from a checkpoint on other batches, so two points would differ
  in more than N and D;
- loss: the final model's loss on the same first `VAL_TOKENS` tokens of the validation
  split for every point, whatever its batch (`lmlab.run.scaling.validation_loss`); no
  evaluation during training, which would cost time and change nothing.

N is the non-embedding parameter count (Kaplan's convention: at these sizes the
embeddings would dominate the count without adding much capacity per token); compute is
C = 6·N·D. Counts on the command line and in the report read and print as 50k, 0.5M, 1.3B.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lmlab.errors import UsageError

ASPECT = 32  # width / layers of the shapes (GPT-2 small: 64; the compare recipe: 32)
WIDTH_STEP = 16
WARMUP_SHARE = 0.1  # warm-up takes at most this share of a point's steps
MIN_STEPS = 400  # the smallest budget's steps, at least: fewer end near the unigram plateau
VAL_TOKENS = 65_536  # validation tokens scored per point (the same windows for all)


# --- parsing the command line -----------------------------------------------------------


def parse_count(text: str, what: str) -> int:
    """'0.5M' -> 500_000 (k, M, B suffixes); `what` names the option in the error."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise UsageError(f"{what}: {text!r} is not a count like 500k, 0.5M or 1.3B")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    n = int(round(float(m.group(1)) * mult))
    if n <= 0:
        raise UsageError(f"{what}: {text!r} must be positive")
    return n


def parse_counts(text: str, what: str) -> list[int]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what}: give a comma-separated list, e.g. 0.1M,0.2M")
    values = sorted({parse_count(t, what) for t in items})
    if len(values) < 2:
        raise UsageError(f"{what}: needs at least 2 different values to fit a law (got {text!r})")
    return values


def parse_target(text: str) -> tuple[int, int]:
    if text.count(":") != 1:
        raise UsageError(f"--target: {text!r} is not SIZE:TOKENS, e.g. 1.6M:2M")
    size, tokens = text.split(":")
    return parse_count(size, "--target size"), parse_count(tokens, "--target tokens")


def fmt_count(x: float) -> str:
    """1_600_000 -> '1.6M', 250_000 -> '250k'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def point_label(size: int, tokens: int) -> str:
    return f"n{fmt_count(size)}_d{fmt_count(tokens)}"


# --- shapes and settings of a point -------------------------------------------------------

SHAPE_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "n_decoder_layers",
    "vocab_size",
)


def shape_for(model, size: int, vocab_size: int):
    """The recipe's model (a `ModelConfig`) resized to about `size` non-embedding parameters:
    every architecture choice kept; depth from the size (module docstring), then the width
    whose count is nearest."""
    from lmlab.model.config import ModelConfig
    from lmlab.model.presets import resolve_fields

    choices = {k: v for k, v in model.to_dict().items() if k not in SHAPE_FIELDS}
    layers = max(1, round((size / (12 * ASPECT**2)) ** (1 / 3)))
    best = None
    for width in range(WIDTH_STEP, 8192 + 1, WIDTH_STEP):
        try:
            fields = resolve_fields({**choices, "layers": layers, "width": width})
            cfg = ModelConfig(**fields, vocab_size=vocab_size)  # checked by __post_init__
        except UsageError:
            continue
        err = abs(math.log(cfg.num_params(embeddings=False) / size))
        if best is None or err < best[0]:
            best = (err, cfg)
        if cfg.num_params(embeddings=False) > size:
            break  # wider only grows
    if best is None:
        raise UsageError(f"--sizes: no width of the recipe's model gives {fmt_count(size)}")
    return ModelConfig.from_dict(best[1].to_dict())  # fully validated, as a recipe's model


def steps_of(train) -> int:
    """Steps the loop takes for a token budget (it stops at the first step reaching it)."""
    return math.ceil(train.max_tokens / train.tokens_per_step)


def sweep_batch(base, smallest: int):
    """The recipe's `TrainConfig` with its batch halved until the smallest budget takes at
    least `MIN_STEPS` steps (one batch for the whole sweep, target included)."""
    rows = base.batch_size
    while rows > 1 and smallest / (rows * base.seq_len * base.grad_accum) < MIN_STEPS:
        rows //= 2
    if rows == base.batch_size:
        return base
    return dataclasses.replace(
        base, batch_size=rows, batch_warmup_start=min(base.batch_warmup_start, rows)
    )


def point_config(base, tokens: int):
    """The recipe's `TrainConfig` with the point's budget and schedule (module docstring)."""
    steps = math.ceil(tokens / base.tokens_per_step)
    warmup = min(base.warmup_steps, max(1, math.ceil(WARMUP_SHARE * steps)))
    # a spiking step's batch is skipped, not rolled back (module docstring)
    quiet_spikes = {"spike_rollback": False} if hasattr(base, "spike_rollback") else {}
    return dataclasses.replace(
        base,
        **quiet_spikes,
        max_tokens=tokens,
        max_steps=None,
        max_minutes=None,
        warmup_steps=warmup,
        eval_every=steps + 1,  # no evaluation during training
        eval_batches=1,  # the loop's final one; `validation_loss` is what the sweep uses
        checkpoint_every=min(base.checkpoint_every, max(1, steps // 2)),
    )


@dataclasses.dataclass
class Point:
    """One (N, D) model of the sweep, before or after training."""

    label: str
    size: int  # asked for
    tokens: int  # asked for
    model: Any  # ModelConfig
    train: Any  # TrainConfig
    role: str = "grid"  # or "target"

    @property
    def n(self) -> int:
        return self.model.num_params(embeddings=False)

    @property
    def steps(self) -> int:
        return steps_of(self.train)

    @property
    def d(self) -> int:  # what the loop trains: whole steps
        return self.steps * self.train.tokens_per_step

    def describe(self) -> str:
        m = self.model
        return (
            f"N={fmt_count(self.n)} ({m.n_layers}×{m.d_model}, {m.n_heads} heads) "
            f"D={fmt_count(self.d)} ({self.steps} steps)"
        )

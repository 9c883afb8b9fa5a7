"""The pretrain stage: random windows of the token shards → `train`.

A window is drawn by a generator seeded with (seed, step), so the data order is a pure
function of the step (what makes exact resume possible) and the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmlab.data.mixture import phase_at
from lmlab.data.shards import open_split
from lmlab.errors import UsageError
from lmlab.model import ModelConfig, Transformer
from lmlab.train.loop import Batch, TrainConfig, train
from lmlab.utils import read_json


def window_batch(
    tokens: np.ndarray,
    batch: int,
    seq_len: int,
    seed: int,
    step: int,
    span: tuple[int, int] | None = None,
) -> Batch:
    """`batch` random windows, from `span` (a curriculum phase's token range) when given."""
    lo, hi = span if span is not None else (0, len(tokens))
    if hi - lo < seq_len + 1:  # a phase too short for a window: widen it to the whole split
        lo, hi = 0, len(tokens)
    n = hi - lo - seq_len  # starts lo … hi - seq_len - 1: the last window ends at hi
    if n <= 0:
        raise UsageError(f"pretrain: {len(tokens)} tokens cannot fill a window of {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = lo + rng.integers(0, n, size=batch)
    arr = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(arr)
    return t[:, :-1], t[:, 1:]


def val_windows(tokens: np.ndarray, batch: int, seq_len: int, n_batches: int) -> list[Batch]:
    """The first `n_batches` non-overlapping windows of the validation split (fixed set)."""
    out = []
    stride = seq_len + 1
    for b in range(n_batches):
        rows = []
        for i in range(batch):
            s = (b * batch + i) * stride
            if s + stride > len(tokens):
                break
            rows.append(tokens[s : s + stride])
        if not rows:
            break
        t = torch.from_numpy(np.stack(rows).astype(np.int64))
        out.append((t[:, :-1], t[:, 1:]))
    return out


def pretrain(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    shard_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    key: str,
) -> dict:
    if cfg.seq_len > model_cfg.max_seq_len:
        raise UsageError(
            f"pretrain.seq_len: {cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    train_tokens = open_split(shard_dir, "train")
    val_tokens = open_split(shard_dir, "val")
    if model_cfg.family == "encoder_decoder":
        raise UsageError(
            "pretrain: family encoder_decoder needs a denoising objective; this loop trains "
            "causal language models (decoder and prefix families)"
        )
    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    vals = val_windows(val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    manifest = read_json(Path(shard_dir) / "manifest.json")
    per_batch = cfg.batch_size * cfg.seq_len

    def get_batch(i: int) -> Batch:
        phase = phase_at(manifest, i * per_batch)  # None unless the shards have a curriculum
        span = (phase["start"], phase["end"]) if phase else None
        return window_batch(train_tokens, cfg.batch_size, cfg.seq_len, seed, i, span)

    return train(
        model,
        get_batch,
        vals,
        cfg,
        out_dir,
        tokenizer_dir,
        key,
        name="pretrain",
    )

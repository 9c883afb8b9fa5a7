"""The pretrain stage: the data stage's token shards, packed into sequences → `train`.

The train split is one stream of documents (each ended by EOS). It is cut into
consecutive windows of `seq_len + 1` tokens with stride `seq_len`, so every token is a
target exactly once per epoch, and the windows are read in a seeded random order, a new
one each epoch. With a curriculum (the shards' `phases`), each epoch reads the phases in
their order, shuffling only within a phase. Row r of the data is a pure function of
(seed, r): resuming, skipping batches after a loss spike and splitting rows across
data-parallel ranks all just move a row counter.

With `doc_mask`, attention stops at document boundaries inside a packed sequence and
positions restart at each document (`Batch.doc_ids`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmlab.config import STRICT
from lmlab.console import log
from lmlab.data.shards import open_split
from lmlab.errors import UsageError
from lmlab.model import ModelConfig
from lmlab.model.encdec import build_model
from lmlab.train.batch import Batch, LossFn, token_cross_entropy
from lmlab.train.loop import TrainConfig, train
from lmlab.train.objectives import (
    ObjectiveConfig,
    add_sentinels,
    causal_batch,
    check_objective,
    choose_objective,
    needs_sentinels,
    prefix_batch,
    span_batch,
)
from lmlab.utils import read_json


@dataclass
class PretrainConfig(TrainConfig):
    """The training loop's settings plus what only pre-training has: the objective mixture
    and document-boundary masking of packed sequences."""

    __pydantic_config__ = STRICT

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    doc_mask: bool = False  # attention stays inside each packed document


class PackedStream:
    """Windows of one token split in a seeded order; `rows(start, n)` is rows start…start+n."""

    def __init__(
        self,
        tokens: np.ndarray,
        doc_starts: np.ndarray | None,
        seq_len: int,
        seed: int,
        phases: list[dict] | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.doc_starts = doc_starts
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise UsageError(
                f"pretrain: {len(tokens)} tokens cannot fill one window of {seq_len + 1}; "
                "lower pretrain.seq_len or add data"
            )
        # a phase owns the windows that start inside its token range
        bounds = [0]
        for p in phases or []:
            end = min(self.n, -(-int(p["end"]) // seq_len))
            if end > bounds[-1]:
                bounds.append(end)
        if bounds[-1] < self.n:
            bounds.append(self.n)
        self.bounds = bounds
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def window(self, row: int) -> int:
        epoch, i = divmod(row, self.n)
        k = int(np.searchsorted(self.bounds, i, side="right")) - 1
        lo, hi = self.bounds[k], self.bounds[k + 1]
        perm = self._perms.get((epoch, k))
        if perm is None:
            if len(self._perms) > 8:
                self._perms.clear()
            perm = np.random.default_rng([self.seed, epoch, k]).permutation(hi - lo)
            self._perms[(epoch, k)] = perm
        return lo + int(perm[i - lo])

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        starts = [self.window(r) * self.seq_len for r in range(start, start + n)]
        arr = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if self.doc_starts is None:
            return arr, None
        pos = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)[None, :]
        return arr, np.searchsorted(self.doc_starts, pos, side="right") - 1


def doc_starts_of(shard_dir: Path, manifest: dict, split: str) -> np.ndarray:
    info = manifest["splits"][split]
    index = info.get("index")
    path = Path(shard_dir) / (index or f"{split}.idx.npy")
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the document index ({e})") from None


def cat_batches(parts: list[Batch]) -> Batch:
    """Stack single-row batches (every row built with its own generator)."""
    fields = {}
    for f in dataclasses.fields(Batch):
        vals = [getattr(b, f.name) for b in parts]
        fields[f.name] = None if vals[0] is None else torch.cat(vals)
    return Batch(**fields)


@dataclass(frozen=True)
class Objective:
    """What turns token windows into batches: the mixture and what the model family needs."""

    cfg: ObjectiveConfig
    family: str
    sentinel_ids: list[int]
    eos_id: int
    decoder_start_id: int

    def batch(
        self, kind: str, rows: np.ndarray, docs: np.ndarray | None, row_seeds: list[list[int]]
    ) -> Batch:
        """A `kind` batch of `rows`; each row's random choices (prefix split, noise spans)
        come from its own seed, so a row is the same whichever rank or batch builds it."""
        if kind == "causal":
            return causal_batch(rows, docs)
        parts = []
        for i, row_seed in enumerate(row_seeds):
            rng = np.random.default_rng(row_seed)
            one = rows[i : i + 1]
            if kind == "prefix":
                parts.append(
                    prefix_batch(one, rng, self.cfg, None if docs is None else docs[i : i + 1])
                )
            else:
                parts.append(
                    span_batch(
                        one,
                        rng,
                        self.cfg,
                        self.sentinel_ids,
                        self.family,
                        self.eos_id,
                        self.decoder_start_id,
                    )
                )
        return cat_batches(parts)


def make_loader(stream: PackedStream, objective: Objective, doc_mask: bool, seed: int):
    """get_batch(index, start_row, rows) for `train`: the objective of micro-batch `index`
    is drawn from (seed, index), the same on every rank; row r's own choices from (seed, r)."""

    def get_batch(index: int, start: int, n: int) -> Batch:
        rows, docs = stream.rows(start, n)
        kind = choose_objective(objective.cfg, np.random.default_rng([seed, index, 1]))
        seeds = [[seed, start + i, 2] for i in range(n)]
        return objective.batch(kind, rows, docs if doc_mask else None, seeds)

    return get_batch


def val_batches(
    tokens: np.ndarray,
    doc_starts: np.ndarray | None,
    cfg: PretrainConfig,
    objective: Objective,
    seed: int,
) -> list[Batch]:
    """The fixed validation set: the first non-overlapping windows of the split, scored
    with the causal LM loss when the model trains on it (comparable across runs), else
    with span corruption (or prefix LM) under fixed seeds, the same at every evaluation."""
    obj = cfg.objective
    stride = cfg.seq_len + 1
    kind = "causal"
    if objective.family == "encoder_decoder" or obj.causal == 0:
        kind = "span" if obj.span > 0 else "prefix"
    out = []
    for b in range(cfg.eval_batches):
        lo = b * cfg.batch_size
        starts = [(lo + i) * stride for i in range(cfg.batch_size)]
        starts = [s for s in starts if s + stride <= len(tokens)]
        if not starts:
            break
        rows = np.stack([tokens[s : s + stride] for s in starts]).astype(np.int64)
        docs = None
        if cfg.doc_mask and doc_starts is not None:
            pos = np.asarray(starts)[:, None] + np.arange(stride)[None, :]
            docs = np.searchsorted(doc_starts, pos, side="right") - 1
        out.append(
            objective.batch(kind, rows, docs, [[seed, 10**9 + lo + i] for i in range(len(rows))])
        )
    return out


def pretrain(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    shard_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    key: str,
    objective: LossFn = token_cross_entropy,
) -> dict:
    """Pre-train a new `model_cfg` model on the token shards in `shard_dir` under `out_dir`
    (`train`'s files), resuming a run with the same `key`; `objective` is the loss the
    objective mixture's batches are scored with."""
    if not isinstance(cfg, PretrainConfig):  # a plain TrainConfig: causal LM, no doc masks
        cfg = PretrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    shard_dir, out = Path(shard_dir), Path(out_dir)
    train_tokens = open_split(shard_dir, "train")
    val_tokens = open_split(shard_dir, "val")
    manifest = read_json(shard_dir / "manifest.json")
    family = model_cfg.family
    obj = cfg.objective
    span_only = family == "encoder_decoder"
    if cfg.seq_len > model_cfg.max_seq_len and not span_only:
        raise UsageError(
            f"pretrain.seq_len: {cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    check_objective(obj, family)
    sentinel_ids: list[int] = []
    if needs_sentinels(obj):
        from tokenizers import Tokenizer

        from lmlab.tokenizer import save_tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        sentinel_ids = add_sentinels(tok, obj.sentinels)
        ext = out / "tokenizer"
        if not (ext / "tokenizer.json").is_file():
            save_tokenizer(tok, ext)
        tokenizer_dir = ext
        vocab = tok.get_vocab_size()
        if vocab > model_cfg.vocab_size:
            log(f"pretrain: {len(sentinel_ids)} sentinel tokens added; vocabulary {vocab}")
            model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
        check_objective(obj, family, cfg.seq_len + 1, sentinel_ids)
    batcher = Objective(
        obj, family, sentinel_ids, int(manifest["eos_id"]), model_cfg.decoder_start_id
    )
    phases = manifest["splits"]["train"].get("phases") if manifest.get("curriculum") else None
    starts = doc_starts_of(shard_dir, manifest, "train") if cfg.doc_mask else None
    stream = PackedStream(train_tokens, starts, cfg.seq_len, seed, phases)
    val_starts = doc_starts_of(shard_dir, manifest, "val") if cfg.doc_mask else None
    vals = val_batches(val_tokens, val_starts, cfg, batcher, seed)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    get_batch = make_loader(stream, batcher, cfg.doc_mask, seed)
    return train(
        model, get_batch, vals, cfg, out, tokenizer_dir, key, name="pretrain", objective=objective
    )

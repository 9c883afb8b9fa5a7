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

`packing: bos_best_fit` (nanochat's loader) instead starts every window at a document
start: `BestFitPacked` places whole documents into windows best-fit and crops only what
no window has room for, so the model always sees the beginnings it is asked to continue.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    # stream: consecutive windows of the token stream; bos_best_fit: every window starts
    # at a document (BestFitPacked). Validation windows are the same for both
    packing: Literal["stream", "bos_best_fit"] = "stream"


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


class BestFitPacked:
    """Windows that each start at a document, packed best-fit (nanochat's dataloader).

    Every document becomes a piece `[BOS] + body` (BOS is the EOS id, the separator the
    stream puts between documents; the body drops the document's own trailing EOS, which
    the next piece's BOS stands for). A body longer than a window is split into pieces of
    a full window each plus a remainder, each led by BOS. Each epoch the pieces are
    shuffled (seeded) and read through a look-ahead buffer of `buffer` pieces; a window
    opens with the oldest buffered piece (largest-first alone would keep short pieces
    waiting to the end of the epoch while full-window pieces stream past: a biased
    sample of the data), then is filled with the largest buffered piece that fits its
    free space, again and again; when none fits, the shortest is cropped to the space
    and its tail thrown away. A last
    window that runs out of pieces is dropped. `waste` is the fraction of piece tokens
    thrown away in epoch 0. Row r is a pure function of (seed, r), as for `PackedStream`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_starts: np.ndarray,
        seq_len: int,
        seed: int,
        bos_id: int,
        buffer: int = 1000,
    ) -> None:
        self.tokens, self.seq_len, self.seed, self.bos, self.buffer = (
            tokens,
            seq_len,
            seed,
            bos_id,
            buffer,
        )
        width = seq_len + 1
        lo = np.asarray(doc_starts[:-1], dtype=np.int64)
        hi = np.asarray(doc_starts[1:], dtype=np.int64)
        lo, hi = lo[hi > lo], hi[hi > lo]
        hi = hi - (np.asarray(tokens[hi - 1]) == bos_id)  # the next piece's BOS ends it
        lo, hi = lo[hi > lo], hi[hi > lo]
        if not len(lo):
            raise UsageError("pretrain: packing bos_best_fit found no documents to pack")
        # document d becomes ceil(body / (width - 1)) pieces of up to width - 1 tokens
        chunks = -(-(hi - lo) // (width - 1))
        doc = np.repeat(np.arange(len(lo)), chunks)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
        self.piece_start = lo[doc] + k * (width - 1)
        self.piece_len = np.minimum(width - 1, hi[doc] - self.piece_start) + 1  # with BOS
        self._epochs: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
        self.waste = self._epoch(0)[3]

    def _epoch(self, e: int):
        """Epoch `e`'s layout: row pointers into (piece, tokens taken) segments, and its
        waste fraction."""
        while len(self._epochs) <= e:
            self._epochs.append(self._pack(len(self._epochs)))
        return self._epochs[e]

    def _pack(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        width = self.seq_len + 1
        order = np.random.default_rng([self.seed, e, 7]).permutation(len(self.piece_len))
        lens = self.piece_len.tolist()
        pending = iter(order.tolist())
        buf: list[tuple[int, int]] = []  # (length, piece), sorted
        arrived: deque[int] = deque()  # the buffer's pieces in the shuffled order
        placed = np.zeros(len(lens), dtype=bool)
        for i in pending:
            bisect.insort(buf, (lens[i], i))
            arrived.append(i)
            if len(buf) >= self.buffer:
                break
        ptr, seg_piece, seg_take = [0], [], []
        row_piece: list[int] = []
        row_take: list[int] = []
        wasted, free = 0, width
        while buf:
            if free == width:  # a window opens with the oldest piece: none waits long
                while placed[arrived[0]]:
                    arrived.popleft()
                i = arrived.popleft()
                n = lens[i]
                del buf[bisect.bisect_left(buf, (n, i))]
                take = min(n, free)  # a piece is at most a window
            else:
                k = bisect.bisect_right(buf, (free, len(lens))) - 1
                if k >= 0:
                    n, i = buf.pop(k)
                    take = n
                else:  # nothing fits: crop the shortest piece to the free space
                    n, i = buf.pop(0)
                    take = free
                    wasted += n - take
            placed[i] = True
            row_piece.append(i)
            row_take.append(take)
            free -= take
            nxt = next(pending, None)
            if nxt is not None:
                bisect.insort(buf, (lens[nxt], nxt))
                arrived.append(nxt)
            if free == 0:
                seg_piece += row_piece
                seg_take += row_take
                ptr.append(len(seg_piece))
                row_piece, row_take, free = [], [], width
        wasted += sum(row_take)  # the last, unfilled window is dropped
        if len(ptr) < 2:
            raise UsageError(
                f"pretrain: the documents cannot fill one window of {width} tokens; "
                "lower pretrain.seq_len or add data"
            )
        return (
            np.asarray(ptr),
            np.asarray(seg_piece),
            np.asarray(seg_take),
            wasted / int(self.piece_len.sum()),
        )

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Row r's tokens and the ordinal of the piece each token belongs to."""
        e = 0
        while r >= len(self._epoch(e)[0]) - 1:
            r -= len(self._epoch(e)[0]) - 1
            e += 1
        ptr, piece, take = self._epoch(e)[:3]
        toks, ids = [], []
        for j in range(ptr[r], ptr[r + 1]):
            s = self.piece_start[piece[j]]
            toks += [np.asarray([self.bos]), self.tokens[s : s + take[j] - 1]]
            ids.append(np.full(take[j], j - ptr[r]))
        return np.concatenate(toks).astype(np.int64), np.concatenate(ids)

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        out = [self.row(r) for r in range(start, start + n)]
        return np.stack([t for t, _ in out]), np.stack([d for _, d in out])


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


def make_loader(
    stream: PackedStream | BestFitPacked, objective: Objective, doc_mask: bool, seed: int
):
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
    best_fit = cfg.packing == "bos_best_fit"
    stream: PackedStream | BestFitPacked
    if best_fit:
        if phases:
            raise UsageError("pretrain.packing: bos_best_fit does not follow a curriculum yet")
        stream = BestFitPacked(
            train_tokens,
            doc_starts_of(shard_dir, manifest, "train"),
            cfg.seq_len,
            seed,
            int(manifest["eos_id"]),
        )
        log(f"pretrain: bos_best_fit packing throws away {100 * stream.waste:.2f}% of tokens")
    else:
        starts = doc_starts_of(shard_dir, manifest, "train") if cfg.doc_mask else None
        stream = PackedStream(train_tokens, starts, cfg.seq_len, seed, phases)
    val_starts = doc_starts_of(shard_dir, manifest, "val") if cfg.doc_mask else None
    vals = val_batches(val_tokens, val_starts, cfg, batcher, seed)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    get_batch = make_loader(stream, batcher, cfg.doc_mask, seed)
    summary = train(
        model, get_batch, vals, cfg, out, tokenizer_dir, key, name="pretrain", objective=objective
    )
    if best_fit:
        summary["packing_waste"] = round(stream.waste, 5)
    return summary

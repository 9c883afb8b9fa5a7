"""packing: bos_best_fit — every window starts at a document, documents placed best-fit,
only what no window has room for thrown away."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.train.batch import doc_positions
from lmlab.train.objectives import causal_batch
from lmlab.train.pretrain import BestFitPacked, PretrainConfig, pretrain
from tests.test_train import _cfg, _model_cfg, shards  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

BOS = 0  # the EOS id, which separates (and so starts) documents


def _corpus(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Documents of `lengths` body tokens, each ended by EOS as the data stage writes them;
    every body token is a distinct number (1, 2, …), so duplicates and order show."""
    ids, starts, nxt = [], [], 1
    for n in lengths:
        starts.append(len(ids))
        ids += list(range(nxt, nxt + n)) + [BOS]
        nxt += n
    return np.asarray(ids, dtype=np.uint16), np.asarray([*starts, len(ids)])


def _epoch_rows(p: BestFitPacked, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    before = sum(len(p._epoch(e)[0]) - 1 for e in range(epoch))
    return p.rows(before, len(p._epoch(epoch)[0]) - 1)


def test_waste_is_counted_right_on_a_hand_made_example():
    """Windows of 8 tokens; pieces (BOS + body) of 7, 7 and 3 tokens. Whichever piece
    opens row 1, nothing else fits it whole: a 7 leaves 1 slot and the 3 is cropped to 1
    (2 thrown away), a 3 leaves 5 and a 7 is cropped to 5 (2 thrown away). Row 2 takes
    the last 7 and runs out of pieces: dropped (7). Waste 9 of 17, for every seed."""
    tokens, starts = _corpus([6, 6, 2])
    for seed in range(4):
        p = BestFitPacked(tokens, starts, seq_len=7, seed=seed, bos_id=BOS)
        assert sorted(p.piece_len.tolist()) == [3, 7, 7]
        assert p.waste == pytest.approx(9 / 17)
        assert len(p._epoch(0)[0]) - 1 == 1  # one window
        rows, docs = p.rows(0, 1)
        assert rows.shape == (1, 8) and rows[0, 0] == BOS
        assert (rows[0] == BOS).sum() == 2 and sorted(set(docs[0].tolist())) == [0, 1]
    # pieces that tile the windows exactly waste nothing, whichever opens a window: 8,
    # 6+2, 5+3, 5+3 (the 8 and a 3 are one long document, split into a full window and a
    # remainder)
    tokens, starts = _corpus([4, 2, 5, 1, 7 + 2, 4])
    p = BestFitPacked(tokens, starts, seq_len=7, seed=3, bos_id=BOS)
    assert sorted(p.piece_len.tolist()) == [2, 3, 3, 5, 5, 6, 8]
    assert p.waste == 0.0 and len(p._epoch(0)[0]) - 1 == 4


def test_every_window_starts_at_a_document_and_no_token_is_duplicated():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 80, size=300).tolist() + [200, 65]  # two longer than a window
    tokens, starts = _corpus(lengths)
    p = BestFitPacked(tokens, starts, seq_len=31, seed=1, bos_id=BOS, buffer=50)
    doc_first = np.cumsum([1] + lengths[:-1])  # each document's first token
    for epoch in (0, 1):
        rows, docs = _epoch_rows(p, epoch)
        assert rows.shape[1] == 32 and (rows[:, 0] == BOS).all()
        body = rows[rows != BOS]
        assert len(np.unique(body)) == len(body)  # no token of any document twice
        total = sum(lengths) + len(p.piece_len)
        assert rows.size == round(total * (1 - p._epoch(epoch)[3]))  # kept + waste = all
        for r, d in zip(rows, docs, strict=True):
            bos_at = np.flatnonzero(r == BOS)
            cuts = np.flatnonzero(np.diff(d)) + 1
            assert cuts.tolist() == bos_at[1:].tolist()  # a piece per BOS, nothing else
            for piece in np.split(r, bos_at[1:]):
                # a piece is one document's consecutive tokens from its start, or from
                # where its previous full-window piece (31 body tokens) ended
                b = piece[1:].astype(np.int64)
                assert (np.diff(b) == 1).all()
                if len(b):
                    doc = int(np.searchsorted(doc_first, b[0], side="right")) - 1
                    assert (b[0] - doc_first[doc]) % 31 == 0
                    assert b[-1] < doc_first[doc] + lengths[doc]  # inside that document
        assert 0 < p._epoch(epoch)[3] < 0.05  # best fit wastes little
    a = _epoch_rows(p, 0)[0]
    b = _epoch_rows(p, 1)[0]
    assert not np.array_equal(a[: len(b)], b[: len(a)])  # each epoch reshuffles
    again = BestFitPacked(tokens, starts, seq_len=31, seed=1, bos_id=BOS, buffer=50)
    np.testing.assert_array_equal(again.rows(7, 3)[0], a[7:10])  # a function of (seed, r)


def test_doc_ids_restart_positions_at_each_packed_document():
    tokens, starts = _corpus([3, 2, 9, 1, 4])
    p = BestFitPacked(tokens, starts, seq_len=7, seed=0, bos_id=BOS)
    rows, docs = p.rows(0, 2)
    b = causal_batch(rows, docs)
    pos = doc_positions(b.doc_ids)
    inputs = torch.as_tensor(rows[:, :-1])
    assert ((pos == 0) == (inputs == BOS)).all()  # every BOS, and only a BOS, starts one


def test_pretrain_with_bos_best_fit_and_doc_mask_trains(shards, tmp_path):  # noqa: F811
    assert PretrainConfig(max_steps=1).packing == "stream"  # the default is unchanged
    cfg = _cfg(packing="bos_best_fit", doc_mask=True, max_steps=8)
    summary = pretrain(
        _model_cfg(shards),
        cfg,
        shard_dir=shards,
        tokenizer_dir=shards,
        out_dir=tmp_path / "run",
        seed=0,
        key="k",
    )
    assert 0 <= summary["packing_waste"] < 0.2 and summary["steps"] == 8
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]


def test_short_documents_are_not_kept_waiting_behind_full_windows():
    """Mostly window-long documents and a few short ones: largest-first alone would
    stream the long ones past and hold every short one to the end of the epoch. Windows
    open with the oldest buffered piece, so the short ones spread over the epoch."""
    tokens, starts = _corpus([31] * 300 + [5] * 60)
    p = BestFitPacked(tokens, starts, seq_len=31, seed=2, bos_id=BOS, buffer=100)
    ptr, piece, _, _ = p._epoch(0)
    row_of = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))  # each placed piece's row
    short_rows = row_of[p.piece_len[piece] < 32]
    assert len(short_rows) >= 50  # nearly all placed (the epoch's last window may drop)
    share_early = np.mean(short_rows < (len(ptr) - 1) / 2)
    assert 0.3 < share_early < 0.9, share_early  # largest-first alone: ~0

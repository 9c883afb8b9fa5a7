"""The training loop: packing, exact resume, spikes, precision, optimizers,
checkpoints, observability, objectives end to end, and DDP/FSDP against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmlab.data.shards import write_manifest
from lmlab.errors import UsageError
from lmlab.model import ModelConfig, Transformer
from lmlab.model.loading import load_model
from lmlab.model.scoring import token_loss_sum
from lmlab.tokenizer import EOS, load_tokenizer, save_tokenizer, special_id
from lmlab.tokenizer.train import train_bpe
from lmlab.train.batch import Batch, LossOut, doc_positions, logits_of, token_cross_entropy
from lmlab.train.distributed import Dist
from lmlab.train.loop import (
    SpikeDetector,
    StepSums,
    TrainConfig,
    batch_rows,
    enable_activation_checkpointing,
    make_optimizer,
    train,
)
from lmlab.train.objectives import ObjectiveConfig, causal_batch
from lmlab.train.pretrain import PackedStream, PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n: int, seed: int) -> list[str]:
    """Documents with learnable structure: counting phrases over a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 9))
        start = int(rng.integers(0, len(words)))
        out.append(" ".join(words[(start + j) % len(words)] for j in range(k * 4)) + ".")
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Token shards in the data stage's format (bin + idx + manifest) and a tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    tok = train_bpe(iter(_texts(200, 0)), 300, 2)
    save_tokenizer(tok, root)
    eos = special_id(tok, EOS)
    splits = {}
    for split, n, seed in (("train", 400, 1), ("val", 60, 2)):
        ids, starts = [], []
        for t in _texts(n, seed):
            starts.append(len(ids))
            ids += tok.encode(t).ids + [eos]
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{split}.bin")
        np.save(root / f"{split}.idx.npy", np.asarray([*starts, len(ids)], dtype=np.int64))
        splits[split] = {
            "file": f"{split}.bin",
            "index": f"{split}.idx.npy",
            "tokens": len(ids),
            "documents": n,
        }
    write_manifest(root, tok, splits)
    return root


def _model_cfg(shards: Path, **kw) -> ModelConfig:
    vocab = load_tokenizer(shards).get_vocab_size()
    base = dict(n_layers=2, d_model=32, n_heads=2, vocab_size=vocab, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def _cfg(**kw) -> PretrainConfig:
    base = dict(
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=2,
        max_steps=12,
        eval_every=6,
        eval_batches=2,
        log_every=1,
        checkpoint_every=4,
        precision="fp32",
    )
    return PretrainConfig(**{**base, **kw})


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "event" not in r]


def _events(out: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" in r]


# -- data ----------------------------------------------------------------------------------


def test_packed_stream_reads_every_window_once_per_epoch_in_a_seeded_order():
    tokens = np.arange(161, dtype=np.uint16)  # 10 windows of 17 tokens with stride 16
    s = PackedStream(tokens, None, 16, seed=3)
    epoch0, _ = s.rows(0, 10)
    starts = sorted(int(r[0]) for r in epoch0)
    assert starts == list(range(0, 160, 16))  # every window once, none twice
    assert all((r[1:] - r[:-1] == 1).all() for r in epoch0)  # contiguous tokens
    epoch1, _ = s.rows(10, 10)
    assert sorted(int(r[0]) for r in epoch1) == starts
    assert [int(r[0]) for r in epoch1] != [int(r[0]) for r in epoch0]  # reshuffled
    again, _ = PackedStream(tokens, None, 16, seed=3).rows(4, 3)
    np.testing.assert_array_equal(again, epoch0[4:7])  # row r is a function of (seed, r)
    other, _ = PackedStream(tokens, None, 16, seed=4).rows(0, 10)
    assert [int(r[0]) for r in other] != [int(r[0]) for r in epoch0]


def test_packed_stream_follows_the_curriculum_phases_in_order():
    tokens = np.arange(321, dtype=np.uint16)  # 20 windows; phase A = first 160 tokens
    phases = [{"name": "A", "start": 0, "end": 160}, {"name": "B", "start": 160, "end": 321}]
    s = PackedStream(tokens, None, 16, seed=0, phases=phases)
    rows, _ = s.rows(0, 20)
    assert all(int(r[0]) < 160 for r in rows[:10])  # phase A first, shuffled inside
    assert all(int(r[0]) >= 160 for r in rows[10:])
    assert [int(r[0]) for r in rows[:10]] != list(range(0, 160, 16))


def test_document_ids_and_positions_restart_at_each_document():
    tokens = np.arange(40, dtype=np.uint16)
    starts = np.array([0, 5, 23, 40])
    rows, docs = PackedStream(tokens, starts, 16, seed=0).rows(0, 2)
    for r, d in zip(rows, docs, strict=True):
        expected = np.searchsorted(starts, r.astype(np.int64), side="right") - 1
        np.testing.assert_array_equal(d, expected)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert doc_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_doc_mask_stops_attention_crossing_documents():
    """With doc_ids, the logits of document 2 do not change when document 1 changes, and
    equal the logits of document 2 run alone."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16))
    a = torch.randint(0, 64, (1, 12))
    b = a.clone()
    b[0, :5] = torch.randint(0, 64, (5,))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    la = logits_of(m, Batch(a, a, doc_ids=docs))
    lb = logits_of(m, Batch(b, b, doc_ids=docs))
    torch.testing.assert_close(la[0, 5:], lb[0, 5:])
    alone = m(a[:, 5:])
    torch.testing.assert_close(la[0, 5:], alone[0], rtol=1e-5, atol=1e-5)
    without = logits_of(m, Batch(b, b))
    assert not torch.allclose(without[0, 5:], la[0, 5:])  # without the mask it leaks


# -- exact resume --------------------------------------------------------------------------


class Killed(Exception):
    pass


def _run_pretrain_loop(shards, out, cfg, kill_at=None, mcfg=None, objective=token_cross_entropy):
    """`train` on the packed shards; `kill_at` raises out of get_batch at that micro-batch,
    like a process dying mid-step (nothing is saved on the way out)."""
    from lmlab.data.shards import open_split

    stream = PackedStream(open_split(shards, "train"), None, cfg.seq_len, seed=5)

    def get_batch(index, start, n):
        if index == kill_at:
            raise Killed
        return causal_batch(stream.rows(start, n)[0])

    torch.manual_seed(5)
    model = Transformer(mcfg or _model_cfg(shards))
    val = [causal_batch(stream.rows(10_000, 4)[0])]
    return train(model, get_batch, val, cfg, out, shards, key="k", objective=objective)


def test_killed_run_resumes_to_bitwise_identical_losses_and_weights(shards, tmp_path):
    cfg = _cfg(max_steps=14, grad_accum=2, batch_warmup_tokens=300, batch_warmup_start=2)
    _run_pretrain_loop(shards, tmp_path / "ref", cfg)
    with pytest.raises(Killed):  # dies inside step 10 (micro-batches 18, 19)
        _run_pretrain_loop(shards, tmp_path / "run", cfg, kill_at=19)
    assert json.loads((tmp_path / "run/last/trainer_state.json").read_text())["step"] == 8
    _run_pretrain_loop(shards, tmp_path / "run", cfg)
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [s for s, _ in got] == list(range(1, 15))
    assert got == ref  # every per-step loss, bit for bit (as logged)
    a = load_file(tmp_path / "ref/model/model.safetensors")
    b = load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    sizes = [r["batch_rows"] for r in rows if "batch_rows" in r]
    assert sizes[0] < sizes[-1] == 8  # batch-size warm-up: 2 rows × 2 micro → 4 × 2


def smoothed(model, batch: Batch) -> LossOut:
    """A custom objective: label-smoothed cross-entropy, logging the plain one beside it."""
    logits = logits_of(model, batch).float().flatten(0, 1)
    targets = batch.targets.flatten()
    loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=0.1)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    return LossOut(loss, (targets != -100).sum(), {"nll": nll.detach()})


def test_a_custom_objective_trains_through_the_seam_and_resumes_exactly(shards, tmp_path):
    cfg = _cfg(max_steps=10, grad_accum=2)
    _run_pretrain_loop(shards, tmp_path / "ref", cfg, objective=smoothed)
    with pytest.raises(Killed):  # dies inside step 6 (micro-batches 10, 11)
        _run_pretrain_loop(shards, tmp_path / "run", cfg, kill_at=11, objective=smoothed)
    assert json.loads((tmp_path / "run/last/trainer_state.json").read_text())["step"] == 4
    _run_pretrain_loop(shards, tmp_path / "run", cfg, objective=smoothed)
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [s for s, _ in got] == list(range(1, 11)) and got == ref
    a = load_file(tmp_path / "ref/model/model.safetensors")
    b = load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    assert len(steps) == 10 and all(r["nll"] != r["loss"] for r in steps)
    assert steps[-1]["nll"] < steps[-1]["loss"]  # once the model learns, smoothing costs
    resumed = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r.get("nll") for r in resumed] == [r.get("nll") for r in rows]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2  # at step 6 and at the end: the objective's loss on validation
    _run_pretrain_loop(shards, tmp_path / "plain", cfg)
    plain = _losses(tmp_path / "plain")
    assert plain[0][1] == steps[0]["nll"]  # step 1, same weights: the metric is the loss
    assert plain[1:] != ref[1:]  # then another loss trains another model


def test_an_objective_is_normalised_by_its_own_count(shards, tmp_path):
    """The loop scales each backward by the target count before the forward; an objective
    that counts otherwise is rescaled to its own count: twice the loss over twice the count
    trains exactly like the default."""

    def doubled(model, batch):
        out = token_cross_entropy(model, batch)
        return LossOut(2 * out.loss_sum, 2 * out.count, aux_loss=out.aux_loss)

    cfg = _cfg(max_steps=6, grad_accum=2)
    _run_pretrain_loop(shards, tmp_path / "a", cfg)
    _run_pretrain_loop(shards, tmp_path / "b", cfg, objective=doubled)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a = load_file(tmp_path / "a/model/model.safetensors")
    b = load_file(tmp_path / "b/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    moe = _model_cfg(shards, n_experts=4, experts_top_k=2)  # its aux loss cannot be rescaled
    with pytest.raises(UsageError, match="aux_loss"):
        _run_pretrain_loop(shards, tmp_path / "c", cfg, mcfg=moe, objective=doubled)


@pytest.mark.parametrize("key", ["event", "val_loss", "lr"])
def test_a_metric_named_like_a_key_readers_classify_on_is_refused(shards, tmp_path, key):
    """A metric called `event` or `val_loss` would make every reader file the logged steps
    as events or evaluations; one called `lr` would overwrite the loop's own field."""

    def named(model, batch):
        out = token_cross_entropy(model, batch)
        return LossOut(out.loss_sum, out.count, {key: out.loss_sum.detach()})

    with pytest.raises(UsageError, match=f"metric '{key}'"):
        _run_pretrain_loop(shards, tmp_path / key, _cfg(max_steps=2), objective=named)


def test_step_sums_read_the_device_once_per_step_and_add_as_python_floats_would():
    """Summing a micro-batch's outputs reads nothing back to the host (a device sync per
    micro-batch): meta tensors hold no values, so any read would raise. `reduce` then gives
    the same bits as adding the values one by one as Python floats (float64)."""
    meta = StepSums()
    for _ in range(3):
        t = torch.ones((), device="meta")
        meta.add(LossOut(t, t.long(), {"m": t, "n": 2.0}))
    assert isinstance(meta.loss, torch.Tensor) and meta.loss.device.type == "meta"

    values = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 1e3
    sums, loss, count, m = StepSums(), 0.0, 0.0, 0.0
    for i, v in enumerate(values):
        sums.add(LossOut(v, torch.tensor(i + 1), {"m": v / 7, "k": 0.5}))
        loss, count, m = loss + float(v), count + i + 1, m + float(v / 7)
    assert float(values.sum()) != loss  # a float32 sum would round otherwise
    got, metrics = sums.reduce(Dist())
    assert got == loss / count and metrics == {"k": 100 / count, "m": m / count}
    assert sums.global_count == count == 20100


def test_the_default_objective_adds_a_mixture_of_experts_balancing_loss(shards):
    batch = causal_batch(np.arange(34).reshape(2, 17) % 50)
    torch.manual_seed(0)
    moe = Transformer(_model_cfg(shards, n_experts=4, experts_top_k=2))
    out = token_cross_entropy(moe, batch)
    assert out.aux_loss is not None and torch.equal(out.aux_loss, moe.aux_loss())
    torch.testing.assert_close(out.loss_sum, token_loss_sum(moe(batch.inputs), batch.targets))
    assert int(out.count) == batch.n_targets == 32 and out.metrics == {}
    assert token_cross_entropy(Transformer(_model_cfg(shards)), batch).aux_loss is None


def test_batch_warmup_grows_linearly_to_the_batch_size():
    cfg = TrainConfig(batch_size=16, max_steps=1, batch_warmup_tokens=1000, batch_warmup_start=4)
    assert batch_rows(cfg, 0, 1) == 4
    assert batch_rows(cfg, 500, 1) == 10
    assert batch_rows(cfg, 999, 1) == 15
    assert batch_rows(cfg, 1000, 1) == 16
    assert batch_rows(cfg, 500, 4) == 8  # a multiple of the data-parallel world
    with pytest.raises(UsageError, match="batch_warmup_start"):
        TrainConfig(batch_size=4, max_steps=1, batch_warmup_start=8)


# -- loss spikes ---------------------------------------------------------------------------


def test_spike_detector_flags_a_jump_not_noise():
    det = SpikeDetector(zscore=6.0)
    rng = np.random.default_rng(0)
    flagged = [det.check(3.0 - 0.01 * i + 0.02 * rng.standard_normal()) for i in range(100)]
    assert not any(flagged)
    assert det.check(6.0)
    assert det.check(float("nan"))
    assert not det.check(2.0)  # the spike did not move the statistics
    assert not SpikeDetector(zscore=0).check(100.0)


# Every step's training loss, steps 1-100, of the `compare` recipe's `learned` variant
# (`lmlab run compare --set pretrain.spike_zscore=0`, fp32, 2 CPU cores): a smooth descent
# from ln 4096 while the model gives every batch about the same loss, then batch-to-batch
# noise; at step 43, inside the 50-step warm-up, one batch scores 9.11 (above ln V) and the
# next step is back at 6.80. A detector armed from step 20 takes that for a spike and rolls
# back to step 0, skipping every batch so far.
LEARNED_100 = [
    8.333, 8.343, 8.318, 8.288, 8.280, 8.208, 8.162, 8.142, 8.070, 8.052,
    8.056, 8.044, 7.945, 7.905, 7.864, 7.810, 7.760, 7.719, 7.615, 7.491,
    7.465, 7.434, 7.352, 7.335, 7.254, 7.103, 7.138, 7.027, 7.015, 6.847,
    6.879, 6.893, 6.776, 6.786, 6.718, 6.690, 6.601, 6.712, 6.630, 6.700,
    6.764, 6.571, 9.112, 6.802, 6.574, 6.849, 6.775, 6.742, 6.688, 6.615,
    6.574, 6.620, 6.696, 6.545, 6.648, 6.682, 6.612, 6.306, 6.340, 6.659,
    6.579, 6.526, 6.332, 6.522, 6.426, 6.285, 6.582, 6.545, 6.389, 6.397,
    6.280, 6.518, 6.383, 6.379, 6.257, 6.344, 6.308, 6.424, 6.095, 6.203,
    6.442, 6.277, 6.244, 6.202, 5.971, 6.182, 6.186, 6.414, 5.985, 5.846,
    6.211, 6.128, 6.210, 6.201, 6.015, 5.802, 6.125, 6.035, 6.261, 6.176,
]  # fmt: skip


def test_spike_detector_is_quiet_through_real_early_descents_and_catches_real_spikes(
    shards, tmp_path
):
    """Losses of real runs replayed through the detector: a toy model's fast descent (trained
    here) from step 1, and the compare recipe's recorded start with its default grace period;
    then a loss ×3, a return to the initial loss and a NaN after them."""
    out = tmp_path / "o"
    cfg = _cfg(max_steps=80, eval_every=100, checkpoint_every=100, spike_zscore=0)
    _run_pretrain_loop(shards, out, cfg)
    toy = [loss for _, loss in _losses(out)]
    assert len(toy) == 80 and toy[-1] < toy[0] / 3  # a real, fast descent
    z = TrainConfig(max_steps=1).spike_zscore
    assert not any(SpikeDetector(z).check(x) for x in toy)  # from step 1, no grace at all
    compare = TrainConfig(max_steps=400, warmup_steps=50)  # the compare recipe's schedule
    assert compare.spike_grace == 100 and cfg.spike_grace == 20
    det = SpikeDetector(z, compare.spike_grace)
    assert not any(det.check(x) for x in LEARNED_100)
    early = SpikeDetector(z, 20)  # armed inside the warm-up, it takes step 43 for a spike
    assert [i for i, x in enumerate(LEARNED_100, 1) if early.check(x)] == [43]
    for losses, grace in ((toy, cfg.spike_grace), (LEARNED_100, compare.spike_grace)):
        for bad in (3 * losses[-1], losses[0], float("nan")):  # ×3, diverged, non-finite
            det = SpikeDetector(z, grace)
            assert not any(det.check(x) for x in losses)
            assert det.check(bad), (bad, det.score(bad))
            assert not det.check(losses[-1])  # the spike left the statistics alone
    det = SpikeDetector(z, 100)
    assert det.check(float("inf")) and not det.check(50.0)  # in the grace period: finite passes


def _poisoned(shards, poison: set[int], asked: list[int]):
    from lmlab.data.shards import open_split

    stream = PackedStream(open_split(shards, "train"), None, 16, seed=5)
    vocab = load_tokenizer(shards).get_vocab_size()

    def get_batch(index, start, n):
        asked.append(index)
        b = causal_batch(stream.rows(start, n)[0])
        if index in poison:  # targets the model has never seen: a huge loss
            return Batch(b.inputs, torch.full_like(b.targets, vocab - 1))
        return b

    return get_batch


def test_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_the_batches(shards, tmp_path):
    cfg = _cfg(max_steps=40, checkpoint_every=10, eval_every=100, lr=1e-2)
    asked: list[int] = []
    torch.manual_seed(5)
    out = tmp_path / "out"
    summary = train(
        Transformer(_model_cfg(shards)),
        _poisoned(shards, {33}, asked),
        [],
        cfg,
        out,
        shards,
        "k",
    )
    (event,) = _events(out)
    assert event["event"] == "loss_spike" and event["action"] == "rollback"
    assert event["step"] == 34 and event["rolled_back_to"] == 30
    assert event["skipped_rows"] == [30 * 4, 34 * 4]  # the batches since the checkpoint
    after = asked[asked.index(33) + 1 :]
    assert after[0] == 34 and not {30, 31, 32, 33} & set(after)  # never trained on again
    steps = [s for s, _ in _losses(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the log has no repeats
    assert summary["spikes"] == 1 and summary["rollbacks"] == 1 and summary["steps"] == 40


def test_spike_without_rollback_skips_the_batch_and_gives_up_after_max_rollbacks(shards, tmp_path):
    cfg = _cfg(max_steps=30, eval_every=100, lr=1e-2, spike_rollback=False)
    torch.manual_seed(5)
    train(
        Transformer(_model_cfg(shards)),
        _poisoned(shards, {25}, []),
        [],
        cfg,
        tmp_path / "a",
        shards,
        "k",
    )
    (event,) = _events(tmp_path / "a")
    assert event["action"] == "skip_batch" and event["step"] == 26
    cfg = _cfg(max_steps=40, eval_every=100, lr=1e-2, checkpoint_every=10, max_rollbacks=1)
    torch.manual_seed(5)
    with pytest.raises(UsageError, match="max_rollbacks"):
        train(
            Transformer(_model_cfg(shards)),
            _poisoned(shards, {25, 27}, []),
            [],
            cfg,
            tmp_path / "b",
            shards,
            "k",
        )


def test_every_metrics_reader_takes_a_logged_spike_as_an_event(shards, tmp_path):
    """The loop's `loss_spike` line has a `loss` but no `tokens` or `grad_norm`: the shared
    reader files it under events, so the comparison's statistics and the run report's plots
    read only real steps (a reader taking `"loss" in row` for a step crashed on it)."""
    from lmlab.data.shards import open_split
    from lmlab.run.compare import variant_stats
    from lmlab.run.report import plot_losses, plot_schedule
    from lmlab.train.metrics import read_metrics, spike_summary

    out = tmp_path / "run" / "pretrain"
    cfg = _cfg(max_steps=40, checkpoint_every=10, eval_every=20, lr=1e-2)
    mcfg = _model_cfg(shards)
    stream = PackedStream(open_split(shards, "train"), None, 16, seed=5)
    val = [causal_batch(stream.rows(10_000, 4)[0])]
    torch.manual_seed(5)
    train(Transformer(mcfg), _poisoned(shards, {33}, []), val, cfg, out, shards, "k")
    m = read_metrics(out / "metrics.jsonl")
    (event,) = m.events
    assert event["event"] == "loss_spike" and "loss" in event and "grad_norm" not in event
    assert [r["step"] for r in m.train] == list(range(1, 41))
    assert all("grad_norm" in r and "tokens" in r for r in m.train)
    assert {r["step"] for r in m.val} == {20, 40} and m.other == []
    assert spike_summary(m) == {
        "count": 1,
        "steps": [34],
        "rollbacks": 1,
        "rolled_back_to": [30],
        "skipped_rows": [[120, 136]],
        "skipped_batches": 0,
    }
    stats = variant_stats(out, mcfg, cfg.grad_clip)
    assert stats["steps"] == 40 and stats["spike_events"] == spike_summary(m)
    assert stats["grad_norm_max"] >= stats["grad_norm_median"] > 0
    assert plot_losses(tmp_path / "run", tmp_path / "loss.png")
    assert plot_schedule(tmp_path / "run", tmp_path / "schedule.png")
    assert read_metrics(tmp_path / "missing.jsonl") == type(m)()


# -- precision, optimizers, memory ---------------------------------------------------------


def test_fp16_trains_with_a_dynamic_loss_scale(shards, tmp_path):
    summary = _run_pretrain_loop(shards, tmp_path / "o", _cfg(precision="fp16", max_steps=12))
    rows = [json.loads(x) for x in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rows if "loss_scale" in r]
    assert scales and all(s > 0 for s in scales)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] and np.isfinite(summary["final_val_loss"])
    blob = torch.load(tmp_path / "o/last/trainer_state.pt", weights_only=True)
    assert blob["scaler"]["scale"] == scales[-1]  # the scaler resumes where it was


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16)
    a = Transformer(cfg)
    b = Transformer(cfg)
    b.load_state_dict(a.state_dict())
    enable_activation_checkpointing(b)
    x = torch.randint(0, 64, (2, 16))
    for m in (a, b):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert list(a.state_dict()) == list(b.state_dict())  # checkpoints keep their names
    assert sum(1 for m in b.modules() if getattr(m, "_act_ckpt", False)) == 3


def test_adafactor_and_fused_adamw(shards, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16)
    x = torch.randint(0, 64, (4, 16))
    params = {}
    for fused in (False, True):
        torch.manual_seed(0)
        m = Transformer(cfg)
        opt = make_optimizer(m, TrainConfig(max_steps=1, fused=fused))
        assert opt.defaults["fused"] is fused
        for _ in range(3):
            torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad()
        params[fused] = [p.detach().clone() for p in m.parameters()]
    for p, q in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt = make_optimizer(Transformer(cfg), TrainConfig(max_steps=1, optimizer="adafactor"))
    assert isinstance(opt, torch.optim.Adafactor)
    summary = _run_pretrain_loop(
        shards, tmp_path / "af", _cfg(optimizer="adafactor", lr=0.1, max_steps=20)
    )
    losses = [loss for _, loss in _losses(tmp_path / "af")]
    assert losses[-1] < losses[0] - 2 and summary["steps"] == 20


# -- checkpoints and observability ---------------------------------------------------------


def test_keep_last_n_and_best_checkpoints(shards, tmp_path):
    out = tmp_path / "o"
    _run_pretrain_loop(
        shards, out, _cfg(max_steps=20, checkpoint_every=5, keep_last=3, eval_every=5)
    )
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000010", "step-00000015"]
    assert json.loads((out / "last/trainer_state.json").read_text())["step"] == 20
    vals = [
        json.loads(x)["val_loss"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in x
    ]
    best = json.loads((out / "best/config.json").read_text())["best"]
    assert best["val_loss"] == pytest.approx(min(vals), abs=1e-5)
    assert isinstance(load_model(out / "best"), Transformer)


def test_metrics_jsonl_and_tensorboard_have_every_logged_step(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    _run_pretrain_loop(shards, out, _cfg(max_steps=6, tensorboard=True))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert all(key in r for r in logged), key
    assert all(0 < r["mfu"] < 1 for r in logged)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 7))
    assert [round(e.value, 4) for e in loss] == [round(r["loss"], 4) for r in logged]
    assert "train/val_loss" in acc.Tags()["scalars"]


def test_weights_and_biases_logging_offline(shards, tmp_path, monkeypatch):
    import importlib.util

    out = tmp_path / "o"
    cfg = _cfg(max_steps=3, wandb_project="lmlab-test")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UsageError, match="pip install wandb"):
            _run_pretrain_loop(shards, out, cfg)
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run_pretrain_loop(shards, out, cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(f.stat().st_size > 0 for f in runs[0].glob("*.wandb"))


# -- objectives through pretrain -----------------------------------------------------------


def test_encoder_decoder_pretrains_on_span_corruption(shards, tmp_path):
    mcfg = _model_cfg(shards, family="encoder_decoder", n_decoder_layers=2, position="t5")
    cfg = _cfg(objective=ObjectiveConfig(causal=0, span=1, sentinels=8), max_steps=30, lr=1e-2)
    out = tmp_path / "o"
    summary = pretrain(
        mcfg, cfg, shard_dir=shards, tokenizer_dir=shards, out_dir=out, seed=0, key="k"
    )
    losses = [loss for _, loss in _losses(out)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    tok = load_tokenizer(out / "model")
    assert tok.token_to_id("<extra_id_7>") == tok.get_vocab_size() - 1
    model = load_model(out / "model")
    assert model.cfg.vocab_size == tok.get_vocab_size() and summary["steps"] == 30


def test_prefix_and_mixture_objectives_train_a_prefix_decoder(shards, tmp_path):
    mcfg = _model_cfg(shards, family="prefix")
    cfg = _cfg(
        objective=ObjectiveConfig(causal=1, prefix=1, span=1, sentinels=8),
        max_steps=30,
        doc_mask=True,
        lr=1e-2,
    )
    summary = pretrain(
        mcfg, cfg, shard_dir=shards, tokenizer_dir=shards, out_dir=tmp_path / "o", seed=0, key="k"
    )
    losses = [loss for _, loss in _losses(tmp_path / "o")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert summary["final_val_loss"] < 5
    with pytest.raises(UsageError, match="model.family: prefix"):
        pretrain(
            _model_cfg(shards),
            _cfg(objective=ObjectiveConfig(prefix=1)),
            shard_dir=shards,
            tokenizer_dir=shards,
            out_dir=tmp_path / "x",
            seed=0,
            key="k",
        )


# -- distributed ---------------------------------------------------------------------------

_SCRIPT = """
import sys, torch
from lmlab.model import ModelConfig
from lmlab.tokenizer import load_tokenizer
from lmlab.train.pretrain import PretrainConfig, pretrain
shards, out, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
vocab = load_tokenizer(shards).get_vocab_size()
mcfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=vocab, max_seq_len=32)
cfg = PretrainConfig(batch_size=4, seq_len=16, grad_accum=2, lr=3e-3, warmup_steps=2,
    max_steps=10, eval_every=5, eval_batches=2, log_every=1, checkpoint_every=5,
    precision="fp32", distributed=strategy, doc_mask=True)
pretrain(mcfg, cfg, shard_dir=shards, tokenizer_dir=shards, out_dir=out, seed=0, key="k")
"""


def test_ddp_and_fsdp_on_two_processes_match_one_process(shards, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), str(shards), str(tmp_path / "one"), "ddp"],
        check=True,
        env=env,
        capture_output=True,
    )
    ref = _losses(tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for strategy in ("ddp", "fsdp"):
        p = subprocess.run(
            [*torchrun, str(script), str(shards), str(tmp_path / strategy), strategy],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        got = _losses(tmp_path / strategy)
        assert [s for s, _ in got] == [s for s, _ in ref]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-4)
        a = load_file(tmp_path / "one/model/model.safetensors")
        b = load_file(tmp_path / strategy / "model/model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
        summary = json.loads((tmp_path / strategy / "summary.json").read_text())
        assert summary["world_size"] == 2
    shutil.rmtree(tmp_path / "ddp" / "model")  # the checkpoint of 2 ranks loads in one process
    assert isinstance(load_model(tmp_path / "fsdp" / "last"), Transformer)


def test_pretrain_with_a_config_file_and_bad_keys(tmp_path, monkeypatch, capsys):
    import lmlab.console
    from tests.conftest import lmlab_cmd, lmlab_here

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "base: smoke\nname: cfg\npretrain:\n  max_steps: 6\n  checkpoint_every: 2\n"
        "  keep_last: 2\n  doc_mask: true\n"
    )
    lmlab_cmd("pretrain", "--config", str(recipe), "--quiet", cwd=tmp_path, check=True)
    out = tmp_path / "runs/cfg/pretrain"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    # bad keys fail before any work: in this process (quicker than a process each); the
    # working directory and the console's settings a verb sets are restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lmlab.console, "_state", dict(lmlab.console._state))
    capsys.readouterr()
    for bad, fragment in [
        ("pretrain.spike_zscore=-1", "pretrain.spike_zscore"),
        ("pretrain.optimizer=sgd", "pretrain.optimizer"),
        ("pretrain.objective.noise_density=1.5", "noise_density"),
    ]:
        args = ("pretrain", "--config", str(recipe), "--set", bad)
        code, _, err = lmlab_here(monkeypatch, capsys, *args)
        assert code == 2 and fragment in err, err
        assert len(err.strip().splitlines()) == 1


def test_compiled_model_trains_to_the_same_losses(shards, tmp_path):
    from lmlab.data.shards import open_split

    stream = PackedStream(open_split(shards, "train"), None, 16, seed=5)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(5)
        out = tmp_path / str(compiled)
        train(
            Transformer(_model_cfg(shards)),
            lambda i, start, n: causal_batch(stream.rows(start, n)[0]),
            [],
            _cfg(compile=compiled, max_steps=3),
            out,
            shards,
            "k",
        )
        losses[compiled] = [loss for _, loss in _losses(out)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_a_measured_peak_below_the_sustained_rate_is_raised(shards, tmp_path, monkeypatch):
    """A peak timed on a busy machine must not make MFU read above 100%: the FLOP rate a
    run sustains is a lower bound on the device's, and the cache learns it."""
    from lmlab.train.mfu import device_name

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = f"{device_name(torch.device('cpu'))}|torch.float32|threads={torch.get_num_threads()}"
    (tmp_path / "cache" / "lmlab").mkdir(parents=True)
    (tmp_path / "cache" / "lmlab" / "peak_flops.json").write_text(json.dumps({key: 1000.0}))
    out = tmp_path / "o"
    _run_pretrain_loop(shards, out, _cfg(max_steps=4))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] <= 1 for r in rows if "mfu" in r)
    raised = json.loads((tmp_path / "cache" / "lmlab" / "peak_flops.json").read_text())[key]
    assert raised > 1000.0

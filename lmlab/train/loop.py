"""The training loop, written out (Zhao et al. §4.3): no trainer classes, one function.

Pre-training and SFT both call `train` with their own `get_batch(index, start_row, rows)`
and, if they want another loss than next-token cross-entropy, their own `objective`
(the loss seam, `lmlab.train.batch.LossFn`: `(model, batch) -> LossOut`):
the data is a pure function of its position (a micro-batch counter and a row offset),
so a run resumed from a checkpoint replays exactly the batches an uninterrupted run
would have seen and its per-step losses are identical (bitwise on CPU). Under `torchrun`
every rank asks only for its own slice of rows of each global batch.

Around the step: AdamW (fused where the device has a fused kernel), Adafactor or Muon for
the hidden matrices with AdamW for the rest (`lmlab.train.muon`); linear
warm-up then cosine decay to a floor; batch-size warm-up; gradient accumulation and
clipping; bf16/fp16 autocast (fp16 with a loss scaler); activation checkpointing;
torch.compile; loss-spike detection with rollback to the last checkpoint and skipping of
the offending batches (PaLM, OPT); DDP/FSDP; metrics to JSONL, TensorBoard and W&B.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmlab.config import STRICT, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from lmlab.console import log, progress
from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.loading import load_model
from lmlab.model.precision import autocast, resolve_precision
from lmlab.train import distributed as dist_
from lmlab.train.batch import Batch, LossFn, LossOut, as_batch, token_cross_entropy
from lmlab.train.distributed import Dist
from lmlab.train.metrics import line_kind
from lmlab.train.muon import MuonAdamW, hidden_matrices
from lmlab.train.observe import MetricsSink, truncate_metrics
from lmlab.train.schedule import lr_at
from lmlab.utils import read_json, write_json

# get_batch(index, start_row, rows): micro-batch `index` of the run; this rank's `rows`
# rows starting at global row `start_row` of the data order.
GetBatch = Callable[[int, int, int], Batch | tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    """Optimisation, budget and bookkeeping. Training stops at the first budget reached."""

    __pydantic_config__ = STRICT

    batch_size: PosInt = 16  # global rows per micro-batch, split across data-parallel ranks
    seq_len: PosInt = 256
    grad_accum: PosInt = 1
    optimizer: Literal["adamw", "adafactor", "muon"] = "adamw"
    fused: bool | None = None  # fused AdamW kernel; None = where torch has one (CUDA, CPU)
    lr: PosFloat = 1e-3
    min_lr_ratio: Fraction = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: NonNegInt = 50
    weight_decay: NonNegFloat = 0.1
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    grad_clip: NonNegFloat = 1.0  # 0 disables clipping
    # optimizer muon: the blocks' matrices take Muon at peak lr `muon_lr` (scheduled like
    # `lr`), everything else AdamW at `lr`. `muon_adjust` scales the lr per matrix shape:
    # "original" (Jordan: sqrt(max(1, rows/cols)), lr ~0.01–0.02) or "match_rms_adamw"
    # (Moonshot: 0.2·sqrt(max(rows, cols)), an AdamW-sized lr). Weight decay per step
    # equals AdamW's on the same matrix. 0.01 "original" measured best on the tiny recipe
    # (benchmarks/muon_tiny.py; docs/training.md)
    muon_lr: PosFloat = 0.01
    muon_momentum: Fraction = 0.95
    muon_adjust: Literal["original", "match_rms_adamw"] = "original"
    # batch-size warm-up (GPT-3): rows per micro-batch grow linearly from
    # `batch_warmup_start` to `batch_size` over the first `batch_warmup_tokens` tokens
    batch_warmup_tokens: NonNegInt = 0
    batch_warmup_start: PosInt = 1
    # auto = bf16 on a GPU with bf16, or a CPU with native bf16 matmuls (AVX512-BF16/AMX),
    # else fp32: on an AVX2-only CPU bf16 autocast measured ~27x slower (docs/benchmarks.md).
    # fp16 uses a dynamic loss scaler.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on GPU)
    distributed: Literal["ddp", "fsdp"] = "ddp"  # strategy when launched by torchrun
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: PosInt | None = None
    max_tokens: PosInt | None = None
    max_minutes: PosFloat | None = None
    eval_every: PosInt = 100
    eval_batches: PosInt = 8
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100
    keep_last: PosInt = 1  # periodic checkpoints kept (the newest is `last/`)
    keep_best: bool = True  # keep the checkpoint with the lowest validation loss in `best/`
    # loss spikes (SpikeDetector): a loss above the median of the last 10 steps by
    # `spike_zscore` robust deviations (and by 5%) is a spike; 0 disables detection.
    # Finite losses are checked only after `spike_grace_steps` steps (None: twice the
    # warm-up, at least 20): early losses say little about a run's noise
    spike_zscore: NonNegFloat = 6.0
    spike_grace_steps: NonNegInt | None = None
    spike_rollback: bool = True  # reload the last checkpoint and skip the batches since
    max_rollbacks: NonNegInt = 5
    tensorboard: bool = False  # also write TensorBoard events under <out>/tensorboard
    wandb_project: str | None = None  # also log to Weights & Biases (needs `wandb`)

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise UsageError("no training budget: set max_steps, max_tokens or max_minutes")
        if self.optimizer == "muon" and self.distributed == "fsdp":
            raise UsageError(
                "optimizer: muon does not support distributed: fsdp (Muon orthogonalises "
                "whole matrices, FSDP shards them); use distributed: ddp or optimizer: adamw"
            )
        if self.batch_warmup_start > self.batch_size:
            raise UsageError(
                f"batch_warmup_start: {self.batch_warmup_start} exceeds batch_size="
                f"{self.batch_size}"
            )

    @property
    def spike_grace(self) -> int:
        """Steps trained before a finite loss can be a spike (calibration: docs/training.md)."""
        if self.spike_grace_steps is not None:
            return self.spike_grace_steps
        return max(20, 2 * self.warmup_steps)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def budget(self) -> str:
        """The training budget in words ("up to 120 steps", "up to 120 steps or 5
        minutes"), for the log lines that announce a run."""
        parts = [f"{self.step_limit} steps"] if self.step_limit is not None else []
        if self.max_minutes is not None:
            parts.append(f"{self.max_minutes:g} minutes")
        return "up to " + " or ".join(parts) if parts else "without a limit"

    @property
    def step_limit(self) -> int | None:
        """The step budget implied by `max_steps`/`max_tokens` (without batch warm-up)."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.max_tokens is not None:
            limits.append(math.ceil(self.max_tokens / self.tokens_per_step))
        return min(limits) if limits else None


def _fused_default(device: torch.device) -> bool:
    """Fused AdamW wherever torch has the kernel (CUDA and CPU): one pass over parameters
    and states instead of ~10. On this project's 2-core CPU it measured 1.02–1.25× per step
    (docs/benchmarks.md), for a one-off ~1.5 s import of torch._dynamo per process."""
    return device.type in ("cuda", "cpu")


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW, Adafactor or Muon+AdamW; weight decay on matrices only (not norms/gains/
    biases), as in GPT-3 and LLaMA. Parameters are grouped by name, so FSDP shards group
    the same way. A group's `lr_scale` is its peak lr over `cfg.lr` (the loop's schedule
    multiplies by it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = device or next(model.parameters()).device
    fused = _fused_default(device) if cfg.fused is None else cfg.fused
    if cfg.optimizer == "muon":
        hidden = hidden_matrices(model)
        if not any(id(p) in hidden for _, p in named):
            raise UsageError("optimizer: muon needs transformer blocks with trainable matrices")
        scale = cfg.muon_lr / cfg.lr
        muon = {
            "params": [p for _, p in named if id(p) in hidden],
            "lr": cfg.muon_lr,
            "lr_scale": scale,
            # Muon decays by lr·wd per step: divide by the scale so a matrix decays as
            # fast as under AdamW at `cfg.lr`
            "weight_decay": cfg.weight_decay / scale,
        }
        rest = [(n, p) for n, p in named if id(p) not in hidden]
        adamw = [
            {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        for g in adamw:
            g.update(lr=cfg.lr, lr_scale=1.0)
        return MuonAdamW(
            [muon],
            [g for g in adamw if g["params"]],
            momentum=cfg.muon_momentum,
            adjust_lr_fn=cfg.muon_adjust,
            betas=(cfg.beta1, cfg.beta2),
            fused=fused,
        )
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adafactor":
        # factored second moments: O(rows + cols) memory per matrix instead of O(rows·cols)
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: list[Batch],
    precision: str,
    d: Dist | None = None,
    objective: LossFn = token_cross_entropy,
) -> float:
    """The objective's summed loss over `batches` divided by its summed count (for the
    default, the token-weighted mean cross-entropy); under DDP/FSDP each rank scores a
    slice."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for b in batches:
        b = as_batch(b)
        n = b.inputs.shape[0] // d.world
        if n == 0:
            continue
        b = b.rows(slice(d.rank * n, (d.rank + 1) * n)).to(d.device)
        with autocast(precision, d.device):
            out = objective(model, b)
        total += float(out.loss_sum)
        count += float(out.count)
    model.train(was_training)
    total, count = dist_.all_sum([total, count], d)
    return total / max(count, 1)


@dataclass
class SpikeDetector:
    """Robust running statistics of the training loss, immune to the spike itself and to
    the steady descent: the level is the median of the last `level_window` losses, the
    noise the median absolute deviation of step-to-step changes over the last `window`
    (×1.4826/√2: a standard deviation for Gaussian noise), so a falling curve does not
    inflate it as a plain variance would.

    A step is a spike when its loss exceeds the level by `zscore` deviations and by 5%
    (non-finite losses always are). The first `grace` steps only feed the statistics: a
    model near its initialisation gives almost the same loss on every batch, so the noise
    measured then is far below the noise once it tells batches apart, and warm-up brings
    one-batch outliers that the next step forgets. Flagging one there rolls back to step 0
    and skips every batch since (calibration in docs/training.md)."""

    zscore: float
    grace: int = 0  # the loop passes `TrainConfig.spike_grace`
    window: int = 50
    level_window: int = 10
    history: list[float] = field(default_factory=list)
    steps: int = 0  # losses accepted so far, i.e. steps trained: the grace period's clock

    @property
    def median(self) -> float:
        return float(np.median(self.history[-self.level_window :])) if self.history else 0.0

    @property
    def deviation(self) -> float:
        if len(self.history) < 3:
            return 0.0
        diffs = np.diff(self.history)
        mad = float(np.median(np.abs(diffs - np.median(diffs))))
        return max(1.4826 * mad / math.sqrt(2), 0.005 * abs(self.median))

    def score(self, loss: float) -> float:
        """How many noise units `loss` lies above the level (0 before there is a noise)."""
        dev = self.deviation
        return (loss - self.median) / dev if dev > 0 else 0.0

    def check(self, loss: float) -> bool:
        if self.zscore <= 0:
            return False
        if not math.isfinite(loss):
            return True
        spike = (
            self.steps >= self.grace
            and self.score(loss) > self.zscore
            and loss > 1.05 * self.median
        )
        if not spike:  # a spike does not move the statistics it is judged against
            self.history = [*self.history, loss][-self.window :]
            self.steps += 1
        return spike

    def state(self) -> dict:
        return {"history": list(self.history), "steps": self.steps}

    def load(self, s: dict) -> None:
        self.history = [float(x) for x in s.get("history", [])]
        self.steps = int(s.get("steps", len(self.history)))


@dataclass
class Position:
    """Where training is: what a checkpoint must restore for an exact resume."""

    step: int = 0
    tokens: int = 0  # input tokens trained on, all ranks
    batches: int = 0  # micro-batches drawn (the `index` of get_batch)
    rows: int = 0  # global data rows drawn (the data position)
    elapsed_s: float = 0.0
    warmup_progress: float | None = None
    best_val: float | None = None
    spikes: dict = field(default_factory=dict)


Sum = torch.Tensor | float


def _accumulate(total: Sum, v: torch.Tensor | float) -> Sum:
    """`total + v` in float64 without reading a device tensor back to the host: the same
    bits as summing Python floats, with no device sync per micro-batch."""
    if isinstance(v, torch.Tensor):
        return v.detach().double().reshape(()) + total
    return total + float(v)


def _to_host(values: list[Sum]) -> list[float]:
    """The sums as floats, with one device sync for all the tensors among them."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


@dataclass
class StepSums:
    """One step's objective outputs, summed over its micro-batches on this rank; device
    tensors stay on the device until `reduce`, once per optimizer step."""

    loss: Sum = 0.0
    count: Sum = 0.0
    metrics: dict[str, Sum] = field(default_factory=dict)
    aux: bool = False  # an aux_loss was added to some micro-batch's loss
    global_count: float = 0.0  # the count over every rank, once reduced

    def add(self, out: LossOut) -> None:
        self.loss = _accumulate(self.loss, out.loss_sum)
        self.count = _accumulate(self.count, out.count)
        for k, v in out.metrics.items():
            self.metrics[k] = _accumulate(self.metrics.get(k, 0.0), v)
        self.aux = self.aux or out.aux_loss is not None

    def reduce(self, d: Dist) -> tuple[float, dict[str, float]]:
        """The step's loss and metrics over every rank, each divided by the summed count
        (every rank must return the same metric names)."""
        keys = sorted(self.metrics)
        local = _to_host([self.loss, self.count, *(self.metrics[k] for k in keys)])
        total = dist_.all_sum(local, d)
        self.global_count = total[1]
        n = max(total[1], 1.0)
        return total[0] / n, {k: v / n for k, v in zip(keys, total[2:], strict=True)}

    def renormalise(self, model: torch.nn.Module, targets: float, name: str) -> None:
        """Each backward scaled its loss by the step's target count, known before the
        forward (so gradient accumulation keeps no graphs); an objective that counts
        something else (pairs, sequences) gets the gradients rescaled to its own count."""
        if self.global_count == targets:
            return
        if self.aux:  # the aux loss, added unnormalised, would be rescaled with the rest
            raise UsageError(
                f"{name}: the objective's count ({self.global_count:g}) is not the step's "
                f"target count ({targets:g}) and it adds an aux_loss, which the rescaling "
                "would scale too; count the targets, or add the aux loss into loss_sum"
            )
        factor = max(targets, 1.0) / max(self.global_count, 1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


def backward_step(
    runner: torch.nn.Module,
    wrapped: torch.nn.Module,
    objective: LossFn,
    micro: list[Batch],
    total_targets: float,
    precision: str,
    scaler: torch.amp.GradScaler,
    d: Dist,
) -> StepSums:
    """Forward and backward through `objective` over one step's micro-batches (already on
    the device), gradients all-reduced on the last one only. Each loss is scaled by the
    step's target count over every rank, known before the forward, so no graph is kept
    across micro-batches; `StepSums.renormalise` corrects an objective that counts otherwise.
    `runner` is what the forward calls (maybe compiled), `wrapped` the DDP/FSDP module."""
    sums = StepSums()
    for i, b in enumerate(micro):
        with dist_.no_sync(wrapped, i == len(micro) - 1):
            with autocast(precision, d.device):
                lo = objective(runner, b)
            # DDP/FSDP average gradients over ranks: scale by the world so the
            # result is the mean over every target of the global step
            loss = lo.loss_sum * (d.world / max(total_targets, 1.0))
            if lo.aux_loss is not None:
                loss = loss + lo.aux_loss.to(loss.dtype)
            scaler.scale(loss).backward()
        sums.add(lo)
    return sums


def _with_metrics(row: dict, metrics: dict[str, float], name: str) -> dict:
    """A logged step plus the objective's metrics, which may not shadow the loop's fields
    nor carry a key that makes `line_kind` (so every reader) file the line as another kind."""
    for k in sorted(metrics):
        if k in row:
            raise UsageError(f"{name}: the objective's metric {k!r} is a field the loop logs")
        if line_kind({**row, k: 0.0}) != "train":
            raise UsageError(
                f"{name}: the objective's metric {k!r} is a key that marks another kind of "
                "metrics.jsonl line (lmlab.train.metrics.line_kind); rename it"
            )
    return {**row, **{k: round(v, 5) for k, v in metrics.items()}}


def batch_rows(cfg: TrainConfig, tokens: int, world: int) -> int:
    """Global rows in the next micro-batch (batch-size warm-up), a multiple of `world`."""
    rows = cfg.batch_size
    if cfg.batch_warmup_tokens and tokens < cfg.batch_warmup_tokens:
        frac = tokens / cfg.batch_warmup_tokens
        rows = int(cfg.batch_warmup_start + (cfg.batch_size - cfg.batch_warmup_start) * frac)
    return max(world, rows - rows % world)


class _Stop(Exception):
    """Raised at a step boundary after Ctrl-C or SIGTERM asked training to stop."""


def train(
    model: torch.nn.Module,
    get_batch: GetBatch,
    val_batches: list[Batch],
    cfg: TrainConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    key: str,
    name: str = "train",
    objective: LossFn = token_cross_entropy,
) -> dict:
    """Train `model` under `out_dir`, resuming from its newest checkpoint if `key` matches.

    `objective(model, batch)` is the loss of a micro-batch (training and validation):
    the loop minimises its summed loss over a step divided by its summed count and logs
    its metrics beside the loss.

    Writes `metrics.jsonl` (one line per logged step, plus `val_loss` and `event` lines),
    `last/` (checkpoint + trainer state, every `checkpoint_every` steps and on
    interruption; older ones in `checkpoints/` when `keep_last` > 1), `best/` and
    `model/` (final). Returns a summary dict (on every rank).

    An objective whose results depend on what came before (an adaptive KL coefficient)
    carries that as `objective.state`, an object with `state_dict()` (JSON-able) and
    `load_state_dict(d)`: it is saved with every checkpoint and restored on resume and on
    a spike's rollback, so both stay exact.
    """
    peft = getattr(model, "peft_config", None)
    if peft is not None:  # an adapter's shape is part of what a checkpoint resumes
        key = f"{key}|peft:{json.dumps(asdict(peft), sort_keys=True)}"
    d = dist_.setup(cfg.device)
    out = Path(out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    dist_.barrier()
    if d.world > 1 and cfg.batch_size % d.world:
        raise UsageError(f"batch_size: {cfg.batch_size} is not divisible by {d.world} ranks")
    precision = resolve_precision(cfg.precision, d.device)
    if precision == "fp16" and d.active and cfg.distributed == "fsdp":
        raise UsageError("precision fp16 with fsdp is not supported; use bf16 or fp32")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    plain = model.to(d.device)
    plain.train()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(plain)
    wrapped = dist_.wrap(plain, cfg.distributed, d)
    opt = make_optimizer(wrapped, cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    runner = torch.compile(wrapped) if cfg.compile else wrapped
    spikes = SpikeDetector(cfg.spike_zscore, cfg.spike_grace)
    pos = Position()
    stateful = getattr(objective, "state", None)

    if d.main:  # a kill between save_checkpoint's two renames leaves only `.last.old`
        previous = out / ".last.old"
        if not (out / "last").exists() and (previous / "trainer_state.json").is_file():
            os.replace(previous, out / "last")
    dist_.barrier()
    found = find_checkpoint(out)
    if found is not None:
        state = read_json(found / "trainer_state.json")
        if state.get("key") == key:
            pos = restore(wrapped, opt, scaler, spikes, found, state, stateful)
            if d.main:
                log(f"{name}: resuming from step {pos.step} ({pos.tokens:,} tokens) in {found}")
        elif d.main:
            log(f"{name}: ignoring {found} (it was trained with another config)")
    if d.main:
        truncate_metrics(out / "metrics.jsonl", pos.step)
    dist_.barrier()

    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None

    def progress_of(p: Position, elapsed: float) -> float:
        fr = [0.0]
        if cfg.max_steps:
            fr.append(p.step / cfg.max_steps)
        if cfg.max_tokens:
            fr.append(p.tokens / cfg.max_tokens)
        if max_seconds:
            fr.append(elapsed / max_seconds)
        return max(fr)

    t0 = time.monotonic()

    def elapsed_now() -> float:
        return pos.elapsed_s + (time.monotonic() - t0)

    def checkpoint() -> None:
        """Every rank joins (FSDP gathers shards); rank 0 writes."""
        st = {"key": key, **asdict(pos), "elapsed_s": elapsed_now(), "spike_stats": spikes.state()}
        if stateful is not None:
            st["objective_state"] = stateful.state_dict()
        model_state, opt_state = dist_.full_state(wrapped, opt)
        if d.main:
            rotate_checkpoints(out, cfg.keep_last)
            blob = {
                "optimizer": opt_state,
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(
                plain,
                out / "last",
                tokenizer_dir,
                state=model_state,
                write_extra=lambda p: _write_state(p, blob, st),
            )
        dist_.barrier()

    def save_best(val: float) -> None:
        model_state, _ = dist_.full_state(wrapped, opt) if d.active else (plain.state_dict(), {})
        if d.main:
            save_checkpoint(
                plain,
                out / "best",
                tokenizer_dir,
                state=model_state,
                extra={"best": {"step": pos.step, "val_loss": val}},
            )
        dist_.barrier()

    # Ctrl-C / SIGTERM only raise a flag; the loop stops at the next step boundary, so
    # the checkpoint never holds a half-applied step. A second signal stops at once.
    stop_requested = False

    def on_signal(signum, frame):
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in handled} if in_main else {}
    flops_per_token: float | None = None
    peak = None
    if found is None and cfg.spike_zscore > 0 and cfg.spike_rollback:
        checkpoint()  # the first rollback target
    t_log, tok_log = time.monotonic(), pos.tokens
    val_loss = None
    tps = 0.0
    sink = MetricsSink(out, cfg, d.main, run_config={"name": name, "train": asdict(cfg)})
    try:
        with progress(name, total=100, unit="%", disable=not d.main) as bar:
            while True:
                if progress_of(pos, elapsed_now()) >= 1.0:
                    break
                if pos.step >= cfg.warmup_steps and pos.warmup_progress is None:
                    pos.warmup_progress = progress_of(pos, elapsed_now())  # the cosine starts
                lr = lr_at(
                    pos.step,
                    progress_of(pos, elapsed_now()),
                    cfg.lr,
                    cfg.warmup_steps,
                    cfg.min_lr_ratio,
                    pos.warmup_progress or 0.0,
                )
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                micro, counts = [], []
                step_rows = batch_rows(cfg, pos.tokens, d.world)
                per_rank = step_rows // d.world
                for _ in range(cfg.grad_accum):
                    b = as_batch(get_batch(pos.batches, pos.rows + d.rank * per_rank, per_rank))
                    counts.append(float(b.n_targets))  # on the host copy: no device sync
                    micro.append(b.to(d.device))
                    pos.batches += 1
                    pos.rows += step_rows
                total_targets = dist_.all_sum([sum(counts)], d)[0]
                sums = backward_step(
                    runner, wrapped, objective, micro, total_targets, precision, scaler, d
                )
                step_tokens = sum(b.inputs.numel() for b in micro) * d.world
                if flops_per_token is None:
                    flops_per_token, peak = _flop_rates(plain, micro[0], precision, d)
                train_loss, step_metrics = sums.reduce(d)
                if spikes.check(train_loss):
                    opt.zero_grad(set_to_none=True)
                    pos = _on_spike(
                        pos, train_loss, spikes, cfg, out, name, d, sink, wrapped, opt, scaler,
                        stateful,
                    )  # fmt: skip
                    t_log, tok_log = time.monotonic(), pos.tokens
                    continue
                sums.renormalise(wrapped, total_targets, name)
                scaler.unscale_(opt)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                scaler.step(opt)  # skipped (and the scale lowered) if fp16 grads overflowed
                scaler.update()
                opt.zero_grad(set_to_none=True)
                pos.step += 1
                pos.tokens += step_tokens
                if not math.isfinite(train_loss):
                    raise UsageError(
                        f"{name}: loss became {train_loss} at step {pos.step}; lower the "
                        "learning rate, use precision fp32, or enable spike rollback"
                    )
                now = time.monotonic()
                if pos.step % cfg.log_every == 0 or pos.step == 1:
                    tps = (pos.tokens - tok_log) / max(now - t_log, 1e-9)
                    t_log, tok_log = now, pos.tokens
                    if tps * flops_per_token / d.world > peak:
                        # the measured peak was low (timed on a busy machine): the
                        # FLOP rate this run sustains is a lower bound on the real one
                        peak = raise_cached_peak(
                            d.device, precision, tps * flops_per_token / d.world
                        )
                    row = {
                        "step": pos.step,
                        "tokens": pos.tokens,
                        "loss": round(train_loss, 5),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 5),
                        "tokens_per_s": round(tps, 1),
                        "mfu": round(tps * flops_per_token / (peak * d.world), 5),
                        "batch_rows": step_rows * cfg.grad_accum,
                        "elapsed_s": round(elapsed_now(), 2),
                    }
                    if precision == "fp16":
                        row["loss_scale"] = scaler.get_scale()
                    sink.write(_with_metrics(row, step_metrics, name))
                if pos.step % cfg.eval_every == 0 and val_batches:
                    val_loss = evaluate_loss(runner, val_batches, precision, d, objective)
                    sink.write(
                        {"step": pos.step, "tokens": pos.tokens, "val_loss": round(val_loss, 5)}
                    )
                    if cfg.keep_best and (pos.best_val is None or val_loss < pos.best_val):
                        pos.best_val = val_loss
                        save_best(val_loss)
                if pos.step % cfg.checkpoint_every == 0:
                    checkpoint()
                if dist_.broadcast_flag(stop_requested, d):
                    raise _Stop()
                done = progress_of(pos, elapsed_now())
                bar.update(
                    completed=min(100.0, 100 * done),
                    status=f"step {pos.step} loss {train_loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s"
                    + f" mfu {100 * tps * flops_per_token / (peak * d.world):.1f}%"
                    + (f" val {val_loss:.3f}" if val_loss is not None else ""),
                )
    except _Stop:
        checkpoint()
        if d.main:
            log(
                f"{name}: interrupted at step {pos.step}; checkpoint saved in {out / 'last'}. "
                "Rerun to resume."
            )
        sink.close()
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        if d.main:
            log(f"{name}: stopped at once; rerun to resume from the last periodic checkpoint.")
        sink.close()
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if val_batches:
        val_loss = evaluate_loss(runner, val_batches, precision, d, objective)
        sink.write({"step": pos.step, "tokens": pos.tokens, "val_loss": round(val_loss, 5)})
        if cfg.keep_best and (pos.best_val is None or val_loss < pos.best_val):
            pos.best_val = val_loss
            save_best(val_loss)
    sink.close()
    elapsed = elapsed_now()
    summary = {
        "steps": pos.step,
        "tokens": pos.tokens,
        "seconds": round(elapsed, 2),
        "final_val_loss": val_loss,
        "best_val_loss": pos.best_val,
        "tokens_per_s": round(pos.tokens / max(elapsed, 1e-9), 1),
        "mfu": round(
            pos.tokens / max(elapsed, 1e-9) * (flops_per_token or 0) / (peak or 1) / d.world, 5
        ),
        "peak_flops": peak,
        "spikes": pos.spikes.get("count", 0),
        "rollbacks": pos.spikes.get("rollbacks", 0),
        "world_size": d.world,
        "config": asdict(cfg),
    }
    model_state, _ = dist_.full_state(wrapped, opt) if d.active else (plain.state_dict(), {})
    if d.main:
        save_checkpoint(
            plain, out / "model", tokenizer_dir, extra={"training": summary}, state=model_state
        )
        write_json(out / "summary.json", summary)
    dist_.barrier()
    return summary


def _precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _flop_rates(model, batch: Batch, precision: str, d: Dist) -> tuple[float, float]:
    """Model FLOPs per trained token at this sequence length, and the device's peak."""
    flops = getattr(model, "flops_per_token", None) or model.cfg.flops_per_token
    fpt = float(flops(batch.inputs.shape[1], training=True))
    return fpt, cached_peak_flops(d.device, _precision_dtype(precision))


def _peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmlab"


def raise_cached_peak(device: torch.device, precision: str, achieved: float) -> float:
    """Raise a measured (not spec-sheet) peak to a FLOP rate actually sustained, in the
    cache too, so MFU never reads above 100% and later runs start from the better value."""
    from lmlab.train.mfu import device_name, spec_peak_flops

    dtype = _precision_dtype(precision)
    name = device_name(device)
    if spec_peak_flops(name, dtype) is not None:
        return cached_peak_flops(device, dtype)  # a spec sheet is a true upper bound
    key = f"{name}|{dtype}|threads={torch.get_num_threads()}"
    path = _peak_cache() / "peak_flops.json"
    try:
        known = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known[key] = max(float(known.get(key, 0.0)), achieved)
    with suppress(OSError):  # a read-only home: keep the raised value for this run only
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    return known[key]


def cached_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's peak FLOP/s: the spec sheet for known GPUs, else measured once per
    (machine, dtype, threads) and kept in ~/.cache/lmlab/peak_flops.json (measuring takes
    seconds, and every run would otherwise pay it)."""
    from lmlab.train.mfu import device_name, peak_flops, spec_peak_flops

    name = device_name(device)
    if spec_peak_flops(name, dtype) is not None:
        return peak_flops(device, dtype).flops
    key = f"{name}|{dtype}|threads={torch.get_num_threads()}"
    cache = _peak_cache()
    path = cache / "peak_flops.json"
    try:
        known = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = peak_flops(device, dtype, measure=True).flops
        try:
            cache.mkdir(parents=True, exist_ok=True)
            write_json(path, known)
        except OSError:
            pass  # a read-only home: measure again next time
    return float(known[key])


def _on_spike(
    pos, loss, spikes, cfg, out, name, d, sink, model, opt, scaler, stateful=None
) -> Position:
    """Log a loss spike; roll back to the last checkpoint and skip the batches since."""
    count = pos.spikes.get("count", 0) + 1
    rollbacks = pos.spikes.get("rollbacks", 0)
    skipped = list(pos.spikes.get("skipped", []))
    event = {
        "step": pos.step + 1,
        "event": "loss_spike",
        "loss": round(loss, 5) if math.isfinite(loss) else str(loss),
        "running_median": round(spikes.median, 5),
        "running_deviation": round(spikes.deviation, 5),
    }
    data_pos = (pos.batches, pos.rows)
    if cfg.spike_rollback:
        if rollbacks >= cfg.max_rollbacks:
            raise UsageError(
                f"{name}: loss spike at step {pos.step + 1} after {rollbacks} rollbacks "
                f"(pretrain.max_rollbacks); lower the learning rate or raise grad_clip"
            )
        last = find_checkpoint(out)
        if last is None:
            raise CheckpointError(f"{out}: no checkpoint to roll back to")
        state = read_json(last / "trainer_state.json")
        restored = restore(model, opt, scaler, spikes, last, state, stateful)
        sink.truncate(restored.step)
        skipped.append([restored.rows, data_pos[1]])
        event.update(
            rolled_back_to=restored.step,
            skipped_rows=[restored.rows, data_pos[1]],
            action="rollback",
        )
        rollbacks += 1
        restored.elapsed_s = pos.elapsed_s  # wall-clock time keeps running through a rollback
        pos = restored
    else:
        skipped.append([data_pos[1] - 1, data_pos[1]])
        event["action"] = "skip_batch"
    # either way, training goes on from the data after the offending batch
    pos.batches, pos.rows = data_pos
    pos.spikes = {"count": count, "rollbacks": rollbacks, "skipped": skipped}
    sink.write(event)
    if d.main:
        log(
            f"{name}: loss spike at step {event['step']} ({event['loss']} vs running median "
            f"{event['running_median']}); "
            + (
                f"rolled back to step {pos.step}, skipping rows {skipped[-1][0]}-{skipped[-1][1]}"
                if cfg.spike_rollback
                else "skipped the batch"
            )
        )
    return pos


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every transformer block's activations during backward instead of storing
    them: memory per layer drops to its input, for ~1/3 more compute. Parameter names
    (and so checkpoints) are unchanged: only each block's `forward` is wrapped."""
    from torch.utils.checkpoint import checkpoint

    for m in model.modules():
        if type(m).__name__ == "Block" and not getattr(m, "_act_ckpt", False):
            inner = m.forward

            def forward(*args, _f=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            m._act_ckpt = True


# -- checkpoints ---------------------------------------------------------------------------

_STEP_DIR = re.compile(r"step-(\d+)")


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under `out`: `last/` or a kept `checkpoints/step-N`."""
    candidates = [out / "last"]
    if (out / "checkpoints").is_dir():
        candidates += sorted((out / "checkpoints").iterdir())
    best, best_step = None, -1
    for c in candidates:
        f = c / "trainer_state.json"
        if f.is_file():
            try:
                step = int(read_json(f)["step"])
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue
            if step > best_step:
                best, best_step = c, step
    return best


def rotate_checkpoints(out: Path, keep_last: int) -> None:
    """Before a new `last/` is written: keep the current one as `checkpoints/step-N` when
    `keep_last` > 1, and prune the oldest beyond `keep_last - 1`."""
    last = out / "last"
    if keep_last <= 1 or not (last / "trainer_state.json").is_file():
        return
    step = int(read_json(last / "trainer_state.json")["step"])
    kept = out / "checkpoints"
    kept.mkdir(exist_ok=True)
    target = kept / f"step-{step:08d}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(last, target)  # a copy: `last/` stays valid until the new one replaces it
    olds = sorted(p for p in kept.iterdir() if _STEP_DIR.fullmatch(p.name))
    for p in olds[: max(0, len(olds) - (keep_last - 1))]:
        shutil.rmtree(p)


def _write_state(d: Path, blob: dict, state: dict) -> None:
    torch.save(blob, d / "trainer_state.pt")
    write_json(d / "trainer_state.json", state)


def restore(
    model, opt, scaler, spikes: SpikeDetector, ckpt: Path, state: dict, stateful=None
) -> Position:
    """Load weights, optimizer, loss scaler, RNG, position and the objective's state (if
    it keeps one) from checkpoint `ckpt`."""
    try:
        weights = load_model(ckpt).state_dict()
        blob = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        dist_.load_full_state(model, opt, weights, blob["optimizer"])
        if blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["torch_rng"])
        if state.get("spike_stats"):
            spikes.load(state["spike_stats"])
        if stateful is not None and "objective_state" in state:
            stateful.load_state_dict(state["objective_state"])
        return Position(
            step=int(state["step"]),
            tokens=int(state["tokens"]),
            batches=int(state["batches"]),
            rows=int(state["rows"]),
            elapsed_s=float(state["elapsed_s"]),
            warmup_progress=state.get("warmup_progress"),
            best_val=state.get("best_val"),
            spikes=state.get("spikes") or {},
        )
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: cannot resume ({e}); delete it to start over") from None


warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on our logits

"""The training loop, written out: AdamW, warm-up + cosine, clipping, autocast, checkpoints.

Pre-training and SFT both call `train` with their own `get_batch(step)`. Batches are a
pure function of (seed, step), so resuming from a checkpoint at step s replays exactly
the batches an uninterrupted run would have seen: the per-step losses are identical.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmlab.config import STRICT, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from lmlab.console import log, progress
from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import load_model, save_checkpoint
from lmlab.model.transformer import Transformer
from lmlab.train.schedule import lr_at
from lmlab.utils import read_json, write_json

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs [B, T], targets [B, T] (-100 = no loss)


@dataclass
class TrainConfig:
    """Optimisation and budget. Training stops at the first budget reached."""

    __pydantic_config__ = STRICT

    batch_size: PosInt = 16
    seq_len: PosInt = 256
    grad_accum: PosInt = 1
    lr: PosFloat = 1e-3
    min_lr_ratio: Fraction = 0.1
    warmup_steps: NonNegInt = 50
    weight_decay: NonNegFloat = 0.1
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    grad_clip: NonNegFloat = 1.0  # 0 disables clipping
    # auto = bf16 autocast where the CPU has native bf16 matmuls (AVX512-BF16/AMX), else fp32:
    # on an AVX2-only CPU bf16 autocast measured ~27x slower than fp32 (docs/benchmarks.md).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    max_steps: PosInt | None = None
    max_tokens: PosInt | None = None
    max_minutes: PosFloat | None = None
    eval_every: PosInt = 100
    eval_batches: PosInt = 8
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise UsageError("no training budget: set max_steps, max_tokens or max_minutes")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def step_limit(self) -> int | None:
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.max_tokens is not None:
            limits.append(math.ceil(self.max_tokens / self.tokens_per_step))
        return min(limits) if limits else None


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def with_aux_loss(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """The loss to differentiate: plus a mixture-of-experts model's weighted load-balancing
    loss from the same forward (the logged loss stays the cross-entropy alone)."""
    aux = model.aux_loss() if hasattr(model, "aux_loss") else None
    return loss if aux is None else loss + aux.to(loss.dtype)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms/gains), as in GPT-3/LLaMA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(precision: str):
    if resolve_precision(precision) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: list[Batch], precision: str) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(precision):
            logits = model(x)
        n = int((y != -100).sum())
        total += loss_fn(logits, y).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


class _Stop(Exception):
    """Raised at a step boundary after Ctrl-C or SIGTERM asked training to stop."""


def train(
    model: Transformer,
    get_batch: Callable[[int], Batch],
    val_batches: list[Batch],
    cfg: TrainConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    key: str,
    name: str = "train",
) -> dict:
    """Train `model` under `out_dir`, resuming from `out_dir/last` if its key matches.

    Writes `metrics.jsonl` (one line per logged step), `last/` (checkpoint + trainer
    state, every `checkpoint_every` steps and on interruption) and `model/` (final).
    Returns a summary dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opt = make_optimizer(model, cfg)
    step, tokens, elapsed_before = 0, 0, 0.0
    warmup_progress: float | None = None
    last = out / "last"
    previous = out / ".last.old"  # a kill between save_checkpoint's two renames leaves this
    if not last.exists() and (previous / "trainer_state.json").is_file():
        os.replace(previous, last)
    if (last / "trainer_state.json").is_file():
        state = read_json(last / "trainer_state.json")
        if state.get("key") == key:
            step, tokens, elapsed_before = _restore(model, opt, last, state)
            warmup_progress = state.get("warmup_progress")
            log(f"{name}: resuming from step {step} ({tokens:,} tokens) in {last}")
        else:
            log(f"{name}: ignoring {last} (it was trained with another config)")
    _truncate_metrics(out / "metrics.jsonl", step)

    limit = cfg.step_limit
    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None

    def progress_of(s: int, elapsed: float) -> float:
        fr = [s / limit] if limit else []
        if max_seconds:
            fr.append(elapsed / max_seconds)
        return max(fr)

    def checkpoint() -> None:
        st = {
            "key": key,
            "step": step,
            "tokens": tokens,
            "warmup_progress": warmup_progress,
            "elapsed_s": elapsed_before + (time.monotonic() - t0),
        }
        save_checkpoint(model, last, tokenizer_dir, write_extra=lambda d: _write_state(d, opt, st))

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
    model.train()
    t0 = time.monotonic()
    t_log, tok_log = t0, tokens
    val_loss = None
    tps = 0.0
    try:
        # the bar counts percent of the budget: steps, tokens or minutes, whichever ends first
        with (
            open(out / "metrics.jsonl", "a", encoding="utf-8") as metrics,
            progress(name, total=100, unit="%") as bar,
        ):
            while True:
                elapsed = elapsed_before + (time.monotonic() - t0)
                if progress_of(step, elapsed) >= 1.0:
                    break
                if step >= cfg.warmup_steps and warmup_progress is None:
                    warmup_progress = progress_of(step, elapsed)  # the cosine starts here
                lr = lr_at(
                    step,
                    progress_of(step, elapsed),
                    cfg.lr,
                    cfg.warmup_steps,
                    cfg.min_lr_ratio,
                    warmup_progress or 0.0,
                )
                for g in opt.param_groups:
                    g["lr"] = lr
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    x, y = get_batch(step * cfg.grad_accum + micro)
                    with autocast(cfg.precision):
                        logits = model(x)
                    loss = loss_fn(logits, y)
                    (with_aux_loss(model, loss) / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                    tokens += x.numel()
                if cfg.grad_clip > 0:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    )
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                train_loss = loss_sum / cfg.grad_accum
                if not math.isfinite(train_loss):
                    raise UsageError(
                        f"{name}: loss became {train_loss} at step {step}; lower the learning "
                        "rate or use precision fp32"
                    )
                now = time.monotonic()
                if step % cfg.log_every == 0 or step == 1:
                    tps = (tokens - tok_log) / max(now - t_log, 1e-9)
                    t_log, tok_log = now, tokens
                    row = {
                        "step": step,
                        "tokens": tokens,
                        "loss": round(train_loss, 5),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 5),
                        "tokens_per_s": round(tps, 1),
                        "elapsed_s": round(elapsed_before + now - t0, 2),
                    }
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if step % cfg.eval_every == 0 and val_batches:
                    val_loss = evaluate_loss(model, val_batches, cfg.precision)
                    metrics.write(
                        json.dumps({"step": step, "tokens": tokens, "val_loss": round(val_loss, 5)})
                        + "\n"
                    )
                    metrics.flush()
                if step % cfg.checkpoint_every == 0:
                    checkpoint()
                if stop_requested:
                    raise _Stop()
                done = progress_of(step, elapsed_before + time.monotonic() - t0)
                bar.update(
                    completed=min(100.0, 100 * done),
                    status=f"step {step} loss {train_loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s"
                    + (f" val {val_loss:.3f}" if val_loss is not None else ""),
                )
    except _Stop:
        checkpoint()
        log(f"{name}: interrupted at step {step}; checkpoint saved in {last}. Rerun to resume.")
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        log(f"{name}: stopped at once; rerun to resume from the last periodic checkpoint.")
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if val_batches:
        val_loss = evaluate_loss(model, val_batches, cfg.precision)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"step": step, "tokens": tokens, "val_loss": round(val_loss, 5)}) + "\n"
            )
    elapsed = elapsed_before + time.monotonic() - t0
    summary = {
        "steps": step,
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "final_val_loss": val_loss,
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
        "config": asdict(cfg),
    }
    save_checkpoint(model, out / "model", tokenizer_dir, extra={"training": summary})
    write_json(out / "summary.json", summary)
    return summary


def _write_state(d: Path, opt: torch.optim.Optimizer, state: dict) -> None:
    torch.save(
        {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, d / "trainer_state.pt"
    )
    write_json(d / "trainer_state.json", state)


def _restore(model, opt, last: Path, state: dict) -> tuple[int, int, float]:
    try:
        loaded = load_model(last)
        model.load_state_dict(loaded.state_dict())
        blob = torch.load(last / "trainer_state.pt", weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{last}: cannot resume ({e}); delete it to start over") from None
    return int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log has no repeats."""
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))

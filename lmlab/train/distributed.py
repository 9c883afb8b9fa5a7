"""Data parallelism through torch.distributed, launched by `torchrun` (Zhao et al. §4.3.3).

One process per device. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a no-op and training runs in one process. The recipe's `batch_size` is
the global batch: each rank takes an equal slice of the rows of every batch, so the
same recipe trains the same model on 1 or N processes (up to floating-point rounding).

- `ddp`: every rank holds the whole model; gradients are averaged by all-reduce.
- `fsdp`: parameters, gradients and optimizer state are sharded across ranks
  (`torch.distributed.fsdp.fully_shard`, one unit per transformer block); checkpoints are
  gathered to full tensors, so they load anywhere, with any number of processes.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmlab.errors import UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group that `torchrun` describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(hours=2),  # rank 0 may prepare data while others wait
        )
    return Dist(rank, world, local, dev)


def current() -> Dist:
    """The process's place in an already-initialised group (or the single-process default)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few floats over ranks (float64, so token counts stay exact)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, d: Dist) -> bool:
    """Rank 0's decision, for every rank (e.g. stop after Ctrl-C reached one process)."""
    if not d.active:
        return flag
    t = torch.tensor([1 if flag else 0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(model: torch.nn.Module, strategy: str, d: Dist) -> torch.nn.Module:
    """The module to train: `model` itself, or wrapped for DDP / FSDP."""
    if not d.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():  # one shard unit per block; the rest (embeddings) at the root
            if type(m).__name__ == "Block":
                fully_shard(m)
        fully_shard(model)
        return model
    raise UsageError(f"distributed: {strategy!r} is not a strategy (allowed: ddp, fsdp)")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP or torch.compile wrappers (FSDP2 shards in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _sharded(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "set_requires_gradient_sync")


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as full (unsharded) CPU tensors, on every rank.

    The optimizer state is keyed by parameter name, so it loads into any layout."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    m = unwrap(model)
    if _sharded(m):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(m, options=opts), get_optimizer_state_dict(m, opt, options=opts)
    opts = StateDictOptions(full_state_dict=True)
    return m.state_dict(), get_optimizer_state_dict(m, opt, options=opts)


def load_full_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict
) -> None:
    """Inverse of `full_state`: full tensors into a plain, DDP or FSDP model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    m = unwrap(model)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(m, model_state, options=opts)
    set_optimizer_state_dict(m, opt, opt_state, options=opts)

"""Where training metrics go: `metrics.jsonl` always, TensorBoard and W&B when asked.

One row per logged step (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`, ...),
`val_loss` rows, and `event` rows (loss spikes, rollbacks). Only rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.errors import UsageError


class MetricsSink:
    def __init__(self, out: Path, cfg: Any, main: bool, run_config: dict | None = None) -> None:
        self.main = main
        self.path = out / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if main else None  # noqa: SIM115
        self._tb = None
        self._wandb = None
        if not main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UsageError(
                    "wandb_project is set but wandb is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb_project, dir=str(out), config=run_config or {}, reinit=True
            )

    def write(self, row: dict) -> None:
        if not self.main:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row.get("step", 0)
        scalars = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if "event" in row:
            scalars = {f"events/{row['event']}": 1}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def truncate(self, step: int) -> None:
        """Forget rows after `step` (training rolled back there); events stay."""
        if not self.main:
            return
        self._file.close()
        truncate_metrics(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log has no repeats
    (event lines, such as loss spikes, are history and stay)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        row = json.loads(ln)
        if "event" in row or row.get("step", 0) <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))

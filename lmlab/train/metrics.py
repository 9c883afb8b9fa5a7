"""Reading `metrics.jsonl` back, split by the kind of each line.

The training loop (`lmlab.train.loop.train`, through `observe.MetricsSink`) writes three
kinds of line into one file:

- a logged step: `step`, `tokens`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`,
  `batch_rows`, `elapsed_s` (and `loss_scale` under fp16);
- an evaluation: `step`, `tokens`, `val_loss`;
- an event: `step`, `event` (`loss_spike`) and fields of its own. A spike's line has a
  `loss` too but no `tokens` or `grad_norm`, so a reader that takes `"loss" in row` for a
  training row picks it up and fails on it (or plots the spike as a step that was never
  trained on).

Every reader goes through `read_metrics`, so a new kind of line is handled in one place.
Lines of a kind this module does not know land in `other`, never among the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmlab.utils import read_jsonl

Kind = Literal["train", "val", "event", "other"]


@dataclass
class Metrics:
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)

    @property
    def spikes(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "loss_spike"]


def line_kind(row: dict) -> Kind:
    """The kind of one `metrics.jsonl` line; `event` is tested first because a spike's
    event line also carries the `loss` that marks a training row."""
    if "event" in row:
        return "event"
    if "val_loss" in row:
        return "val"
    if "loss" in row and "tokens" in row:
        return "train"
    return "other"


def read_metrics(path: str | Path) -> Metrics:
    """Every line of a `metrics.jsonl`, by kind, in file order; a missing file is empty
    (a stage that has not trained yet)."""
    m = Metrics()
    if not Path(path).is_file():
        return m
    lists = {"train": m.train, "val": m.val, "event": m.events, "other": m.other}
    for row in read_jsonl(path):
        lists[line_kind(row)].append(row)
    return m


def spike_summary(m: Metrics) -> dict:
    """What the loop's spike detector did: spikes and their steps, rollbacks and the data
    rows they skipped, batches skipped without a rollback. Any of it means the run did not
    train on the batches an undisturbed run with the same seed would have."""
    spikes = m.spikes
    return {
        "count": len(spikes),
        "steps": [e["step"] for e in spikes],
        "rollbacks": sum(e.get("action") == "rollback" for e in spikes),
        "rolled_back_to": [e["rolled_back_to"] for e in spikes if "rolled_back_to" in e],
        "skipped_rows": [e["skipped_rows"] for e in spikes if "skipped_rows" in e],
        "skipped_batches": sum(e.get("action") == "skip_batch" for e in spikes),
    }

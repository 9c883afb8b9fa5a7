"""A run directory's bookkeeping, shared by the runner, the comparison and the scaling sweep.

A run lives in `runs/<name>/`, which `manifest.json` (or a sweep's `sweep.json`) marks as
a run's. Each unit of work in it (a stage, a compared variant, a sweep point) has its own
directory with two markers: `.started.json` holds the cache key of the attempt under way,
`.done.json` the key and the record of the finished work, written last. Work whose
`.done.json` holds the same key is reused; partial work (a training checkpoint) is resumed
only by an attempt with the same key.

This module reads no recipe and loads no model, so the sweep's command line can import it
without paying for torch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.errors import UsageError
from lmlab.utils import LOCK_FILE, read_json, write_json

if TYPE_CHECKING:
    from lmlab.run.recipe import Recipe

MANIFEST = "manifest.json"
RUN_MARKERS = (MANIFEST, "sweep.json")  # a run's, a scaling sweep's
DONE = ".done.json"
STARTED = ".started.json"


@dataclass
class Run:
    """A recipe and the directory it runs in; each stage writes `<dir>/<stage>/`."""

    recipe: Recipe
    dir: Path

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage


def check_run_dir(path: Path) -> None:
    """A run may write `path` only if it is new, empty, or a run directory already."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory; choose another --name")
    ours = any((path / m).is_file() for m in RUN_MARKERS)
    if path.is_dir() and not ours and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise UsageError(
            f"{path}: exists and is not a run directory (no manifest.json); refusing to "
            "write into it (choose another --name or --runs-dir)"
        )


def read_manifest(run_dir: Path) -> dict:
    """The run's `manifest.json`, or {} before the first one is written."""
    path = run_dir / MANIFEST
    return read_json(path) if path.is_file() else {}


def write_manifest(run_dir: Path, manifest: dict) -> None:
    write_json(run_dir / MANIFEST, manifest)


def read_done(sdir: Path) -> dict | None:
    """The completion marker of `sdir`, whatever its key; None while the work is unfinished."""
    marker = sdir / DONE
    return read_json(marker) if marker.is_file() else None


def cached_record(sdir: Path, key: str, redo: bool = False) -> dict | None:
    """The completion marker of `sdir` if it holds `key` (and the work is not to be redone)."""
    done = read_done(sdir)
    return done if not redo and done and done.get("key") == key else None


def start_dir(sdir: Path, key: str, redo: bool = False) -> None:
    """Prepare `sdir` for an attempt with `key`.

    Partial work (a training checkpoint) is resumed only by an attempt with the same key:
    anything left by a redone stage or by different config/inputs is cleared."""
    marker, started = sdir / DONE, sdir / STARTED
    stale = started.is_file() and read_json(started).get("key") != key
    if sdir.exists() and (redo or stale or (marker.is_file() and not started.is_file())):
        shutil.rmtree(sdir)
    marker.unlink(missing_ok=True)
    sdir.mkdir(parents=True, exist_ok=True)
    write_json(started, {"key": key})


def mark_done(sdir: Path, key: str, record: dict, outputs: dict | None = None) -> None:
    """Write the completion marker of `sdir`: its work is finished under `key`.

    `outputs` (a stage's output hashes) is kept where later keys are built from it."""
    done: dict = {"key": key}
    if outputs is not None:
        done["outputs"] = outputs
    done["record"] = record
    write_json(sdir / DONE, done)

"""Run a recipe stage by stage under `runs/<name>/`, reusing what is already done.

Each stage's cache key hashes its resolved config and the hashes of its inputs (the
outputs of the stages before it). A stage is skipped when its completion marker
(`<stage>/.done.json`) holds the same key; `--force STAGE` redoes it and every stage
after it. A stage interrupted before its marker is written runs again, and the
training stages resume from their last checkpoint.

A recipe with `variants` is a controlled comparison: data and tokenizer run as usual,
then `lmlab.run.compare` pre-trains every variant (sft and eval do not run).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.run import stages
from lmlab.run.compare import run_comparison
from lmlab.run.recipe import Recipe
from lmlab.run.rundir import (
    DONE,
    Run,
    cached_record,
    check_run_dir,
    mark_done,
    read_manifest,
    start_dir,
    write_manifest,
)
from lmlab.train import distributed as dist_
from lmlab.utils import check_name, dir_lock, git_commit, hash_obj, hash_tree, read_json, versions

STAGES = ["data", "tokenizer", "pretrain", "sft", "eval", "report"]
# Under torchrun every rank runs the training stages together; rank 0 alone runs the
# others (and writes markers and the manifest) while the rest wait at a barrier.
ALL_RANKS = ("pretrain", "sft")


def _stage_config(recipe: Recipe, stage: str) -> dict:
    r = recipe.resolved()
    return {
        "data": {"data": r["data"]},
        "tokenizer": {"tokenizer": r["tokenizer"]},
        "pretrain": {"model": r["model"], "pretrain": r["pretrain"], "seed": r["seed"]},
        "sft": {"sft": r["sft"], "seed": r["seed"]},
        "eval": {"eval": r["eval"], "seed": r["seed"]},
        "report": {},
    }[stage]


def _inputs(stage: str) -> list[str]:
    return {
        "data": [],
        "tokenizer": ["data"],
        "pretrain": ["tokenizer"],
        "sft": ["data", "tokenizer", "pretrain"],
        "eval": ["data", "tokenizer", "pretrain", "sft"],
        "report": ["data", "tokenizer", "pretrain", "sft", "eval"],
    }[stage]


def _default_threads() -> int:
    """All cores, shared among the processes torchrun started on this machine."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local)


def run_recipe(
    recipe: Recipe,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    force: str | None = None,
    until: str = "report",
) -> Path:
    """Run the stages up to and including `until`; returns the run directory.

    The run name must be one directory name; the run directory is locked for the whole run,
    so a second run of it exits with the holder's PID instead of corrupting it."""
    if until not in STAGES:
        raise UsageError(f"unknown stage {until!r} (stages: {', '.join(STAGES)})")
    if force is not None and force not in STAGES:
        raise UsageError(f"--force {force!r}: not a stage (stages: {', '.join(STAGES)})")
    run = Run(recipe, Path(runs_dir) / check_name(name or recipe.name))
    check_run_dir(run.dir)
    d = dist_.setup() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else dist_.Dist()
    # one writer per run directory: rank 0 holds the lock (its ranks work in step with it)
    with dir_lock(run.dir) if d.main else contextlib.nullcontext():
        return _run_stages(run, d, force, until)


def _run_stages(run: Run, d: dist_.Dist, force: str | None, until: str) -> Path:
    recipe = run.recipe
    torch.set_num_threads(recipe.threads or _default_threads())
    manifest = {
        "name": run.dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.resolved(),
        "seed": recipe.seed,
        "versions": versions(),
        "git_commit": git_commit(Path(__file__).parent),
        "stages": {},
    }
    if d.active:
        manifest["world_size"] = d.world
    # keep the original creation time across re-runs
    manifest["created"] = read_manifest(run.dir).get("created", manifest["created"])
    if d.main:  # first of all: it marks the directory as a run's
        write_manifest(run.dir, manifest)
    forced = STAGES[STAGES.index(force) :] if force else []
    outputs: dict[str, dict[str, str]] = {}
    if d.main:
        log(f"run [bold]{run.dir}[/bold]")
    todo = STAGES[: STAGES.index(until) + 1]
    compare = bool(recipe.variants) and len(todo) > STAGES.index("tokenizer") + 1
    if recipe.variants:
        todo = todo[: STAGES.index("tokenizer") + 1]
    for stage in todo:
        fn: Callable[[Run], dict] = getattr(stages, f"stage_{stage}")
        sdir = run.stage_dir(stage)
        inputs = {s: hash_obj(outputs[s]) for s in _inputs(stage)}
        key = hash_obj(
            {"stage": stage, "config": _stage_config(recipe, stage), "inputs": inputs, "format": 1}
        )
        dist_.barrier()
        done = cached_record(sdir, key, redo=stage in forced)
        dist_.barrier()  # every rank has read the marker before rank 0 may remove it
        if done:
            outputs[stage] = done["outputs"]
            manifest["stages"][stage] = {**done["record"], "status": "cached"}
            if d.main:
                log(f"[dim]{stage}: cached ({done['record']['seconds']:.1f}s when run)[/dim]")
                write_manifest(run.dir, manifest)
            continue
        if d.main:
            start_dir(sdir, key, redo=stage in forced)
            log(f"[bold cyan]{stage}[/bold cyan] …")
            manifest["stages"][stage] = {"status": "running", "key": key, "inputs": inputs}
            write_manifest(run.dir, manifest)
        dist_.barrier()
        t0 = time.monotonic()
        if d.main or stage in ALL_RANKS:
            try:
                summary = fn(run) or {}
            except KeyboardInterrupt:
                if d.main:
                    manifest["stages"][stage]["status"] = "interrupted"
                    write_manifest(run.dir, manifest)
                raise
        dist_.barrier()
        if not d.main:  # rank 0 has written the marker: take its record
            dist_.barrier()
            outputs[stage] = read_json(sdir / DONE)["outputs"]
            continue
        seconds = time.monotonic() - t0
        outputs[stage] = hash_tree(sdir)
        record = {
            "key": key,
            "seconds": round(seconds, 2),
            "inputs": inputs,
            "outputs": outputs[stage],
            "summary": summary,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["stages"][stage] = {**record, "status": "done"}
        mark_done(sdir, key, record, outputs[stage])
        write_manifest(run.dir, manifest)
        log(f"{stage}: done in {seconds:.1f}s")
        dist_.barrier()
    if compare:

        def record(entry: dict) -> None:
            manifest["stages"]["compare"] = entry
            write_manifest(run.dir, manifest)

        # any --force redoes the variants: they come after every stage it can name
        run_comparison(run, hash_obj(outputs["tokenizer"]), redo=bool(forced), record=record)
    return run.dir

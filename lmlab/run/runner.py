"""Run a recipe stage by stage under `runs/<name>/`, reusing what is already done.

The stages are one table, `PIPELINE`: each row names the stage's function, the recipe
sections its cache key hashes, the stages whose outputs it reads (their hashes join the
key) and whether every torchrun rank runs it. A stage is skipped when its completion marker
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmlab.adapt.instruct import parse_source
from lmlab.console import log
from lmlab.data.pipeline import RULES_VERSION
from lmlab.errors import UsageError
from lmlab.model.loading import find_format
from lmlab.model.store import model_identity
from lmlab.prompt.sandbox import resolve_isolation
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
from lmlab.run.stages import (
    stage_align,
    stage_data,
    stage_eval,
    stage_pretrain,
    stage_report,
    stage_sft,
    stage_tokenizer,
)
from lmlab.train import distributed as dist_
from lmlab.utils import (
    check_name,
    dir_lock,
    git_commit,
    hash_obj,
    hash_tree,
    read_json,
    sha256_file,
    versions,
)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the runner walks it."""

    name: str
    fn: Callable[[Run], dict]  # does the work in `<run>/<name>/`; returns its summary
    sections: tuple[str, ...]  # keys of the resolved recipe that its cache key hashes
    reads: tuple[str, ...]  # stages whose output hashes its cache key hashes
    # under torchrun every rank runs the training stages together; rank 0 alone runs the
    # others (and writes markers and the manifest) while the rest wait at a barrier
    all_ranks: bool = False
    # what besides the recipe decides its output (a rule version, the machine's sandbox);
    # hashed into the key only when it says something, so other keys stay as they were
    facts: Callable[[Recipe], dict] | None = None


def data_facts(recipe: Recipe) -> dict:
    """The pipeline's rule version: a run made under older rules redoes its data stage."""
    return {"rules": RULES_VERSION}


def base_model_facts(recipe: Recipe) -> dict:
    """The base model a recipe starts from, as its files are now (none: the key of a run
    trained from scratch is as it always was)."""
    if recipe.base_model is None:
        return {}
    return {"base_model": model_identity(recipe.base_model)}


def data_files(recipe: Recipe) -> dict[str, list[Path]]:
    """The recipe's own data files by key: instruction sets (`sft.data`) and preference
    files (`align.data`), checked to exist before any stage runs."""
    out: dict[str, list[Path]] = {"sft.data": [], "align.data": []}
    specs = [("sft.data", s, parse_source(s).path) for s in recipe.sft.data]
    specs += [("align.data", s, Path(s)) for s in recipe.align.data]
    for key, spec, path in specs:
        if not str(path).startswith("hf:") and not path.is_file():
            raise UsageError(f"{key}: {spec}: no such file")
        out[key].append(path)
    return out


def _contents(paths: list[Path]) -> list[str]:
    return [sha256_file(p) if p.is_file() else str(p) for p in paths]


def sft_facts(recipe: Recipe) -> dict:
    """The contents of the instruction sets: an edited file redoes SFT."""
    files = data_files(recipe)["sft.data"]
    return {"sft_data": _contents(files)} if files else {}


def align_facts(recipe: Recipe) -> dict:
    """The contents of the preference files: an edited file redoes the alignment."""
    files = data_files(recipe)["align.data"]
    return {"align_data": _contents(files)} if files else {}


def eval_facts(recipe: Recipe) -> dict:
    """Whether the code task can run here: results cached without it (no bubblewrap) are
    not reused once it can."""
    if not any(t.split(":")[0] == "code" for t in recipe.eval.tasks):
        return {}
    try:
        return {"code_sandbox": resolve_isolation()}
    except UsageError:
        return {"code_sandbox": None}


PIPELINE = (
    Stage("data", stage_data, ("data",), (), facts=data_facts),
    Stage("tokenizer", stage_tokenizer, ("tokenizer",), ("data",), facts=base_model_facts),
    Stage(
        "pretrain",
        stage_pretrain,
        ("model", "pretrain", "seed"),
        ("tokenizer",),
        all_ranks=True,
        facts=base_model_facts,
    ),
    Stage(
        "sft",
        stage_sft,
        ("sft", "seed"),
        ("data", "tokenizer", "pretrain"),
        all_ranks=True,
        facts=sft_facts,
    ),
    Stage(
        "align",
        stage_align,
        ("align", "seed"),
        ("tokenizer", "sft"),
        all_ranks=True,
        facts=align_facts,
    ),
    Stage(
        "eval",
        stage_eval,
        ("eval", "seed"),
        ("data", "tokenizer", "pretrain", "sft", "align"),
        facts=eval_facts,
    ),
    Stage("report", stage_report, (), ("data", "tokenizer", "pretrain", "sft", "align", "eval")),
)
STAGES = [s.name for s in PIPELINE]


def stage_key(
    stage: Stage, recipe: Recipe, resolved: dict, outputs: dict[str, dict]
) -> tuple[str, dict]:
    """The cache key of `stage` and the input hashes it holds: its recipe sections (from
    `resolved`, the recipe fully resolved), the outputs of the stages it reads, and its
    facts beyond the recipe."""
    inputs = {s: hash_obj(outputs[s]) for s in stage.reads}
    config = {k: resolved[k] for k in stage.sections}
    parts = {"stage": stage.name, "config": config, "inputs": inputs, "format": 1}
    facts = stage.facts(recipe) if stage.facts is not None else {}
    if facts:
        parts["facts"] = facts
    return hash_obj(parts), inputs


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
    if recipe.base_model is not None:  # a missing base model fails before any stage runs
        find_format(recipe.base_model)
    data_files(recipe)
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
    todo = PIPELINE[: STAGES.index(until) + 1]
    compare = bool(recipe.variants) and len(todo) > STAGES.index("tokenizer") + 1
    if recipe.variants:
        todo = todo[: STAGES.index("tokenizer") + 1]
    resolved = recipe.resolved()
    for stage in todo:
        name = stage.name
        sdir = run.stage_dir(name)
        key, inputs = stage_key(stage, recipe, resolved, outputs)
        dist_.barrier()
        done = cached_record(sdir, key, redo=name in forced)
        dist_.barrier()  # every rank has read the marker before rank 0 may remove it
        if done:
            outputs[name] = done["outputs"]
            manifest["stages"][name] = {**done["record"], "status": "cached"}
            if d.main:
                log(f"[dim]{name}: cached ({done['record']['seconds']:.1f}s when run)[/dim]")
                write_manifest(run.dir, manifest)
            continue
        if d.main:
            start_dir(sdir, key, redo=name in forced)
            log(f"[bold cyan]{name}[/bold cyan] …")
            manifest["stages"][name] = {"status": "running", "key": key, "inputs": inputs}
            write_manifest(run.dir, manifest)
        dist_.barrier()
        t0 = time.monotonic()
        if d.main or stage.all_ranks:
            try:
                summary = stage.fn(run) or {}
            except KeyboardInterrupt:
                if d.main:
                    manifest["stages"][name]["status"] = "interrupted"
                    write_manifest(run.dir, manifest)
                raise
        dist_.barrier()
        if not d.main:  # rank 0 has written the marker: take its record
            dist_.barrier()
            outputs[name] = read_json(sdir / DONE)["outputs"]
            continue
        seconds = time.monotonic() - t0
        outputs[name] = hash_tree(sdir)
        record = {
            "key": key,
            "seconds": round(seconds, 2),
            "inputs": inputs,
            "outputs": outputs[name],
            "summary": summary,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["stages"][name] = {**record, "status": "done"}
        mark_done(sdir, key, record, outputs[name])
        write_manifest(run.dir, manifest)
        log(f"{name}: done in {seconds:.1f}s")
        dist_.barrier()
    if compare:

        def record(entry: dict) -> None:
            manifest["stages"]["compare"] = entry
            write_manifest(run.dir, manifest)

        # any --force redoes the variants: they come after every stage it can name
        run_comparison(run, hash_obj(outputs["tokenizer"]), redo=bool(forced), record=record)
    return run.dir

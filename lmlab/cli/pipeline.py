"""The pipeline verbs: `lmlab run` and one verb per stage, `recipes`, `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import (
    ConfigOpt,
    ForceOpt,
    NameOpt,
    Quiet,
    RecipeArg,
    RunsDirOpt,
    SetOpt,
    app,
)
from lmlab.console import resumable, set_quiet
from lmlab.errors import UsageError


def run_pipeline(recipe: str, name, set_, force, runs_dir: Path, quiet: bool, until: str) -> Path:
    from lmlab.run.recipe import load_recipe
    from lmlab.run.runner import run_recipe

    set_quiet(quiet)
    resumable()
    r = load_recipe(recipe, set_ or [])
    run_dir = run_recipe(r, runs_dir, name, force, until=until)
    if r.variants and until not in ("data", "tokenizer"):
        print(f"comparison: {run_dir / 'compare.html'}  (markdown: {run_dir / 'compare.md'})")
        raise typer.Exit(0)
    return run_dir


def recipe_arg(recipe: str, config: Path | None) -> str:
    """The recipe named positionally or by --config (not both)."""
    if config is None:
        return recipe
    if recipe != "tiny":
        raise UsageError(f"give the recipe once: {recipe!r} or --config {config}")
    return str(config)


def stage_command(command_name: str, until: str, doc: str, group: typer.Typer = app) -> None:
    """Register `lmlab [GROUP] COMMAND [RECIPE]`: the pipeline up to and including `until`."""

    def command(
        recipe: RecipeArg = "tiny",
        config: ConfigOpt = None,
        name: NameOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = None,
        runs_dir: RunsDirOpt = Path("runs"),
        quiet: Quiet = False,
    ) -> None:
        run_dir = run_pipeline(
            recipe_arg(recipe, config), name, set_, force, runs_dir, quiet, until
        )
        if until == "report":
            print(f"report: {run_dir / 'report.html'}  (markdown: {run_dir / 'report.md'})")
        else:
            print(run_dir / until)

    command.__doc__ = doc
    group.command(name=command_name)(command)


stage_command(
    "run",
    "report",
    "Run the whole pipeline: data → tokenizer → pretrain → sft → "
    "eval → report. Finished stages are reused; an interrupted run resumes.",
)
for _stage, _what in [
    ("tokenizer", "Train the tokenizer (tokenizer.kind) and write the token shards."),
    ("pretrain", "Pre-train the model (resumes from its last checkpoint)."),
    ("sft", "Instruction-tune the pre-trained model on corpus question/answer pairs."),
]:
    stage_command(
        _stage, _stage, f"{_what} Runs (or reuses) the stages before it, as `lmlab run` does."
    )


@app.command()
def recipes(
    show: Annotated[str | None, typer.Argument(help="Print this recipe, fully resolved.")] = None,
) -> None:
    """List the built-in recipes, or print one with every default filled in."""
    from lmlab.run.recipe import builtin_recipes, dump_recipe, load_recipe

    if show is None:
        print("\n".join(builtin_recipes()))
    else:
        print(dump_recipe(load_recipe(show)), end="")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Render report.md and report.html for a run from the files it holds."""
    from lmlab.run.report import write_report
    from lmlab.utils import dir_lock

    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no manifest.json)")
    with dir_lock(run_dir):  # not while a run is writing it
        paths = write_report(run_dir)
    for p in paths:
        print(p)

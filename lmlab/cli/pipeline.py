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
    "Run the whole pipeline: data → tokenizer → pretrain → sft → align → "
    "eval → report. Finished stages are reused; an interrupted run resumes.",
)
for _stage, _what in [
    ("tokenizer", "Train the tokenizer (tokenizer.kind) and write the token shards."),
    ("pretrain", "Pre-train the model (resumes from its last checkpoint)."),
]:
    stage_command(
        _stage, _stage, f"{_what} Runs (or reuses) the stages before it, as `lmlab run` does."
    )


PeftOpt = Annotated[
    str | None,
    typer.Option(
        help="Train an adapter only: METHOD[:key=value,...], e.g. lora:r=16,alpha=32 "
        "(lora, dora, ia3, bottleneck; docs/peft.md)."
    ),
]


@app.command("sft")
def sft_cmd(
    recipe: RecipeArg = "tiny",
    config: ConfigOpt = None,
    name: NameOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    quiet: Quiet = False,
    model: Annotated[
        str | None, typer.Option(help="Tune this model on --data instead of a recipe's run.")
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Instruction JSONL, FILE or FILE:WEIGHT (repeatable; with --model)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (with --model).")] = None,
    steps: Annotated[int | None, typer.Option(help="Steps (default: one pass).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    seq_len: Annotated[int, typer.Option(help="Tokens per row.")] = 512,
    packing: Annotated[
        bool, typer.Option(help="Pack several examples per row (attention kept apart).")
    ] = True,
    heldout: Annotated[float, typer.Option(help="Share of each set for validation.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Mixture order and held-out split.")] = 0,
    peft: PeftOpt = None,
) -> None:
    """Instruction-tune: a recipe's pre-trained model on corpus question/answer pairs (runs
    the stages before it, as `lmlab run` does), or with --model, any model on your own
    chat, prompt/completion or Alpaca JSONL sets, mixed by weight and packed."""
    if model is None and data is None and out is None:
        run_dir = run_pipeline(
            recipe_arg(recipe, config), name, set_, force, runs_dir, quiet, "sft"
        )
        print(run_dir / "sft")
        return
    if model is None or not data or out is None:
        raise UsageError("sft: tuning on your data needs --model, --data and --out together")
    if recipe != "tiny" or config or name or set_ or force:
        raise UsageError("sft: --model tunes a model on --data; recipe options do not apply")
    from pydantic import TypeAdapter, ValidationError

    from lmlab.adapt.instruct import instruct, parse_source
    from lmlab.train.loop import TrainConfig

    if not 0 <= heldout < 1:
        raise UsageError(f"sft: --heldout must be in [0, 1), got {heldout}")
    try:
        cfg = TypeAdapter(TrainConfig).validate_python(
            dict(batch_size=batch_size, seq_len=seq_len, lr=lr, max_steps=steps or 1,
                 warmup_steps=0, eval_every=max(1, steps or 50), log_every=1)
        )  # fmt: skip
    except ValidationError as e:
        first = e.errors()[0]
        raise UsageError(
            f"sft: --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}"
        ) from None
    from lmlab.model.adapters import parse_peft

    adapter = parse_peft(peft)
    set_quiet(quiet)
    sources = [parse_source(d) for d in data]
    summary = instruct(
        model, sources, out, cfg, packing, heldout, seed, one_pass=steps is None, peft=adapter
    )
    print(f"{out / 'model'}  ({summary.get('steps', '?')} steps, {summary['examples']} examples)")


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

"""`lmlab scaling`: sweep sizes × budgets, fit the Chinchilla and Kaplan laws, predict a
bigger run, allocate a compute budget (the sweep is lmlab.run.scaling; docs/scaling.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import Quiet, RecipeArg, RunsDirOpt, app
from lmlab.console import resumable, set_quiet
from lmlab.run.scaling import (
    DEFAULT_SIZES,
    DEFAULT_TARGET,
    DEFAULT_TOKENS,
    fits_from,
    refit,
    run_sweep,
)
from lmlab.run.scaling_points import fmt_count

scaling_app = typer.Typer(
    no_args_is_help=True,
    help="Scaling laws (Zhao et al. §2.1): sweep sizes × budgets, fit Chinchilla and Kaplan "
    "laws, predict a bigger run, allocate a compute budget.",
)
app.add_typer(scaling_app, name="scaling")


@scaling_app.command("run")
def scaling_run(
    recipe: RecipeArg = "tiny",
    sizes: Annotated[
        str, typer.Option(help="Non-embedding parameter counts of the grid, comma-separated.")
    ] = DEFAULT_SIZES,
    tokens: Annotated[
        str, typer.Option(help="Training-token budgets of the grid, comma-separated.")
    ] = DEFAULT_TOKENS,
    target: Annotated[
        str, typer.Option(help="SIZE:TOKENS of the run to predict, then train.")
    ] = DEFAULT_TARGET,
    name: Annotated[
        str | None, typer.Option(help="Sweep directory name (default: <recipe>-scaling).")
    ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key, e.g. --set pretrain.lr=3e-3."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Train a grid of sizes × budgets, fit both laws, predict the target, train it, report."""
    set_quiet(quiet)
    resumable()
    run_dir = run_sweep(recipe, set_ or [], sizes, tokens, target, runs_dir, name)
    print(f"report: {run_dir / 'scaling.html'}  (markdown: {run_dir / 'scaling.md'})")


@scaling_app.command("fit")
def scaling_fit(
    run_dir: Annotated[Path, typer.Argument(help="A sweep directory (lmlab scaling run).")],
) -> None:
    """Refit both laws to a sweep's finished points and rewrite its report."""
    for p in refit(run_dir):
        print(p)


@scaling_app.command("optimal")
def scaling_optimal(
    flops: Annotated[float, typer.Option(help="Training compute budget C in FLOPs (6·N·D).")],
    fit: Annotated[
        str,
        typer.Option(
            help="hoffmann (published Chinchilla constants), besiroglu (their refit), kaplan, "
            "or a sweep's scaling.json / directory."
        ),
    ] = "hoffmann",
    form: Annotated[
        str | None, typer.Option(help="With a sweep's fits: chinchilla or kaplan (default both).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The compute-optimal model size and token count for a FLOP budget, and its loss."""
    import json

    from lmlab.train.scaling import compute_optimal

    rows = [compute_optimal(f, flops) for f in fits_from(fit, form)]
    if as_json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for r in rows:
        print(f"law: {r['form']} form, {r['source']}")
        print(f"compute: {r['flops']:.3g} FLOPs (C = 6·N·D)")
        print(f"N_opt: {fmt_count(r['n_opt'])} parameters ({r['n_opt']:.4g})")
        print(f"D_opt: {fmt_count(r['d_opt'])} tokens ({r['d_opt']:.4g})")
        print(f"tokens per parameter: {r['tokens_per_parameter']:.1f}")
        print(f"predicted loss: {r['loss']:.4f} nats/token")

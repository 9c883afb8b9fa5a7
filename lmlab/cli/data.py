"""`lmlab data`: the data pipeline on the user's files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import (
    Overwrite,
    Quiet,
    app,
)
from lmlab.cli.pipeline import stage_command
from lmlab.console import resumable, set_quiet

data_app = typer.Typer(
    no_args_is_help=True,
    help="The data pipeline: filter, de-duplicate, redact, decontaminate, mix, tokenize.",
)
app.add_typer(data_app, name="data")


stage_command("run", "data", "The recipe's data stage (what `lmlab run` does first).", data_app)


Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Files or directories (txt/md/html, jsonl[.gz|.zst], parquet, csv), "
        "'stdlib' for the embedded corpus, or hf:NAME for a Hugging Face dataset."
    ),
]


@data_app.command("prepare")
def data_prepare(
    inputs: Inputs = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("data-out"),
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline YAML (sources, steps, schedule...).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.json or a run/checkpoint dir: also write shards.")
    ] = None,
    decontaminate: Annotated[
        list[str] | None,
        typer.Option(help="Evaluation JSONL to check for n-gram overlap (repeatable)."),
    ] = None,
    contaminated: Annotated[
        str, typer.Option(help="What to do with overlapping documents: flag or drop.")
    ] = "flag",
    profile: Annotated[
        str | None, typer.Option(help="Default rule thresholds: web or code.")
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="JSONL/CSV/Parquet text column.")] = None,
    unit: Annotated[
        str | None, typer.Option(help="Text files: one document per file, line or paragraph.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share kept for validation.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: cores).")] = None,
    executor: Annotated[str | None, typer.Option(help="local or ray.")] = None,
    quiet: Quiet = False,
) -> None:
    """Run the data pipeline on INPUT files into --out (documents, removed, stats, card)."""
    from lmlab.data.pipeline import cli_config, prepare

    set_quiet(quiet)
    resumable()
    cfg = cli_config(
        inputs or [],
        config,
        decontaminate=decontaminate or [],
        contaminated=contaminated,
        overrides={
            "profile": profile,
            "val_fraction": val_fraction,
            "workers": workers,
            "executor": executor,
        },
        source_overrides={"text_field": text_field, "unit": unit},
    )
    prepare(cfg, out, tokenizer=tokenizer)
    print(f"{out}  (card: {out / 'card.html'})")


@data_app.command("steps")
def data_steps(
    profile: Annotated[str, typer.Option(help="Show the defaults of this profile.")] = "web",
) -> None:
    """List the pipeline steps a config can use, with every option and its default."""
    from lmlab.data.steps import describe_steps

    print(describe_steps(profile), end="")


@data_app.command("index")
def data_index(
    inputs: Inputs = None,
    out: Annotated[Path, typer.Option("--out", help="Index file to write (.npz).")] = Path(
        "dedup-index.npz"
    ),
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline YAML: sources and minhash settings.")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Build a de-duplication index of a dataset, for `dedup_index` steps of later runs."""
    from lmlab.data.pipeline import build_dedup_index, cli_config

    set_quiet(quiet)
    cfg = cli_config(inputs or [], config)
    n = build_dedup_index(cfg, out, overwrite=overwrite)
    print(f"{out}  ({n:,} documents)")

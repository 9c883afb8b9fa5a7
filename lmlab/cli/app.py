"""The `lmlab` application: the Typer app, options shared by several verbs, and `main`
(exit codes per DESIGN.md: 0 ok, 2 bad usage or input, 1 unexpected, 130 interrupted)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.console import console, interrupt_hint
from lmlab.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lmlab: raw text → tokenizer → pre-trained → instruction-tuned → "
    "evaluated model, on your laptop.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")]


RecipeArg = Annotated[str, typer.Argument(help="Built-in recipe name or a YAML file.")]
NameOpt = Annotated[str | None, typer.Option(help="Run name (default: the recipe's).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set pretrain.lr=3e-4 (repeatable)."),
]
ForceOpt = Annotated[str | None, typer.Option(help="Redo this stage and the ones after it.")]
RunsDirOpt = Annotated[Path, typer.Option(help="Where run directories go.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="A recipe YAML file (same as RECIPE).")
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace --out if it is this command's own earlier output."),
]


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # returns 130 when the command was interrupted
        if rc == 130:
            console.print(interrupt_hint())
        if isinstance(rc, int):
            sys.exit(rc)
    except UsageError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print(interrupt_hint())
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # the CLI framework's own usage errors (missing argument, bad option) know their exit
        # code (2) and how to show themselves; typer may vendor click, so match by behaviour
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise

"""`lmlab guide`: the practical guide's decision flow and its cost estimates; `lmlab
compare`: a prompted LLM against a fine-tuned small model on the user's labelled data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import console
from lmlab.errors import UsageError

guide_app = typer.Typer(
    help="Choose between a prompted LLM and a fine-tuned model (Yang et al. Fig. 2), "
    "and estimate cost and latency.",
    invoke_without_command=True,
)
app.add_typer(guide_app, name="guide")


@guide_app.callback()
def guide(
    ctx: typer.Context,
    answers: Annotated[
        Path | None,
        typer.Option(help="A JSON object of answers by question id (see docs/guide.md)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    model: Annotated[
        str | None, typer.Option(help="The model the commands name (default: SmolLM2).")
    ] = None,
) -> None:
    """Walk Yang et al.'s decision flow (Fig. 2): questions in the terminal, or the answers
    from --answers; prints llm, fine-tuned or none, the path, the Remark and the commands."""
    if ctx.invoked_subcommand is not None:
        return
    from lmlab.guide.flow import decide

    given: dict = {}
    if answers is not None:
        try:
            given = json.loads(answers.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{answers}: cannot read the answers ({e})") from None
        if not isinstance(given, dict):
            raise UsageError(f"{answers}: the answers must be a JSON object (id: true/false)")
    if model is not None:
        given["model"] = model
    ask = None
    if sys.stdin.isatty() and not as_json:

        def ask(qid: str, question: str) -> bool:
            return typer.confirm(question)

    elif answers is None:
        raise UsageError("guide: no terminal to ask on; give the answers with --answers FILE.json")
    rec = decide(given, ask)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2))
        return
    colour = {"llm": "red", "fine-tuned": "green", "none": "yellow"}[rec.recommendation]
    console.print(f"\n[bold {colour}]{rec.recommendation}[/]  (Remark {rec.remark})")
    console.print(rec.remark_text, soft_wrap=True)
    console.print("\n[bold]path[/bold]")
    for s in rec.path:
        console.print(f"  {'yes' if s.answer else 'no ':3}  {s.question}", soft_wrap=True)
    for note in rec.notes:
        console.print(f"\n{note}", soft_wrap=True)
    console.print("\n[bold]commands[/bold]")
    for c in rec.commands:
        console.print(f"  {c}", soft_wrap=True, markup=False, highlight=False)

"""`lmlab guide`: the practical guide's decision flow and its cost estimates; `lmlab
compare`: a prompted LLM against a fine-tuned small model on the user's labelled data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import Overwrite, app
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


@app.command("compare")
def compare(
    data: Annotated[Path, typer.Argument(help="Labelled texts: CSV/TSV (header) or JSONL.")],
    out: Annotated[
        Path | None, typer.Option(help="Report directory (default: DATA-compare).")
    ] = None,
    text_column: Annotated[str, typer.Option(help="The text's column or key.")] = "text",
    label_column: Annotated[str, typer.Option(help="The label's column or key.")] = "label",
    columns: Annotated[
        str | None, typer.Option(help="Column names of a CSV without a header, e.g. label,text.")
    ] = None,
    label_words: Annotated[
        str | None,
        typer.Option(help="The word the LLM sees for each label, e.g. 1=positive,-1=negative."),
    ] = None,
    llm: Annotated[str, typer.Option(help="The prompted model (or the served model's name).")] = (
        "smollm2-135m-instruct"
    ),
    url: Annotated[
        str | None, typer.Option(help="An OpenAI-compatible server for the LLM.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Its key.")] = None,
    chat: Annotated[
        bool,
        typer.Option(help="Prompt a local model with a chat template as a conversation."),
    ] = True,
    template: Annotated[
        str, typer.Option(help="One item, up to its label: {text} is the item.")
    ] = "Text: {text}\nLabel:",
    instruction: Annotated[
        str, typer.Option(help="Said first; {labels} lists the label words ('' for none).")
    ] = "Classify each text as one of: {labels}.",
    calibrate: Annotated[
        bool, typer.Option(help="Also each configuration with contextual calibration.")
    ] = True,
    shots: Annotated[list[int] | None, typer.Option(help="Demonstrations (repeatable).")] = None,
    selector: Annotated[str, typer.Option(help="Demonstrations: random, bm25, knn or mmr.")] = (
        "random"
    ),
    labels: Annotated[
        list[int] | None, typer.Option(help="Label counts to fine-tune on (repeatable).")
    ] = None,
    test_size: Annotated[int, typer.Option(help="Held-out items both arms score.")] = 200,
    seeds: Annotated[int, typer.Option(help="Fine-tuning repeats per label count.")] = 1,
    tune: Annotated[
        str, typer.Option(help="What fine-tunes: full, head, or a PEFT spec (lora:r=8,...).")
    ] = "full",
    epochs: Annotated[int, typer.Option(help="Passes over the labels.")] = 3,
    ood: Annotated[
        bool, typer.Option(help="Tell the decision flow the test data is out-of-distribution.")
    ] = False,
    price_per_hour: Annotated[
        float | None, typer.Option(help="The machine's price, for cost per 1,000 items.")
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Skip runs past this budget.")] = None,
    seed: Annotated[int, typer.Option(help="Split, draws and initialisation.")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """A prompted LLM (zero-/few-shot) against a small model fine-tuned on the labels, on
    your labelled data: accuracy ± SE, learning curves, latency and cost, and what the
    decision flow recommends (docs/guide.md)."""
    from lmlab.guide.compare import CompareConfig, run_compare
    from lmlab.utils import claim_output_dir

    words: dict[str, str] = {}
    for part in (label_words or "").split(","):
        if not part.strip():
            continue
        label, eq, word = part.partition("=")
        if not eq or not label.strip() or not word.strip():
            raise UsageError(f"--label-words: {part!r} is not LABEL=WORD")
        words[label.strip()] = word.strip()
    cfg = CompareConfig(
        text_column=text_column,
        label_column=label_column,
        columns=[c.strip() for c in columns.split(",")] if columns else None,
        label_words=words,
        llm=llm,
        url=url,
        api_key=api_key,
        chat=chat,
        calibrate=calibrate,
        template=template.replace("\\n", "\n"),
        instruction=instruction.replace("\\n", "\n"),
        shots=list(shots) if shots else [0, 4, 16],
        selector=selector,
        labels=list(labels) if labels else [50, 100, 200, 500, 1000, 3000],
        test_size=test_size,
        seeds=seeds,
        tune=tune,
        epochs=epochs,
        ood=ood,
        price_per_hour=price_per_hour,
        max_minutes=max_minutes,
        seed=seed,
    )
    cfg.check()
    target = claim_output_dir(out or Path(f"{data.stem}-compare"), "compare-report", overwrite)
    result = run_compare(data, target, cfg)
    from lmlab.guide.compare import report_markdown

    console.print(report_markdown(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"\nreport: {target}/compare.md, compare.json, learning_curve.png")

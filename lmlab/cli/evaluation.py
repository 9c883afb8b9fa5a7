"""`lmlab eval` (a recipe's eval stage, or task files on any model) and `lmlab judge`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import (
    ConfigOpt,
    ForceOpt,
    NameOpt,
    Overwrite,
    Quiet,
    RunsDirOpt,
    SetOpt,
    app,
)
from lmlab.cli.generation import generation_options
from lmlab.cli.pipeline import recipe_arg, run_pipeline
from lmlab.console import set_quiet
from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig


@app.command("eval")
def eval_cmd(
    target: Annotated[
        str, typer.Argument(help="A recipe (the run's eval stage) or, with --tasks, a model.")
    ] = "tiny",
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="Task YAML file, synthetic:TASK[:DIFFICULTY] or code[:FILE] (repeatable).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where results go (with --tasks).")] = None,
    limit: Annotated[int | None, typer.Option(help="Items per task (with --tasks).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling.")] = 0,
    train_docs: Annotated[
        list[Path] | None,
        typer.Option(help="Training documents (JSONL) to check items for contamination."),
    ] = None,
    chat: Annotated[
        bool, typer.Option(help="Built-in suites: prompt through the chat template.")
    ] = False,
    robustness: Annotated[
        bool,
        typer.Option(help="Synthetic suites: spread over prompt templates, drop under typos."),
    ] = False,
    self_consistency: Annotated[
        int, typer.Option(help="Synthetic suites: samples per item, majority vote.")
    ] = 1,
    compare_to: Annotated[
        Path | None,
        typer.Option(help="Another `lmlab eval` output: paired differences on shared tasks."),
    ] = None,
    overwrite: Overwrite = False,
    unsafe_sandbox: Annotated[
        bool,
        typer.Option(
            "--unsafe-sandbox",
            help="Code tasks without bubblewrap: the weak, audit-hook-only sandbox (unsafe).",
        ),
    ] = False,
    config: ConfigOpt = None,
    name: NameOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    quiet: Quiet = False,
) -> None:
    """Evaluate the base and SFT models of a recipe's run (runs or reuses the stages before
    it), or, with --tasks, score a model on task files (lm-evaluation-harness YAML shape)."""
    if not tasks:
        recipe = recipe_arg(target, config)
        print(run_pipeline(recipe, name, set_, force, runs_dir, quiet, "eval") / "eval")
        return
    from lmlab.eval.harness import evaluate, format_results

    set_quiet(quiet)
    if unsafe_sandbox:
        from lmlab.prompt.sandbox import UNSAFE_ENV

        os.environ[UNSAFE_ENV] = "1"
    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1")
    if self_consistency < 1:
        raise UsageError("--self-consistency must be >= 1")
    # beside a model directory; for a file or store name (never written into): ./eval-tasks/NAME
    where = Path(target)
    name = where.stem if where.suffix.lower() == ".gguf" else where.name
    out_dir = out or (where / "eval-tasks" if where.is_dir() else Path("eval-tasks") / name)
    if compare_to is not None:  # checked before any model time is spent
        if not (compare_to / "results.json").is_file():
            raise UsageError(f"--compare-to {compare_to}: no results.json (an `lmlab eval` output)")
        if compare_to.resolve() == out_dir.resolve():
            raise UsageError(f"--compare-to {compare_to}: is --out itself; name another output")
    results = evaluate(
        target,
        tasks,
        out_dir,
        limit=limit,
        seed=seed,
        train_docs=train_docs,
        chat=chat,
        robustness=robustness,
        self_consistency=self_consistency,
        overwrite=overwrite,
    )
    print(format_results(results))
    if compare_to is not None:
        from lmlab.eval.harness import paired_comparison
        from lmlab.utils import write_json

        diff = paired_comparison(compare_to, out_dir)
        write_json(out_dir / "paired.json", diff)
        for task, metrics in diff.items():
            for m, d in metrics.items():
                print(
                    f"{task} {m}: this − other {d['diff']:+.4f} ± {d['stderr'] or 0:.4f} "
                    f"(p {d['p_value'] if d['p_value'] is not None else float('nan'):.3f})"
                )
    print(f"results: {out_dir / 'results.json'}")


@app.command()
@generation_options("max_new_tokens")
def judge(
    judge_model: Annotated[str, typer.Option("--judge", help="The judge checkpoint.")],
    model: Annotated[list[str], typer.Option(help="A checkpoint to rate (repeat, >= 2).")],
    questions: Annotated[Path, typer.Option(help="JSONL with a 'question' field per line.")],
    out: Annotated[Path, typer.Option(help="Where judge.json goes.")] = Path("judge.json"),
    limit: Annotated[int | None, typer.Option(help="Questions to use.")] = None,
    chat: Annotated[bool, typer.Option(help="Ask through the chat template.")] = False,
    *,
    gen: GenerationConfig,  # --max-new-tokens, from GenerationConfig
    overwrite: Overwrite = False,
) -> None:
    """Model-based evaluation: every model answers, a judge model compares every pair in
    both orders (position bias cancels), and the models get Elo and Bradley-Terry ratings."""
    import json

    from lmlab.eval.judge import check_inputs, format_ratings, judge_models
    from lmlab.utils import claim_output_file, json_with, write_json

    if not questions.is_file():
        raise UsageError(f"--questions {questions}: no such file")
    qs = []
    for i, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            qs.append(str(json.loads(line)["question"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{questions}:{i}: expected a JSON object with 'question'") from None
    check_inputs(model, qs[:limit])  # all input checked before the output is claimed
    claim_output_file(out, "judge results", json_with("verdicts"), overwrite=overwrite)
    res = judge_models(judge_model, model, qs[:limit], chat=chat, max_new_tokens=gen.max_new_tokens)
    write_json(out, res)
    print(format_ratings(res))
    print(f"verdicts: {out}")

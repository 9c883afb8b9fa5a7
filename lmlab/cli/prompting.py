"""`lmlab agent` and `lmlab solve`: tools and reasoning strategies on any model, local or
served (docs/prompting.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app

ModelOpt = Annotated[
    str | None, typer.Option(help="A model lmlab loads, or the served model's name with --url.")
]
UrlOpt = Annotated[str | None, typer.Option(help="An OpenAI-compatible server.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")]
TokensOpt = Annotated[int, typer.Option(help="Longest reply per model call, in tokens.")]


@app.command("agent")
def agent_cmd(
    task: Annotated[str, typer.Argument(help="What the agent should do or answer.")],
    model: ModelOpt = None,
    url: UrlOpt = None,
    tools: Annotated[
        str, typer.Option(help="Built-in tools, comma-separated: calculator, python, search.")
    ] = "calculator,python",
    index: Annotated[Path | None, typer.Option(help="A retrieval index for search.")] = None,
    max_steps: Annotated[int, typer.Option(help="Model turns at most.")] = 6,
    max_tokens: Annotated[int, typer.Option(help="Tokens the model may write in all.")] = 2048,
    max_new_tokens: TokensOpt = 256,
    transcript: Annotated[
        Path | None, typer.Option(help="Write every step here as JSONL (a new file).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier transcript.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A ReAct agent: thought, action, observation over the tools, until a final answer or
    the step/token budget; a failing tool becomes an observation, never a crash."""
    from lmlab.infer.options import GenerationConfig
    from lmlab.prompt.agent import run_agent
    from lmlab.prompt.backend import open_backend
    from lmlab.prompt.retrieval import load_index
    from lmlab.prompt.tools import default_registry
    from lmlab.utils import claim_output_file

    if transcript is not None:
        transcript = claim_output_file(
            transcript, "agent transcript", _is_transcript, overwrite, "--transcript"
        )
    idx = load_index(index) if index is not None else None
    registry = default_registry([t.strip() for t in tools.split(",") if t.strip()], idx)
    backend = open_backend(model, url)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    res = run_agent(backend, task, registry, max_steps, max_tokens, cfg, transcript)
    if json_out:
        print(json.dumps(asdict(res)))
        return
    print(
        res.answer if res.answer is not None else f"(no answer: the {res.stopped} budget ran out)"
    )


def _is_transcript(path: Path) -> bool:
    try:
        with open(path) as f:
            return json.loads(f.readline()).get("event") == "task"
    except (OSError, ValueError, AttributeError):
        return False


@app.command("solve")
def solve_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    model: ModelOpt = None,
    url: UrlOpt = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="direct, zero_shot_cot, self_consistency, least_to_most, plan_and_solve, "
            "self_refine, pal."
        ),
    ] = "zero_shot_cot",
    form: Annotated[
        str, typer.Option(help="The answer's form: integer, yes_no, word, comma_list, word_list.")
    ] = "integer",
    samples: Annotated[int, typer.Option(help="Self-consistency: chains to vote over.")] = 5,
    max_new_tokens: TokensOpt = 256,
    json_out: JsonOpt = False,
) -> None:
    """Answer QUESTION with a reasoning strategy; the answer read out in FORM."""
    from lmlab.errors import UsageError
    from lmlab.infer.options import GenerationConfig
    from lmlab.prompt.backend import open_backend
    from lmlab.prompt.strategies import STRATEGIES, solve

    usable = [s for s in STRATEGIES if s != "few_shot_cot"]  # it needs demonstrations
    if strategy not in usable:
        raise UsageError(f"--strategy {strategy}: choose one of {', '.join(usable)}")
    extra = {"n": samples} if strategy == "self_consistency" else {}
    backend = open_backend(model, url)
    sol = solve(
        strategy, backend, question, form, GenerationConfig(max_new_tokens=max_new_tokens), **extra
    )
    if json_out:
        print(json.dumps(asdict(sol)))
        return
    print(sol.answer if sol.answer is not None else "(no answer could be read)")

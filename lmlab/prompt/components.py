"""A prompt built from the survey's components (Zhao et al. §6.1): the task description,
contextual information, demonstrations, the input data and the output format, plus named
prompt tips: reusable parts that carry the survey's design advice (state the goal
clearly, decompose into sub-tasks, delimit the input, ask for a format, check the
answer, ...).

A prompt is a YAML file (or a mapping) whose text fields are Jinja templates over the
variables given at render time:

```yaml
task: Classify the sentiment of the review.
context: "Reviews come from {{ site }}."
demos:
  - {input: "A joy from start to finish.", output: positive}
input: "{{ review }}"
output_format: one word, positive or negative
tips: [clear_goal, delimit_input, output_format]
```

`render_prompt(spec, variables)` gives plain text; `prompt_messages` gives chat turns,
the task description and tips as the system turn and the rest as the user's, for a
model's chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmlab.errors import UsageError
from lmlab.prompt.reasoning import ZERO_SHOT_COT
from lmlab.prompt.templates import render_jinja

# name -> the sentence it adds (to the instructions), after Zhao et al. §6.1's tips
TIPS = {
    "clear_goal": "Read the task carefully and do exactly what it asks, nothing more.",
    "decompose": "Break the task into easy, detailed sub-tasks and solve them one by one.",
    "step_by_step": ZERO_SHOT_COT,
    "delimit_input": "The input is given between triple backticks.",
    "output_format": "Give the output in exactly the requested format.",
    "check_answer": "Before answering, check that the answer meets every requirement.",
    "no_guessing": "If the answer is not known or not in the context, say so instead of guessing.",
    "cite_context": "Use only the context given, and cite it.",
    "answer_is": 'End with "The answer is X."',
    "english": "Answer in English.",
}


@dataclass
class PromptSpec:
    task: str = ""
    input: str = ""
    context: str = ""
    demos: list[dict] = field(default_factory=list)  # {"input", "output"}
    output_format: str = ""
    tips: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tips if t not in TIPS]
        if unknown:
            raise UsageError(f"prompt tip {unknown[0]!r}: known tips are {', '.join(TIPS)}")
        for i, d in enumerate(self.demos):
            if not isinstance(d, dict) or set(d) != {"input", "output"}:
                raise UsageError(f"prompt demos[{i}]: needs exactly 'input' and 'output'")


def load_prompt(source: str | Path | dict) -> PromptSpec:
    """A prompt spec from a YAML file or a mapping; unknown keys are refused by name."""
    raw = source
    if not isinstance(source, dict):
        try:
            raw = yaml.safe_load(Path(source).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{source}: cannot read prompt ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: a prompt file is a mapping")
    known = set(PromptSpec.__dataclass_fields__)
    extra = sorted(set(raw) - known)
    if extra:
        raise UsageError(f"prompt: unknown key {extra[0]!r} (keys: {', '.join(sorted(known))})")
    return PromptSpec(**raw)


def _instructions(spec: PromptSpec, v: dict) -> str:
    parts = [render_jinja(spec.task, v).strip()] if spec.task else []
    parts += [TIPS[t] for t in spec.tips]
    return " ".join(p for p in parts if p)


def _body(spec: PromptSpec, v: dict) -> str:
    fence = "delimit_input" in spec.tips
    wrap = (lambda s: f"```\n{s}\n```") if fence else (lambda s: s)  # noqa: E731
    parts = []
    if spec.context:
        parts.append(f"Context: {render_jinja(spec.context, v).strip()}")
    for d in spec.demos:
        parts.append(f"Input: {wrap(render_jinja(d['input'], v))}\nOutput: {d['output']}")
    if spec.output_format:
        parts.append(f"Output format: {render_jinja(spec.output_format, v).strip()}")
    parts.append(f"Input: {wrap(render_jinja(spec.input, v))}\nOutput:")
    return "\n\n".join(parts)


def render_prompt(spec: PromptSpec, variables: dict | None = None) -> str:
    """The prompt as plain text: instructions, context, demonstrations, format, input."""
    v = variables or {}
    head = _instructions(spec, v)
    return f"{head}\n\n{_body(spec, v)}" if head else _body(spec, v)


def prompt_messages(spec: PromptSpec, variables: dict | None = None) -> list[dict]:
    """The prompt as chat turns: the instructions as the system turn, the rest as the
    user's (the model's chat template then frames them)."""
    v = variables or {}
    head = _instructions(spec, v)
    user = {"role": "user", "content": _body(spec, v)}
    return [{"role": "system", "content": head}, user] if head else [user]

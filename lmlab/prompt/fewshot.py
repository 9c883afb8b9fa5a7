"""In-context learning (Zhao et al. §6.1): demonstrations put before the question, as plain
text or as chat turns, with or without their worked rationales (chain of thought)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from lmlab.prompt.reasoning import ZERO_SHOT_COT
from lmlab.prompt.templates import check_template, default_template, fill


class Example(Protocol):
    """A question with its answer and a worked rationale that ends in the answer (an
    evaluation item, a demonstration); only these attributes are read."""

    question: str
    answer: str
    rationale: str


def demo_answer(demo: Example, cot: bool) -> str:
    """What a demonstration shows as its answer: the rationale with `cot`, else the bare
    "The answer is X.", the phrase answer extraction looks for."""
    return demo.rationale if cot else f"The answer is {demo.answer}."


def build_prompt(
    item: Example,
    demos: Sequence[Example] = (),
    cot: bool = False,
    template: str | None = None,
    chat: bool = False,
) -> str | list[dict[str, str]]:
    """The prompt for `item`: plain text, or chat messages with each demonstration as a
    user/assistant turn. Zero-shot chain of thought appends "Let's think step by step.".
    `template` (default "Q: {question}\nA:", or the bare question in chat) frames each
    question."""
    if template is None:
        template = default_template(chat)
    check_template(template)
    cue = f" {ZERO_SHOT_COT}" if cot and not demos else ""
    if chat:
        msgs: list[dict[str, str]] = []
        for d in demos:
            msgs.append({"role": "user", "content": fill(template, d.question).strip()})
            msgs.append({"role": "assistant", "content": demo_answer(d, cot)})
        msgs.append({"role": "user", "content": fill(template, item.question).strip() + cue})
        return msgs
    shown = "".join(f"{fill(template, d.question)} {demo_answer(d, cot)}\n\n" for d in demos)
    return f"{shown}{fill(template, item.question)}{cue}"


def few_shot_prompt(question: str, shots: Sequence[Mapping[str, str]]) -> str:
    """Demonstrations (dicts with "question" and "answer") as "Question: ...\\nAnswer: ...",
    each followed by a blank line, then the open question."""
    demos = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{demos}Question: {question}\nAnswer:"


def fewshot_context(
    query: str,
    shots: Sequence[tuple[str, str]],
    description: str = "",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> str:
    """lm-evaluation-harness's context: the description, then each (prompt, answer)
    demonstration joined by `target_delimiter`, the demonstrations and the query separated
    by `fewshot_delimiter`."""
    demos = [text + target_delimiter + target for text, target in shots]
    return description + fewshot_delimiter.join([*demos, query])

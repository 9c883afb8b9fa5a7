"""Reasoning strategies (Zhao et al. §6.3–6.4) on any backend (`lmlab.prompt.backend`):
each takes a question and returns a `Solution` (the answer read out in a known form, and
the transcript of every call), so strategies are compared on the same items.

- `direct`: the question, answer only.
- `zero_shot_cot`: the question, then "Let's think step by step." (Kojima et al. 2022).
- `few_shot_cot`: worked demonstrations before the question (Wei et al. 2022).
- `self_consistency`: n sampled chains of thought, the majority answer (Wang et al. 2023).
- `least_to_most`: first ask for the simpler subquestions, then answer them in order,
  each with the answers so far in view, the original question last (Zhou et al. 2023).
- `plan_and_solve`: "devise a plan, then carry it out" (Wang et al. 2023, PS prompting).
- `self_refine`: draft, critique, revise, until the critique finds nothing or the rounds
  run out (Madaan et al. 2023).
- `pal`: program-aided reasoning (Gao et al. 2023): the model writes `solution()` in
  Python, lmlab's sandbox runs it, its return value is the answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.answers import read_answer
from lmlab.prompt.reasoning import ZERO_SHOT_COT, majority_vote

STRATEGIES = (
    "direct",
    "zero_shot_cot",
    "few_shot_cot",
    "self_consistency",
    "least_to_most",
    "plan_and_solve",
    "self_refine",
    "pal",
)
ANSWER_HINT = 'End with "The answer is X."'
PLAN_AND_SOLVE = (
    "Let's first understand the problem and devise a plan to solve the problem. Then, let's "
    "carry out the plan and solve the problem step by step."
)
DECOMPOSE = (
    "To answer the question below, what simpler subquestions must be answered first? "
    "List them in order, one per line, without answering them.\n\nQuestion: {question}"
)
CRITIQUE = (
    "Question: {question}\n\nProposed answer:\n{draft}\n\nCheck the proposed answer step by "
    "step. If it is correct, reply exactly: no issues. Otherwise, say what is wrong."
)
REVISE = (
    "Question: {question}\n\nProposed answer:\n{draft}\n\nFeedback:\n{feedback}\n\n"
    "Write a corrected answer. " + ANSWER_HINT
)
PAL = (
    "Write a Python function `solution()` that computes and returns the answer to the "
    "question below. Reply with the code only, in one ```python block.\n\nQuestion: {question}"
)
_CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])?\s*(.+?)\s*$")


@dataclass
class Solution:
    answer: str | None  # in `form`'s canonical text; None: none could be read
    transcript: list[dict] = field(default_factory=list)  # {"prompt", "output"} per call
    votes: list[str | None] | None = None  # self-consistency: each chain's answer


def _ask(backend, prompt: str, cfg: GenerationConfig, log: list[dict]) -> list[str]:
    outs = backend.chat([[{"role": "user", "content": prompt}]], cfg)[0]
    log.append({"prompt": prompt, "output": outs if len(outs) > 1 else outs[0]})
    return outs


def _greedy(cfg: GenerationConfig) -> GenerationConfig:
    return dataclasses.replace(cfg, temperature=0.0, n=1)


def direct(backend, question: str, form: str, cfg: GenerationConfig) -> Solution:
    log: list[dict] = []
    out = _ask(backend, f"{question}\nAnswer with the answer only.", _greedy(cfg), log)[0]
    return Solution(read_answer(out, form), log)


def zero_shot_cot(backend, question: str, form: str, cfg: GenerationConfig) -> Solution:
    log: list[dict] = []
    out = _ask(backend, f"{question}\n{ZERO_SHOT_COT} {ANSWER_HINT}", _greedy(cfg), log)[0]
    return Solution(read_answer(out, form), log)


def few_shot_cot(
    backend, question: str, form: str, cfg: GenerationConfig, shots: Sequence[tuple[str, str]]
) -> Solution:
    """`shots`: (question, worked answer ending in "The answer is X.") pairs."""
    if not shots:
        raise UsageError("few_shot_cot needs demonstrations (question, worked answer)")
    demos = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in shots)
    log: list[dict] = []
    out = _ask(backend, f"{demos}\n\nQuestion: {question}\nAnswer:", _greedy(cfg), log)[0]
    return Solution(read_answer(out, form), log)


def self_consistency(
    backend, question: str, form: str, cfg: GenerationConfig, n: int = 5
) -> Solution:
    """n chains sampled at `cfg.temperature` (0.7 if greedy was asked), the majority."""
    if n < 1:
        raise UsageError(f"self_consistency: n must be >= 1, got {n}")
    temp = cfg.temperature or 0.7
    log: list[dict] = []
    outs = _ask(
        backend,
        f"{question}\n{ZERO_SHOT_COT} {ANSWER_HINT}",
        dataclasses.replace(cfg, temperature=temp, n=n),
        log,
    )
    votes = [read_answer(o, form) for o in outs]
    return Solution(majority_vote(votes), log, votes)


def subquestions(text: str, limit: int = 6) -> list[str]:
    """The subquestions listed in a decomposition, numbered or bulleted or one per line."""
    items = []
    for line in text.splitlines():
        m = _LIST_ITEM.match(line)
        if m and m.group(1) and not m.group(1).endswith(":"):
            items.append(m.group(1))
    return items[:limit]


def least_to_most(backend, question: str, form: str, cfg: GenerationConfig) -> Solution:
    greedy = _greedy(cfg)
    log: list[dict] = []
    subs = subquestions(_ask(backend, DECOMPOSE.format(question=question), greedy, log)[0])
    solved = ""
    for sub in [*subs, question]:
        last = sub is question
        prompt = f"{question}\n\n{solved}Q: {sub}\nA:"
        if last:
            prompt += f" {ANSWER_HINT}"
        out = _ask(backend, prompt, greedy, log)[0].strip()
        solved += f"Q: {sub}\nA: {out}\n"
    return Solution(read_answer(out, form), log)


def plan_and_solve(backend, question: str, form: str, cfg: GenerationConfig) -> Solution:
    log: list[dict] = []
    out = _ask(backend, f"{question}\n{PLAN_AND_SOLVE} {ANSWER_HINT}", _greedy(cfg), log)[0]
    return Solution(read_answer(out, form), log)


def self_refine(
    backend, question: str, form: str, cfg: GenerationConfig, rounds: int = 2
) -> Solution:
    greedy = _greedy(cfg)
    log: list[dict] = []
    draft = _ask(backend, f"{question}\n{ZERO_SHOT_COT} {ANSWER_HINT}", greedy, log)[0]
    for _ in range(rounds):
        feedback = _ask(backend, CRITIQUE.format(question=question, draft=draft), greedy, log)[0]
        if "no issues" in feedback.lower():
            break
        draft = _ask(
            backend, REVISE.format(question=question, draft=draft, feedback=feedback), greedy, log
        )[0]
    return Solution(read_answer(draft, form), log)


def program_of(text: str) -> str:
    """The code in a reply: its first fenced block, else the reply itself."""
    m = _CODE.search(text)
    return (m.group(1) if m else text).strip() + "\n"


def pal(backend, question: str, form: str, cfg: GenerationConfig, timeout_s: float = 5) -> Solution:
    """The model's `solution()` run in the sandbox (isolated by the operating system); a
    program that fails, loops or is refused gives no answer, and the transcript says why."""
    from lmlab.prompt.sandbox import run_code

    log: list[dict] = []
    code = program_of(_ask(backend, PAL.format(question=question), _greedy(cfg), log)[0])
    res = run_code(code, 'print("PAL_ANSWER=" + repr(solution()))', timeout_s=timeout_s)
    found = re.search(r"PAL_ANSWER=(.*)", res.stdout_tail)
    log.append({"program": code, "status": res.status, "stdout": res.stdout_tail,
                "stderr": res.stderr_tail})  # fmt: skip
    if res.status != "passed" or not found:
        return Solution(None, log)
    value = found.group(1).strip().strip("'\"")  # repr() of a str is quoted
    return Solution(read_answer(f"The answer is {value}", form), log)


def solve(
    strategy: str,
    backend,
    question: str,
    form: str = "integer",
    cfg: GenerationConfig | None = None,
    **kw,
) -> Solution:
    """Run one strategy by name (`STRATEGIES`)."""
    funcs = {
        "direct": direct,
        "zero_shot_cot": zero_shot_cot,
        "few_shot_cot": few_shot_cot,
        "self_consistency": self_consistency,
        "least_to_most": least_to_most,
        "plan_and_solve": plan_and_solve,
        "self_refine": self_refine,
        "pal": pal,
    }
    if strategy not in funcs:
        raise UsageError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    cfg = (cfg or GenerationConfig(max_new_tokens=256)).validate()
    return funcs[strategy](backend, question, form, cfg, **kw)

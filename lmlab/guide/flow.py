"""The decision flow of Yang et al. 2023, Fig. 2: whether a prompted LLM or a fine-tuned
model suits an NLP application. The flow is data (`data/flow.yaml`: questions in the
figure's order, each answer leading to the next question or to a leaf); this module walks
it with answers given as a mapping (a JSON file) or asked one at a time, and turns the leaf
into a recommendation: `llm`, `fine-tuned` or `none` (the figure's "?": no model works
well), the Remark that justifies it, and the lmlab commands that carry it out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import yaml

from lmlab.errors import UsageError

FLOW_FILE = Path(__file__).parent / "data" / "flow.yaml"
LEAVES = ("llm", "fine-tuned", "none")
# answers a flow file may hold besides its questions' ids
EXTRAS = {
    "cost_sensitive": "Is cost or latency tight (many requests, a CPU, a latency budget)?",
}
DEFAULT_LLM = "smollm2-135m-instruct"  # the instruct model that ships offline
YES = {"y", "yes", "true", "1"}
NO = {"n", "no", "false", "0"}


@dataclass
class Step:
    id: str
    question: str
    answer: bool


@dataclass
class Recommendation:
    recommendation: str  # llm | fine-tuned | none
    path: list[Step]
    remark: int
    remark_text: str
    commands: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def load_flow(path: Path = FLOW_FILE) -> dict:
    """The flow, checked: every question reachable, every branch a question or a leaf."""
    try:
        flow = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: cannot read the decision flow ({e})") from None
    questions, remarks = flow["questions"], flow["remarks"]
    for qid, q in questions.items():
        for branch in (True, False):  # YAML reads the keys yes/no as booleans
            nxt = q[branch]
            if isinstance(nxt, dict):
                if nxt.get("leaf") not in LEAVES or nxt.get("remark") not in remarks:
                    raise UsageError(f"{path}: {qid}: a leaf needs leaf in {LEAVES} and a remark")
            elif nxt not in questions:
                raise UsageError(f"{path}: {qid}: {nxt!r} is no question")
    return flow


def _as_bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in YES | NO:
        return value.strip().lower() in YES
    raise UsageError(f"answers: {key}: expected yes/no (true/false), got {value!r}")


def check_answers(answers: Mapping) -> None:
    """Unknown keys are refused, so a typo does not silently take the other branch."""
    known = set(load_flow()["questions"]) | set(EXTRAS) | {"model"}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise UsageError(f"answers: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def decide(answers: Mapping, ask: Callable[[str, str], bool] | None = None) -> Recommendation:
    """Walk the flow from its start. A question missing from `answers` is put to `ask`
    (id, question) when given, else refused with the question's text."""
    check_answers(answers)
    flow = load_flow()
    questions = flow["questions"]
    qid, path = flow["start"], []
    while True:
        q = questions[qid]
        if qid in answers:
            yes = _as_bool(answers[qid], qid)
        elif ask is not None:
            yes = ask(qid, q["ask"])
        else:
            raise UsageError(f"answers: no answer for {qid!r} ({q['ask']})")
        path.append(Step(qid, q["ask"], yes))
        nxt = q[yes]
        if isinstance(nxt, dict):
            break
        qid = nxt
    cost = answers.get("cost_sensitive")
    if cost is None and ask is not None:
        cost = ask("cost_sensitive", EXTRAS["cost_sensitive"])
    cost = _as_bool(cost, "cost_sensitive") if cost is not None else False
    leaf, remark = nxt["leaf"], nxt["remark"]
    model = str(answers.get("model") or DEFAULT_LLM)
    notes = [f"Fig. 2: {nxt['note']}"] if nxt.get("note") else []
    cmds = commands(leaf, path[-1].id, model, cost)
    if cost:
        notes.append(f"Remark 8: {flow['remarks'][8]}")
    return Recommendation(leaf, path, remark, flow["remarks"][remark], cmds, notes)


# the commands for each leaf, by the question that led to it
_LLM = {
    "mimic_human": [
        "lmlab chat {model}",
        "lmlab serve {model} --port 8000   # any OpenAI client, and a web chat page",
    ],
    "emergent": [
        'lmlab solve "YOUR QUESTION" --model {model} --strategy self_consistency',
        "lmlab eval {model} --tasks TASK.yaml   # a task file with strategy: pal, "
        "zero_shot_cot, ... (docs/evaluation.md)",
    ],
    "multiple_tasks": [
        "lmlab chat {model}",
        'lmlab agent "YOUR TASK" --model {model} --tools calculator,python',
    ],
    "few_labels": [
        "lmlab compare YOUR_DATA.csv --llm {model} --shots 0 4 16   # measure before you commit",
        "lmlab eval {model} --tasks TASK.yaml   # num_fewshot with fewshot_selector: knn",
    ],
    "ood": [
        "lmlab compare YOUR_DATA.csv --llm {model}   # test on data from the new domain",
    ],
    "creative": [
        'lmlab generate {model} --prompt "YOUR PROMPT" --temperature 0.8 --top-p 0.95',
    ],
    "counterfactual": [
        "lmlab chat {model}",
        "lmlab rag index YOUR_DOCS/ --out index && "
        'lmlab rag ask index "YOUR QUESTION" --model {model}   # ground it in your documents',
    ],
}
_FINE_TUNED = {
    "far_from_lm": [
        "lmlab compare YOUR_DATA.csv   # a fine-tuned MiniLM classifier against the prompted "
        "LLM (lmlab fine-tunes classifiers, not regression heads)",
    ],
    "knowledge": [
        "lmlab compare YOUR_DATA.csv --labels 100 1000 3000   # text, label: the learning "
        "curve against the prompted LLM",
        "lmlab sft --model {model} --data YOUR_DATA.jsonl --out tuned{peft}",
    ],
    "context_knowledge": [
        "lmlab sft --model {model} --data YOUR_QA.jsonl --out tuned{peft}   # context + "
        "question -> answer",
    ],
}
_NONE = [
    "lmlab rag index YOUR_DOCS/ --out index && "
    'lmlab rag ask index "YOUR QUESTION" --model {model}   # put the facts in the context',
    "lmlab eval {model} --tasks TASK.yaml   # measure whatever you try: no model is known "
    "to work well here",
]


def commands(leaf: str, last: str, model: str, cost_sensitive: bool) -> list[str]:
    """The concrete lmlab commands for a leaf; with tight cost, PEFT instead of full
    fine-tuning, and the cost estimate."""
    peft = " --peft lora:r=8" if cost_sensitive else ""
    table = {"llm": _LLM, "fine-tuned": _FINE_TUNED}.get(leaf)
    lines = table[last] if table is not None else _NONE
    out = [c.format(model=model, peft=peft) for c in lines]
    if cost_sensitive:
        out.append(
            f"lmlab guide cost {model} --requests 1000 --prompt-tokens 512 --output-tokens 128"
        )
        if leaf == "llm":
            out.append(f"lmlab quantize {model} --method int8 --out {model}-int8")
    return out

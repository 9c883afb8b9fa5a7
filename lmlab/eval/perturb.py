"""Brittleness and robustness (Kaddour et al., "brittle evaluations"): the same items
under several prompt templates report the spread of accuracy, and the same items under
seeded input perturbations (typos, casing, extra whitespace) report the drop.

A perturbation never touches the spans that carry the answer: the numbers (unless
`protect_numbers=False`) and the item's `protected` substrings (the words to reverse,
"does not flip the coin"), so the reference answer stays right for the perturbed question.

```python
from lmlab.eval.perturb import Perturbation, evaluate_perturbed, evaluate_templates
from lmlab.eval.synthetic import make_items, score_fn_for

items = make_items("addition", 50, difficulty=2)
score = score_fn_for(model, tok, "addition", difficulty=2, shots=4)
evaluate_templates(items, ["Q: {question}\\nA:", "Question: {question}\\nAnswer:"], score)
evaluate_perturbed(items, score, [Perturbation("typos", 0.05), Perturbation("upper")])
```
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.errors import UsageError
from lmlab.eval.metrics import mean_stderr, paired_difference

KINDS = ("typos", "lower", "upper", "random_case", "whitespace")
TYPO_OPS = ("swap", "drop", "duplicate")
_DIGITS = re.compile(r"\d+")

# items (and a template, or None for the default) -> one score in [0, 1] per item
ScoreFn = Callable[..., Sequence[float]]


@dataclass(frozen=True)
class Perturbation:
    """One input perturbation. `rate`: the chance each eligible character gets a typo
    (typos), flips case (random_case) or each whitespace run is widened (whitespace);
    lower/upper change every unprotected letter and ignore it."""

    kind: str
    rate: float = 0.05
    protect_numbers: bool = True
    ops: tuple[str, ...] = TYPO_OPS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"perturb: unknown kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not 0 <= self.rate <= 1:
            raise UsageError("perturb: rate must be in [0, 1]")
        if not self.ops or any(o not in TYPO_OPS for o in self.ops):
            raise UsageError(f"perturb: typo ops must be a non-empty subset of {TYPO_OPS}")

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("lower", "upper") else f"{self.kind}@{self.rate:g}"


def protected_mask(text: str, protect: Sequence[str] = (), protect_numbers: bool = True) -> list:
    """True for each character inside a protected span: every occurrence of a `protect`
    substring, and every run of digits when `protect_numbers`."""
    mask = [False] * len(text)
    spans = [m.span() for m in _DIGITS.finditer(text)] if protect_numbers else []
    for p in protect:
        if p:
            spans += [(m.start(), m.end()) for m in re.finditer(re.escape(p), text)]
    for a, b in spans:
        mask[a:b] = [True] * (b - a)
    return mask


def _eligible(text: str, mask: list) -> list[bool]:
    # typos go into words (and numbers, when those are not protected), never punctuation
    return [(c.isalpha() or c.isdigit()) and not m for c, m in zip(text, mask, strict=True)]


def typos(
    text: str,
    rate: float,
    seed: int | str = 0,
    protect: Sequence[str] = (),
    protect_numbers: bool = True,
    ops: Sequence[str] = TYPO_OPS,
) -> str:
    """Keyboard-slip noise: each eligible character, with probability `rate`, is swapped
    with the next one, dropped or duplicated (an op drawn from `ops`). A swap needs a
    different eligible neighbour; without one it becomes another op, or nothing."""
    rng = random.Random(seed)
    ok = _eligible(text, protected_mask(text, protect, protect_numbers))
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if not ok[i] or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.choice(list(ops))
        can_swap = i + 1 < len(text) and ok[i + 1] and text[i + 1] != c
        if op == "swap" and not can_swap:
            others = [o for o in ops if o != "swap"]
            op = rng.choice(others) if others else "none"
        if op == "swap":
            out += [text[i + 1], c]
            i += 2
            continue
        if op == "duplicate":
            out += [c, c]
        elif op == "none":
            out.append(c)
        i += 1  # "drop" appends nothing
    return "".join(out)


def change_case(
    text: str,
    mode: str,
    seed: int | str = 0,
    rate: float = 0.5,
    protect: Sequence[str] = (),
) -> str:
    """ "lower" or "upper" every unprotected character, or ("random_case") flip the case of
    each unprotected letter with probability `rate`."""
    if mode not in ("lower", "upper", "random_case"):
        raise UsageError("perturb: case mode must be lower, upper or random_case")
    rng = random.Random(seed)
    mask = protected_mask(text, protect, protect_numbers=False)
    out = []
    for c, m in zip(text, mask, strict=True):
        if m or not c.isalpha():
            out.append(c)
        elif mode == "lower":
            out.append(c.lower())
        elif mode == "upper":
            out.append(c.upper())
        else:
            out.append(c.swapcase() if rng.random() < rate else c)
    return "".join(out)


def extra_whitespace(
    text: str, rate: float, seed: int | str = 0, protect: Sequence[str] = ()
) -> str:
    """Widen each unprotected whitespace run, with probability `rate`, by 1 to 3 spaces."""
    rng = random.Random(seed)
    mask = protected_mask(text, protect, protect_numbers=False)
    out = []
    for i, c in enumerate(text):
        out.append(c)
        run_ends = c.isspace() and (i + 1 == len(text) or not text[i + 1].isspace())
        if run_ends and not mask[i] and rng.random() < rate:
            out.append(" " * rng.randint(1, 3))
    return "".join(out)


def perturb_text(text: str, p: Perturbation, seed: int | str = 0, protect=()) -> str:
    if p.kind == "typos":
        return typos(text, p.rate, seed, protect, p.protect_numbers, p.ops)
    if p.kind == "whitespace":
        return extra_whitespace(text, p.rate, seed, protect)
    return change_case(text, p.kind, seed, p.rate, protect)


def _field(item: Any, key: str, default: Any = None) -> Any:
    return item.get(key, default) if isinstance(item, dict) else getattr(item, key, default)


def perturb_items(items: Sequence[Any], p: Perturbation, seed: int = 0) -> list:
    """Copies of `items` (synthetic `Item`s or dicts with a "question") with the question
    perturbed, each with its own seed, its protected substrings left intact."""
    out = []
    for i, it in enumerate(items):
        q = _field(it, "question")
        if not isinstance(q, str):
            raise UsageError(f"perturb: item {i} has no text 'question' to perturb")
        item_seed = f"{seed}|{p.name}|{i}|{_field(it, 'id', '')}"
        new_q = perturb_text(q, p, item_seed, tuple(_field(it, "protected", ()) or ()))
        if isinstance(it, dict):
            out.append({**it, "question": new_q})
        else:
            out.append(dataclasses.replace(it, question=new_q))
    return out


def _scores(score_fn: ScoreFn, items: Sequence[Any], *args: Any) -> list[float]:
    s = [float(x) for x in score_fn(items, *args)]
    if len(s) != len(items):
        raise ValueError(f"perturb: score_fn returned {len(s)} scores for {len(items)} items")
    return s


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def evaluate_templates(items: Sequence[Any], templates: Sequence[str], score_fn: ScoreFn) -> dict:
    """Accuracy of the same items under each prompt template, and how far they spread:
    `spread` = best - worst, `std` = the sample standard deviation over templates.

    `score_fn(items, template)` returns one score per item."""
    if not templates:
        raise UsageError("perturb: evaluate_templates needs at least one template")
    rows = []
    for t in templates:
        acc, se = mean_stderr(_scores(score_fn, items, t))
        rows.append({"template": t, "accuracy": acc, "stderr": se, "n": len(items)})
    accs = [r["accuracy"] for r in rows]
    best = max(rows, key=lambda r: r["accuracy"])
    worst = min(rows, key=lambda r: r["accuracy"])
    return {
        "templates": rows,
        "spread": max(accs) - min(accs),
        "std": _std(accs),
        "best": best["template"],
        "worst": worst["template"],
    }


def evaluate_perturbed(
    items: Sequence[Any],
    score_fn: ScoreFn,
    perturbations: Sequence[Perturbation],
    seed: int = 0,
    examples: int = 3,
) -> dict:
    """Accuracy on the clean items and under each perturbation, with the drop (clean minus
    perturbed) and its paired standard error over the same items.

    `score_fn(items)` returns one score per item; `examples` perturbed questions are kept
    per perturbation for the report."""
    clean = _scores(score_fn, items)
    acc, se = mean_stderr(clean)
    rows = []
    for p in perturbations:
        changed = perturb_items(items, p, seed)
        scores = _scores(score_fn, changed)
        p_acc, p_se = mean_stderr(scores)
        drop, drop_se = paired_difference(scores, clean)  # mean(clean - perturbed)
        n_changed = sum(
            _field(a, "question") != _field(b, "question")
            for a, b in zip(items, changed, strict=True)
        )
        rows.append(
            {
                "name": p.name,
                "kind": p.kind,
                "rate": p.rate,
                "accuracy": p_acc,
                "stderr": p_se,
                "drop": drop,
                "drop_se": drop_se,
                "n_changed": n_changed,
                "examples": [_field(c, "question") for c in changed[:examples]],
            }
        )
    return {"n": len(items), "clean": {"accuracy": acc, "stderr": se}, "perturbed": rows}

"""Reasoning strategies on arithmetic word problems with SmolLM2-135M-Instruct: direct
answers, zero-shot chain of thought, few-shot chain of thought, self-consistency and
program-aided reasoning (PAL), on the same items, through lmlab's task files
(`strategy:` in a task YAML, what `lmlab eval --tasks FILE.yaml` runs).

Items come from `reasoning-gym` (seeded, offline):
- `gsm_symbolic`: GSM8K-style word problems with new numbers (Mirzadeh et al. 2024);
  few-shot CoT's demonstrations are other items of the same generator (another seed)
  with the generator's worked solution, its "#### X" line replaced by "The answer is X.";
- `basic_arithmetic`: expressions of 2–3 terms of 1–2 digits (`+ - *`, no division),
  e.g. "Calculate 7 * 12 - 5."; demonstrations: other expressions with their steps.

Each item is answered by every strategy; the answer is read as an integer from the reply
(`answer_form: integer`) and compared with the generator's answer. Self-consistency: 5
chains at temperature 0.7, the majority. PAL: the model writes `solution()`, lmlab's
sandbox runs it (5 s). Every call is greedy except self-consistency's; `--max-tokens`
(256) new tokens at most per call; through the chat template. Reported: accuracy ±
binomial SE per strategy, the paired difference against direct answers, and seconds per
item.

Run: `python benchmarks/strategies_arith.py --json strat.json` (about 40 minutes on 2
cores); `--items 3` for a smoke run; `--report strat.json` prints the tables again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _machine import run_and_report

STRATEGIES = {
    "direct": {},
    "zero_shot_cot": {},
    "few_shot_cot": {"num_fewshot": 3},
    "self_consistency": {"strategy_kwargs": {"n": 5}},
    "pal": {},
}
OPS = "+-*"


def gsm_items(n: int, seed: int) -> list[dict]:
    import reasoning_gym as rg

    return [
        {"question": e["question"], "answer": str(e["answer"]), "cot": e["metadata"]["answer_cot"]}
        for e in rg.create_dataset("gsm_symbolic", size=n, seed=seed)
    ]


def arith_items(n: int, seed: int) -> list[dict]:
    """Expressions without division (whose results need not be integers), with steps."""
    import reasoning_gym as rg

    ds = rg.create_dataset(
        "basic_arithmetic",
        size=n,
        seed=seed,
        min_terms=2,
        max_terms=3,
        min_digits=1,
        max_digits=2,
        operators=tuple(OPS),
        allow_parentheses=False,
        allow_negation=False,
    )
    out = []
    for e in ds:
        expr = e["metadata"]["expression"]
        out.append({"question": e["question"], "answer": str(e["answer"]), "cot": steps(expr)})
    return out


def steps(expr: str) -> str:
    """A worked answer for an expression of + - * (multiplications first)."""
    toks = expr.replace("*", " * ").replace("+", " + ").replace("-", " - ").split()
    lines, i = [], 0
    while "*" in toks:  # fold each product, left to right
        i = toks.index("*")
        a, b = int(toks[i - 1]), int(toks[i + 1])
        lines.append(f"{a} * {b} = {a * b}.")
        toks[i - 1 : i + 2] = [str(a * b)]
    value = int(toks[0])
    for op, x in zip(toks[1::2], toks[2::2], strict=True):
        new = value + int(x) if op == "+" else value - int(x)
        lines.append(f"{value} {op} {x} = {new}.")
        value = new
    return " ".join(lines) + f" The answer is {value}."


def write_task(root: Path, name: str, strategy: str, extra: dict, max_tokens: int) -> Path:
    spec = {
        "task": f"{name}_{strategy}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "test.jsonl", "train": "shots.jsonl"}},
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "{{question}}",
        "doc_to_target": "answer",
        "strategy": strategy,
        "answer_form": "integer",
        "generation_kwargs": {"max_gen_toks": max_tokens},
        **extra,
    }
    path = root / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(args) -> dict:
    import torch

    from lmlab import load_model, load_tokenizer
    from lmlab.eval.tasks import load_task, run_task

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    makers = {"gsm_symbolic": gsm_items, "arithmetic": arith_items}
    out: dict = {}
    for name in args.tasks:
        test = makers[name](args.items, args.seed)
        shots = makers[name](8, args.seed + 1)
        for s in shots:  # a worked answer that ends as every strategy asks
            cot = s["cot"].split("####")[0].strip()
            s["answer"] = cot if "The answer is" in cot else f"{cot} The answer is {s['answer']}."
        out[name] = {"answers": [t["answer"] for t in test]}
        with tempfile.TemporaryDirectory(prefix="strategies-") as tmp:
            root = Path(tmp)
            (root / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in test))
            (root / "shots.jsonl").write_text("".join(json.dumps(s) + "\n" for s in shots))
            for strategy in args.strategies:
                spec = write_task(root, name, strategy, STRATEGIES[strategy], args.max_tokens)
                task = load_task(spec)
                t = time.perf_counter()
                res = run_task(model, tok, task, seed=args.seed)
                secs = time.perf_counter() - t
                recs = res["records"]
                out[name][strategy] = {
                    "correct": [int(r["exact_match"]) for r in recs],
                    "predictions": [r["filtered"] for r in recs],
                    "unreadable": sum(r["filtered"] == "" for r in recs),
                    "seconds": secs,
                    "calls": sum(len(r["transcript"]) for r in recs),
                    "example": recs[0]["transcript"] if recs else None,
                }
                acc = np.mean(out[name][strategy]["correct"])
                print(f"  {name} {strategy}: {acc:.3f}, {secs:.0f} s", flush=True)
    return out


def acc_se(c: list[int]) -> str:
    a = np.asarray(c, float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) / np.sqrt(len(a)):.3f}" if len(a) > 1 else "–"


def paired(base: list[int], other: list[int]) -> str:
    d = np.asarray(other, float) - np.asarray(base, float)
    return f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}" if len(d) > 1 else "–"


def report(saved: dict) -> None:
    print(saved["machine"])
    print(saved["command"])
    for name, r in saved["results"].items():
        n = len(r["answers"])
        print(f"\n{name}, {n} items\n")
        print("| strategy | accuracy ± SE | vs direct (paired) | no answer read | calls | s/item |")
        print("|---|---:|---:|---:|---:|---:|")
        base = r.get("direct", {}).get("correct")
        for s, x in r.items():
            if s == "answers":
                continue
            vs = paired(base, x["correct"]) if base and s != "direct" else "–"
            print(
                f"| {s} | {acc_se(x['correct'])} | {vs} | {x['unreadable']} | {x['calls']} "
                f"| {x['seconds'] / n:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per call")
    ap.add_argument("--tasks", nargs="+", default=["arithmetic", "gsm_symbolic"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path, help="print the tables of a --json file, run nothing")
    args = ap.parse_args()
    run_and_report(args, run, report, "reasoning-gym")


if __name__ == "__main__":
    main()

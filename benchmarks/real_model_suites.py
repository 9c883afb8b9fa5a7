"""lmlab's evaluation suites on several models side by side, with standard errors.

    python benchmarks/real_model_suites.py [--models runs/tiny smollm2-135m-instruct]
        [--limit 20] [--code-limit 16] [--tasks coin_flip addition ...] [--json OUT]

Per model (anything `lmlab.load_model` reads: a run, a checkpoint, a GGUF file, a store
name), with the same library calls `lmlab eval MODEL --tasks ...` makes:

- `python_mc` (the built-in multiple-choice task, log-likelihood scored): acc and
  acc_norm, once on the plain prompt and once through the model's chat template.
- every synthetic reasoning task (`lmlab.eval.synthetic`, difficulty `--difficulty`) in
  three modes: zero-shot (no demonstrations, direct answer), few-shot (3 demonstrations,
  direct answers) and chain of thought (3 demonstrations with worked rationales: the
  mode `lmlab eval --tasks synthetic:TASK` runs); greedy, the same seeded items for every
  model; through the chat template unless `--no-chat` (`lmlab eval --chat`).
- `code`: the built-in HumanEval-shaped tasks, 5 samples per task at temperature 0.8,
  pass@1 and pass@5, run in the bubblewrap sandbox (plain continuation: no chat).

Prints a markdown table, value ± standard error per task, mode and model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmlab import load_model, load_tokenizer
from lmlab.eval.harness import BUILTIN_TASKS, run_builtin
from lmlab.eval.synthetic import TASKS, evaluate_synthetic
from lmlab.eval.tasks import load_task, run_task
from lmlab.model.loading import resolve_checkpoint

MODES = {"zero-shot": (0, False), "few-shot (3)": (3, False), "CoT (3-shot)": (3, True)}


def suites(path: str, args: argparse.Namespace) -> dict:
    """{(task, mode, metric): (value, stderr, n)} and seconds, for one model."""
    t0 = time.perf_counter()
    model, tok = load_model(path), load_tokenizer(path)
    rows: dict[str, list] = {}
    mc = load_task(BUILTIN_TASKS / "python_mc.yaml")
    for chat in (False, True):
        res = run_task(model, tok, mc, seed=args.seed, chat=chat)
        for metric in ("acc", "acc_norm"):
            d = res["results"][metric]
            rows[f"python_mc|{'chat' if chat else 'plain'}|{metric}"] = [
                d["value"],
                d["stderr"],
                res["n"],
            ]
        print(f"  {path}: python_mc chat={chat} done ({time.perf_counter() - t0:.0f} s)")
    for task in args.tasks:
        for mode, (shots, cot) in MODES.items():
            r = evaluate_synthetic(
                model,
                tok,
                task,
                n_items=args.limit,
                difficulty=args.difficulty,
                shots=shots,
                cot=cot,
                seed=args.seed,
                chat=args.chat,
            )
            rows[f"{task}|{mode}|accuracy"] = [r["accuracy"], r["accuracy_se"], r["n"]]
            print(
                f"  {path}: {task} {mode}: {r['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)"
            )
    if args.code_limit:
        entry, _ = run_builtin(("code", None), model, tok, args.code_limit, args.seed, False)
        for metric, d in entry["results"].items():
            rows[f"code|5 samples, T=0.8|{metric}"] = [d["value"], d["stderr"], entry["n"]]
        print(f"  {path}: code {entry['results']} ({time.perf_counter() - t0:.0f} s)")
    params = sum(p.numel() for p in model.parameters())
    return {
        "checkpoint": str(resolve_checkpoint(path)),
        "params": params,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def fmt(cell: list | None) -> str:
    if cell is None:
        return "—"
    v, se, _ = cell
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["runs/tiny", "smollm2-135m-instruct"])
    ap.add_argument("--limit", type=int, default=20, help="items per synthetic task and mode")
    ap.add_argument("--code-limit", type=int, default=16, help="code tasks (0: none)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {m: suites(m, args) for m in args.models}
    keys = list(dict.fromkeys(k for r in results.values() for k in r["rows"]))
    print(
        f"\n{os.cpu_count()} cores, torch {torch.__version__}; synthetic: {args.limit} items "
        f"per task and mode, difficulty {args.difficulty}, seed {args.seed}, chat template "
        f"{'on' if args.chat else 'off'}; code: {args.code_limit} tasks"
    )
    for m, r in results.items():
        print(
            f"- {m}: {r['checkpoint']}, {r['params'] / 1e6:.1f}M parameters, "
            f"{r['seconds']:.0f} s for every suite"
        )
    print("\n| task | mode | metric | n | " + " | ".join(results) + " |")
    print("|---|---|---|---:|" + "---:|" * len(results))
    for k in keys:
        task, mode, metric = k.split("|")
        n = next(r["rows"][k][2] for r in results.values() if k in r["rows"])
        cells = " | ".join(fmt(r["rows"].get(k)) for r in results.values())
        print(f"| {task} | {mode} | {metric} | {n} | {cells} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

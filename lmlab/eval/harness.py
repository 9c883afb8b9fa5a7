"""`lmlab eval MODEL --tasks ...`: run evaluation tasks on one checkpoint and write
`results.json` (every metric with its standard error, the resolved configuration, the
model's hash and the seed) and `samples/<task>.jsonl` (one record per item).

A task is a YAML file in lm-evaluation-harness's shape (`lmlab.eval.tasks`). With
training documents given (`train_docs`, or the run's `data/documents/train.jsonl` when
MODEL is a run directory), each item is checked for contamination and every metric is
also reported on the clean items alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lmlab.console import log, warn
from lmlab.errors import UsageError
from lmlab.eval.contamination import contaminated_items, split_by_contamination
from lmlab.eval.tasks import load_task, run_task
from lmlab.prompt.templates import QUESTION_TEMPLATES
from lmlab.utils import hash_obj, hash_tree, write_json, write_jsonl


def item_text(rec: dict) -> str:
    """What of an item could have leaked: its prompt and its answer."""
    parts = [rec.get(k) for k in ("context", "prompt", "target")]
    if "choices" in rec and "gold" in rec:
        parts.append(rec["choices"][rec["gold"]])
    return "\n".join(str(p) for p in parts if p)


BUILTIN_TASKS = Path(__file__).parent / "data" / "tasks"  # built-in task YAMLs, by name
BUILTIN_HELP = (
    "a task YAML file, a built-in task (python_mc), synthetic:TASK[:DIFFICULTY] "
    "(coin_flip, last_letter, reverse_list, addition, multiplication, sort_words), "
    "strategy:STRATEGY:TASK[:DIFFICULTY] (a reasoning strategy on a synthetic task) "
    "or code[:FILE.jsonl]"
)


def parse_task(name: str):
    """A task YAML (a `Task`), or a built-in suite as ("synthetic", task, difficulty) /
    ("code", file or None)."""
    from lmlab.eval.synthetic import TASKS

    if Path(name).is_file():
        return load_task(name)
    if (BUILTIN_TASKS / f"{name}.yaml").is_file():
        return load_task(BUILTIN_TASKS / f"{name}.yaml")
    kind, _, rest = name.partition(":")
    if kind == "strategy":
        from lmlab.prompt.strategies import STRATEGIES

        strategy, _, rest = rest.partition(":")
        if strategy not in STRATEGIES or strategy == "few_shot_cot":
            usable = ", ".join(s for s in STRATEGIES if s != "few_shot_cot")
            raise UsageError(f"eval: {name}: strategy {strategy!r} (one of {usable})")
        return ("strategy", strategy, *parse_task(f"synthetic:{rest}")[1:])
    if kind == "synthetic":
        task, _, diff = rest.partition(":")
        if task not in TASKS:
            raise UsageError(f"eval: synthetic task {task!r} (known: {', '.join(TASKS)})")
        if diff and not diff.isdigit():
            raise UsageError(f"eval: {name}: the difficulty must be a positive integer")
        return ("synthetic", task, int(diff) if diff else 2)
    if kind == "code":
        if rest and not Path(rest).is_file():
            raise UsageError(f"eval: code task file {rest} does not exist")
        return ("code", rest or None)
    raise UsageError(f"eval: task {name!r} is not {BUILTIN_HELP}")


PERTURBATIONS = (("typos", 0.05), ("random_case", 0.2), ("whitespace", 0.3))


def run_strategy(spec: tuple, model, tok, limit: int | None, seed: int, samples: int):
    """A reasoning strategy (`lmlab.prompt.strategies`) on a synthetic task's items, through
    the local backend: the same items for every strategy at a seed, so `--compare-to`
    pairs them. Records keep each item's transcript."""
    from lmlab.eval.synthetic import ANSWER_FORMS, make_items
    from lmlab.prompt.backend import LocalBackend
    from lmlab.prompt.strategies import solve

    _, strategy, task, diff = spec
    name = f"strategy_{strategy}_{task}_d{diff}"
    items = make_items(task, limit or 50, diff, seed=seed)
    backend = LocalBackend(model, tok)
    # self-consistency votes over --self-consistency samples (5 when that is left at 1)
    extra = {"n": samples if samples > 1 else 5} if strategy == "self_consistency" else {}
    log(f"eval: {name} ({len(items)} items)")
    records = []
    for it in items:
        sol = solve(strategy, backend, it.question, ANSWER_FORMS[task], **extra)
        ok = sol.answer == it.answer
        records.append(
            {**it.to_dict(), "prediction": sol.answer, "correct": ok, "transcript": sol.transcript}
        )
    acc = np.array([r["correct"] for r in records], dtype=float)
    se = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else float("nan")
    entry = {
        "name": name,
        "n": len(records),
        "output_type": "generate_until",
        "results": {"accuracy": {"value": float(acc.mean()), "stderr": _finite(se)}},
        "config": {"strategy": strategy, "task": task, "difficulty": diff, **extra},
    }
    return entry, records


def robustness(model, tok, task: str, diff: int, n: int, seed: int, chat: bool) -> dict:
    """Accuracy under each prompt template (and the spread), and the drop under seeded
    typos, casing and whitespace perturbations of the questions."""
    from lmlab.eval.perturb import Perturbation, evaluate_perturbed, evaluate_templates
    from lmlab.eval.synthetic import make_items, score_fn_for

    items = make_items(task, n, diff, seed=seed)
    score = score_fn_for(model, tok, task, diff, shots=3, cot=True, seed=seed, chat=chat)
    perturbations = [Perturbation(kind, rate) for kind, rate in PERTURBATIONS]
    return {
        "templates": evaluate_templates(items, list(QUESTION_TEMPLATES), score),
        "perturbations": evaluate_perturbed(items, score, perturbations, seed=seed),
    }


def run_builtin(
    spec: tuple,
    model,
    tok,
    limit: int | None,
    seed: int,
    chat: bool,
    robust: bool = False,
    self_consistency: int = 1,
):
    """Run a built-in suite; returns (results entry, per-item records)."""
    if spec[0] == "strategy":
        return run_strategy(spec, model, tok, limit, seed, self_consistency)
    if spec[0] == "synthetic":
        from lmlab.eval.synthetic import evaluate_synthetic

        _, task, diff = spec
        name = f"synthetic_{task}_d{diff}"
        log(f"eval: {name}")
        r = evaluate_synthetic(
            model,
            tok,
            task,
            n_items=limit or 50,
            difficulty=diff,
            shots=3,
            cot=True,
            seed=seed,
            chat=chat,
            self_consistency=self_consistency,
        )
        entry = {
            "name": name,
            "n": r["n"],
            "output_type": "generate_until",
            "results": {"accuracy": {"value": r["accuracy"], "stderr": _finite(r["accuracy_se"])}},
            "config": {k: v for k, v in r.items() if k not in ("items", "accuracy", "accuracy_se")},
        }
        if robust:
            entry["robustness"] = robustness(model, tok, task, diff, limit or 50, seed, chat)
        return entry, r["items"]
    from lmlab.eval.code import evaluate_code, load_tasks

    tasks = load_tasks(spec[1])[:limit]
    log(f"eval: code ({len(tasks)} tasks)")
    r = evaluate_code(model, tok, tasks, n=5, k=(1, 5), seed=seed)
    metrics = {
        f"pass@{k}": {"value": r[f"pass@{k}"], "stderr": _finite(r[f"pass@{k}_se"])} for k in r["k"]
    }
    entry = {
        "name": "code",
        "n": r["num_tasks"],
        "output_type": "code",
        "results": metrics,
        "statuses": r["statuses"],
    }
    return entry, r["tasks"]


def calibration(records: list[dict], stem: Path) -> dict:
    """ECE / MCE / Brier of the chosen option's probability (softmax over the options'
    log-likelihoods) against correctness, and a reliability plot beside the results."""
    from lmlab.eval.calibration import (
        brier_score,
        expected_calibration_error,
        maximum_calibration_error,
        reliability_plot,
    )

    conf = [r["confidence"] for r in records]
    correct = [
        r["acc"] if "acc" in r else float(np.argmax(r["loglikelihoods"]) == r["gold"])
        for r in records
    ]
    png = stem.with_suffix(".png")
    reliability_plot(conf, correct, png)
    return {
        "ece": expected_calibration_error(conf, correct),
        "mce": maximum_calibration_error(conf, correct),
        "brier": brier_score(conf, correct),
        "plot": str(png),
    }


def _finite(x):
    return x if x is not None and x == x else None  # NaN (one item) is not valid JSON


def default_train_docs(model_path: Path) -> list[Path]:
    """A run directory's training documents, when MODEL is (inside) a run."""
    for root in (model_path, *model_path.parents[:3]):
        cand = root / "data" / "documents" / "train.jsonl"
        if cand.is_file():
            return [cand]
    return []


def evaluate(
    model_path: str | Path,
    tasks: list[str],
    out_dir: str | Path,
    limit: int | None = None,
    seed: int = 0,
    train_docs: list[str | Path] | None = None,
    ngram: int = 13,
    batch_size: int = 8,
    chat: bool = False,
    robustness: bool = False,
    self_consistency: int = 1,
    overwrite: bool = False,
    skip_unsandboxed: bool = False,
    owned: bool = False,
) -> dict:
    """Score the model at `model_path` on `tasks` into `out_dir` (results.json, samples/,
    calibration/). An existing `out_dir` is replaced only when it is an earlier `eval`
    output and `overwrite`; `owned` says the caller owns `out_dir` (a run's eval stage),
    which is then neither claimed nor marked as this command's. Code tasks need the
    sandbox: without it they are refused (UsageError), or skipped with a warning when
    `skip_unsandboxed` (a recipe's eval)."""
    from lmlab import load_model, load_tokenizer
    from lmlab.model.loading import resolve_checkpoint
    from lmlab.utils import claim_output_dir, mark_output

    if not tasks:
        raise UsageError("eval: name at least one task (--tasks FILE.yaml)")
    ckpt = resolve_checkpoint(model_path)
    specs = [parse_task(t) for t in tasks]  # all checked before any model time is spent
    specs = _sandbox_or_skip(specs, skip_unsandboxed)
    if not owned:
        claim_output_dir(out_dir, "eval", overwrite=overwrite)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    docs = [Path(p) for p in train_docs] if train_docs else default_train_docs(Path(model_path))
    out = Path(out_dir)
    config = {
        "model": str(ckpt),
        "tasks": [str(t) for t in tasks],
        "limit": limit,
        "seed": seed,
        "batch_size": batch_size,
        "train_docs": [str(d) for d in docs],
        "ngram": ngram,
        "chat": chat,
        "robustness": robustness,
        "self_consistency": self_consistency,
    }
    if out.is_dir() and any(out.iterdir()):  # an earlier output, claimed above: none of
        shutil.rmtree(out)  # its files may linger
    out.mkdir(parents=True, exist_ok=True)
    if not owned:
        mark_output(out, "eval")
    results: dict = {
        "config": config,
        "model_hash": hash_obj(hash_tree(ckpt)),
        "seed": seed,
        "tasks": {},
    }
    for spec in specs:
        if isinstance(spec, tuple):  # a built-in suite
            entry, records = run_builtin(
                spec, model, tok, limit, seed, chat, robustness, self_consistency
            )
            results["tasks"][entry["name"]] = entry
            write_jsonl(out / "samples" / f"{entry['name']}.jsonl", records)
            continue
        log(f"eval: {spec.name} ({spec.output_type})")
        res = run_task(model, tok, spec, limit=limit, seed=seed, batch_size=batch_size, chat=chat)
        ids = [f"{spec.name}:{i}" for i in range(len(res["records"]))]
        entry = {"n": res["n"], "output_type": spec.output_type, "results": res["results"]}
        if spec.output_type == "multiple_choice" and res["records"]:
            entry["calibration"] = calibration(res["records"], out / "calibration" / spec.name)
        if docs and spec.output_type != "loglikelihood_rolling":
            found = contaminated_items(
                [(i, item_text(r)) for i, r in zip(ids, res["records"], strict=True)],
                docs,
                ngram=ngram,
            )
            entry["contamination"] = {
                "contaminated": len(found),
                "items": found,
                "by_subset": {
                    m: split_by_contamination(res["records"], ids, found, m) for m in res["results"]
                },
            }
            for i, r in zip(ids, res["records"], strict=True):
                r["contaminated"] = i in found
        results["tasks"][spec.name] = entry
        write_jsonl(
            out / "samples" / f"{spec.name}.jsonl",
            ({"id": i, **r} for i, r in zip(ids, res["records"], strict=True)),
        )
    write_json(out / "results.json", results)
    return results


def _sandbox_or_skip(specs: list, skip: bool) -> list:
    """The specs to run: code tasks only where the sandbox can run them (never unsandboxed
    unasked); refused or, with `skip`, dropped with one line saying why and how."""
    if not any(isinstance(s, tuple) and s[0] == "code" for s in specs):
        return specs
    from lmlab.prompt.sandbox import resolve_isolation

    try:
        resolve_isolation()
    except UsageError as e:
        if not skip:
            raise
        warn(f"eval: code task skipped: {e}")
        return [s for s in specs if not (isinstance(s, tuple) and s[0] == "code")]
    return specs


def format_results(results: dict) -> str:
    """A markdown table: task, metric, value ± standard error (clean subset when known)."""
    lines = [
        "| task | metric | value | ± stderr | n | clean value (n) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in results["tasks"].items():
        for metric, d in entry["results"].items():
            se = "" if d.get("stderr") is None else f"{d['stderr']:.4f}"
            clean = ""
            sub = entry.get("contamination", {}).get("by_subset", {}).get(metric)
            if sub:
                clean = f"{sub['clean']['value']:.4f} ({sub['clean']['n']})"
            lines.append(
                f"| {name} | {metric} | {d['value']:.4f} | {se} | {entry['n']} | {clean} |"
            )
    for name, entry in results["tasks"].items():
        rob = entry.get("robustness")
        if rob:
            t = rob["templates"]
            drops = ", ".join(
                f"{r['name']} {r['drop']:+.3f} ± {r['drop_se']:.3f}"
                for r in rob["perturbations"]["perturbed"]
            )
            lines.append(
                f"\n{name}: spread over {len(QUESTION_TEMPLATES)} templates {t['spread']:.3f} "
                f"(std {t['std']:.3f}); drop under {drops}"
            )
    return "\n".join(lines)


def item_scores(records: list[dict], metric: str) -> list[float]:
    """Per-item values of a metric from a task's records (synthetic tasks: `correct`)."""
    key = metric if records and metric in records[0] else "correct"
    return [float(r[key]) for r in records]


def paired_comparison(dir_a: str | Path, dir_b: str | Path) -> dict:
    """B minus A on every task and metric both results hold, paired over the same items
    (paired t-test: mean difference, standard error, 95% interval, p-value)."""
    from lmlab.eval.stats import paired_t_test
    from lmlab.utils import read_json

    a, b = Path(dir_a), Path(dir_b)
    ra, rb = read_json(a / "results.json"), read_json(b / "results.json")
    out: dict = {}
    for task, entry in rb["tasks"].items():
        if task not in ra["tasks"]:
            continue
        rec_a = _read_records(a / "samples" / f"{task}.jsonl")
        rec_b = _read_records(b / "samples" / f"{task}.jsonl")
        if len(rec_a) != len(rec_b) or not rec_a:
            continue
        for metric in entry["results"]:
            try:
                sa, sb = item_scores(rec_a, metric), item_scores(rec_b, metric)
            except KeyError:
                continue  # corpus-level metrics (perplexity, pass@k) have no per-item pairs
            out.setdefault(task, {})[metric] = paired_t_test(sa, sb).to_dict()
    return out


def _read_records(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]

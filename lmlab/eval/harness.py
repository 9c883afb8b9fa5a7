"""`lmlab eval MODEL --tasks ...`: run evaluation tasks on one checkpoint and write
`results.json` (every metric with its standard error, the resolved configuration, the
model's hash and the seed) and `samples/<task>.jsonl` (one record per item).

A task is a YAML file in lm-evaluation-harness's shape (`lmlab.eval.tasks`). With
training documents given (`train_docs`, or the run's `data/documents/train.jsonl` when
MODEL is a run directory), each item is checked for contamination and every metric is
also reported on the clean items alone.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.eval.contamination import contaminated_items, split_by_contamination
from lmlab.eval.tasks import load_task, run_task
from lmlab.utils import hash_obj, hash_tree, write_json, write_jsonl


def item_text(rec: dict) -> str:
    """What of an item could have leaked: its prompt and its answer."""
    parts = [rec.get(k) for k in ("context", "prompt", "target")]
    if "choices" in rec and "gold" in rec:
        parts.append(rec["choices"][rec["gold"]])
    return "\n".join(str(p) for p in parts if p)


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
) -> dict:
    from lmlab import load_model, load_tokenizer
    from lmlab.model.checkpoint import resolve_checkpoint

    if not tasks:
        raise UsageError("eval: name at least one task (--tasks FILE.yaml)")
    ckpt = resolve_checkpoint(model_path)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    specs = []
    for t in tasks:
        if not Path(t).is_file():
            raise UsageError(f"eval: task {t!r} is not a task YAML file")
        specs.append(load_task(t))
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
    }
    results: dict = {
        "config": config,
        "model_hash": hash_obj(hash_tree(ckpt)),
        "seed": seed,
        "tasks": {},
    }
    for spec in specs:
        log(f"eval: {spec.name} ({spec.output_type})")
        res = run_task(model, tok, spec, limit=limit, seed=seed, batch_size=batch_size)
        ids = [f"{spec.name}:{i}" for i in range(len(res["records"]))]
        entry = {"n": res["n"], "output_type": spec.output_type, "results": res["results"]}
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
    return "\n".join(lines)

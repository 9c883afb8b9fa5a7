"""`report.md` and `report.html` for a run: loss curves, metric tables, timings, samples."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.render import Section, write_pages
from lmlab.train.metrics import read_metrics
from lmlab.utils import read_json


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot_losses(run_dir: Path, out_png: Path) -> bool:
    """Training and validation loss of pretraining (by tokens), SFT and alignment (by
    step; the alignment panel only when the run aligned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    def first(*paths: Path):
        return read_metrics(next((p for p in paths if p.is_file()), paths[0]))

    pre = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    sft = first(run_dir / "sft" / "metrics.jsonl", run_dir / "sft" / "instruct" / "metrics.jsonl")
    panels = [(pre, "tokens", "pre-training"), (sft, "step", "instruction tuning (SFT)")]
    for method in ("dpo", "grpo"):
        m = read_metrics(run_dir / "align" / method / "metrics.jsonl")
        if m.train or m.val:
            panels.append((m, "step", f"alignment ({method.upper()}, its own loss)"))
    if not any(m.train or m.val for m, _, _ in panels):
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (m, x_key, title) in zip(axes, panels, strict=True):
        tr = [(r[x_key], r["loss"]) for r in m.train]
        va = [(r[x_key], r["val_loss"]) for r in m.val]
        if tr:
            ax.plot(*zip(*tr, strict=True), label="train", lw=1.2)
        if va:
            ax.plot(*zip(*va, strict=True), "o-", label="validation", lw=1.5, ms=3)
        if x_key == "tokens":  # 1.2M, not 1200000 (long tick labels overlap)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.set_ylabel("cross-entropy (nats/token)" if "alignment" not in title else "loss")
        ax.grid(alpha=0.3)
        if tr or va:  # a stage that did not run (no SFT) has nothing to label
            ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def plot_schedule(run_dir: Path, out_png: Path) -> bool:
    """Pre-training's learning rate and throughput (tokens/s, MFU) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    rows = read_metrics(run_dir / "pretrain" / "metrics.jsonl").train
    if not rows:
        return False
    x = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(x, [r["lr"] for r in rows], lw=1.2)
    axes[0].set_title("learning rate")
    axes[0].set_ylabel("lr")
    axes[1].plot(x, [r.get("tokens_per_s", float("nan")) for r in rows], lw=1.2)
    axes[1].set_title("throughput")
    axes[1].set_ylabel("tokens/s")
    if any("mfu" in r for r in rows):
        twin = axes[1].twinx()
        twin.plot(x, [100 * r.get("mfu", float("nan")) for r in rows], lw=0.8, color="gray")
        twin.set_ylabel("MFU (%)", color="gray")
    for ax in axes:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(d: dict, key: str) -> str:
    return f"{d[key]:.3f} ± {d[key + '_se']:.3f}"


def build_sections(run_dir: Path) -> list[tuple[str, list[list[str]] | str]]:
    """Report content as (heading, table-rows or paragraph) pairs, shared by md and html."""
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else {}
    sections: list[tuple[str, list[list[str]] | str]] = []
    recipe = manifest.get("recipe", {})
    v = manifest.get("versions", {})
    sections.append(
        (
            "Run",
            [
                ["key", "value"],
                ["name", manifest.get("name", run_dir.name)],
                ["created", manifest.get("created", "")],
                ["seed", str(manifest.get("seed", ""))],
                [
                    "lmlab / torch / python",
                    f"{v.get('lmlab')} / {v.get('torch')} / {v.get('python')}",
                ],
                ["git commit", str(manifest.get("git_commit"))],
            ],
        )
    )
    stats_path = run_dir / "data" / "stats.json"
    if stats_path.is_file():
        st = read_json(stats_path)
        rows = [["step", "documents"], ["read", str(st["read"]["documents"])]]
        sampled = sum(s.get("sampled_out", 0) for s in st.get("sources", {}).values())
        if sampled:
            rows.append(["not sampled (source weight < 1)", str(sampled)])
        rows += [
            [f"removed: {step['name']}:{rule}", str(n)]
            for step in st["steps"]
            for rule, n in step["dropped"].items()
            if n
        ]
        rows += [[f"PII replaced: {k}", str(n)] for k, n in st.get("pii", {}).items()]
        rows += [
            ["kept: train", str(st["kept"]["train"]["documents"])],
            ["kept: validation", str(st["kept"]["val"]["documents"])],
        ]
        rows.append(["data card", "data/card.html"])
        sections.append(("Data", rows))
    stages = manifest.get("stages", {})
    if stages:
        rows = [["stage", "status", "seconds"]]
        rows += [
            [s, r.get("status", ""), _fmt(r.get("seconds", 0.0), 1)]
            for s, r in stages.items()
            if r.get("status") != "running"  # the report stage itself, while it renders
        ]
        sections.append(("Stage timings", rows))
    summ = stages.get("pretrain", {}).get("summary", {})
    if "base_model" in summ:  # pre-training skipped: the run starts from a real model
        arch = summ.get("architecture", {})
        shape = " × ".join(str(arch.get(k)) for k in ("n_layers", "d_model", "n_heads"))
        sections.append(
            (
                "Base model (pre-training skipped)",
                [
                    ["", "value"],
                    ["model", str(summ["base_model"])],
                    ["parameters", f"{summ.get('parameters', 0):,}"],
                    ["layers × width × heads", shape],
                ],
            )
        )
    elif summ:
        m = recipe.get("model", {})
        sections.append(
            (
                "Pre-training",
                [
                    ["", "value"],
                    ["parameters", f"{summ.get('parameters', 0):,}"],
                    [
                        "layers × width × heads",
                        f"{m.get('n_layers')} × {m.get('d_model')} × {m.get('n_heads')}",
                    ],
                    *_architecture_rows(m),
                    ["steps", str(summ.get("steps"))],
                    ["tokens", f"{summ.get('tokens', 0):,}"],
                    ["tokens/s", _fmt(summ.get("tokens_per_s"), 0)],
                    ["final validation loss", _fmt(summ.get("final_val_loss"))],
                ],
            )
        )
    res_path = run_dir / "eval" / "results.json"
    if res_path.is_file():
        res = read_json(res_path)
        rows = [["model", "val loss (nats/token)", "perplexity", "bits per byte", "tokens"]]
        for name, d in res["lm"].items():
            rows.append(
                [
                    name,
                    _fmt(d["loss"]),
                    _fmt(d["perplexity"], 2),
                    _fmt(d["bits_per_byte"]),
                    f"{d['tokens']:,}",
                ]
            )
        sections.append(("Language modelling on the validation split", rows))
        qa = res.get("qa", {})
        if "base" in qa:
            rows = [["model", "prompting", "n", "exact match", "ROUGE-L"]]
            for name in ("base", "sft", "aligned"):
                if name not in qa:
                    continue
                d = qa[name]
                prompting = (
                    f"{len(qa.get('shots', []))}-shot" if name == "base" else "chat template"
                )
                rows.append(
                    [name, prompting, str(d["n"]), _pm(d, "exact_match"), _pm(d, "rouge_l")]
                )
            sections.append(("Held-out questions (modules never seen in SFT)", rows))
            dr = qa["sft_minus_base_rouge_l"]
            verdict = (
                "The SFT model beats the base model on ROUGE-L by more than two standard errors."
                if dr["mean"] > 2 * dr["se"]
                else "The SFT model does not beat the base model on ROUGE-L by more than two "
                "standard errors."
            )
            text = (
                f"Paired difference (SFT − base) in ROUGE-L: "
                f"{dr['mean']:+.3f} ± {dr['se']:.3f} (standard error over the same "
                f"items). {verdict}"
            )
            da = qa.get("aligned_minus_sft_rouge_l")
            if da:
                text += (
                    f" Aligned − SFT: {da['mean']:+.3f} ± {da['se']:.3f} (the alignment tax "
                    "on these questions, where negative)."
                )
            sections.append(("Verdict", text))
    sections += align_sections(stages.get("align", {}).get("summary", {}))
    sections += task_sections(run_dir)
    samples = _read_jsonl(run_dir / "eval" / "samples.jsonl")[:8]
    if samples:
        aligned = "aligned_prediction" in samples[0]
        rows = [["question", "reference", "base (few-shot)", "SFT", *(["aligned"] * aligned)]]
        rows += [
            [
                s["question"],
                s["reference"],
                s["base_prediction"],
                s["sft_prediction"],
                *([s["aligned_prediction"]] if aligned else []),
            ]
            for s in samples
        ]
        sections.append(("Sample answers", rows))
    return sections


def write_report(run_dir: str | Path) -> list[Path]:
    """Render `report.md` and `report.html` in the run directory; returns their paths."""
    run_dir = Path(run_dir)
    png = run_dir / "report" / "loss.png"
    plots: list[Section] = [("Loss curves", png)] if plot_losses(run_dir, png) else []
    sched = run_dir / "report" / "schedule.png"
    if plot_schedule(run_dir, sched):
        plots.append(("Learning rate and throughput", sched))
    title = f"lmlab run report: {run_dir.name}"
    return write_pages(run_dir, "report", title, plots + build_sections(run_dir))


def _architecture_rows(model: dict) -> list[list[str]]:
    """The architecture choices in words (preset, norms, positions, ...), when readable."""
    from lmlab.errors import UsageError
    from lmlab.model.config import ModelConfig

    try:
        desc = ModelConfig.from_dict(model).describe()
    except (UsageError, TypeError):
        return []
    keep = ("preset", "family", "normalization", "positions", "attention", "feed-forward")
    return [[k, desc[k]] for k in keep]


def align_sections(summ: dict) -> list:
    """The align stage: its method and the held-out accuracy before and after, paired."""
    if not summ or summ.get("method", "none") == "none":
        return []
    rows = [["", "value"], ["method", summ["method"]]]
    if "pairs" in summ:
        rows.append(["training pairs", str(summ["pairs"])])
    rows += [
        ["steps", str(summ.get("steps"))],
        ["final validation loss", _fmt(summ.get("final_val_loss"))],
    ]
    if summ.get("heldout_items"):
        rows += [
            ["held-out items (greedy, exact answer)", str(summ["heldout_items"])],
            ["accuracy of the SFT model", _fmt(summ["heldout_before"], 3)],
            ["accuracy of the aligned model", _fmt(summ["heldout_after"], 3)],
            [
                "aligned − SFT (paired SE)",
                f"{summ['heldout_diff']:+.3f} ± {summ['heldout_diff_se']:.3f}",
            ],
        ]
    return [("Alignment", rows)]


def task_sections(run_dir: Path) -> list:
    """The evaluation tasks of every model: value ± standard error, the paired SFT − base
    (and aligned − SFT) differences, calibration plots and a few generations."""
    task_dir = run_dir / "eval" / "tasks"
    base, sft = task_dir / "base" / "results.json", task_dir / "sft" / "results.json"
    if not (base.is_file() and sft.is_file()):
        return []
    rb, rs = read_json(base), read_json(sft)
    aligned = task_dir / "aligned" / "results.json"
    ra = read_json(aligned) if aligned.is_file() else None
    res = read_json(run_dir / "eval" / "results.json")
    paired = res.get("tasks", {})
    paired_a = res.get("tasks_aligned_minus_sft", {})
    head = ["task", "metric", "n", "base", "SFT", "SFT − base (paired)", "p"]
    if ra is not None:
        head += ["aligned", "aligned − SFT (paired)", "p"]
    rows = [head]

    def diff_cells(d: dict) -> list[str]:
        return [
            _value_se({"value": d.get("diff"), "stderr": d.get("stderr")}),
            _fmt(d.get("p_value"), 3) if d.get("p_value") is not None else "",
        ]

    for task, entry in rs["tasks"].items():
        for metric, d in entry["results"].items():
            b = rb["tasks"].get(task, {}).get("results", {}).get(metric, {})
            row = [task, metric, str(entry["n"]), _value_se(b), _value_se(d)]
            row += diff_cells(paired.get(task, {}).get(metric, {}))
            if ra is not None:
                a = ra["tasks"].get(task, {}).get("results", {}).get(metric, {})
                row += [_value_se(a), *diff_cells(paired_a.get(task, {}).get(metric, {}))]
            rows.append(row)
    out: list = [("Evaluation tasks (± standard error)", rows)]
    for png in sorted(task_dir.glob("*/calibration/*.png")):
        out.append((f"Calibration: {png.parent.parent.name} model, {png.stem}", png))
    examples = [["task", "model", "generation (end)", "correct"]]
    for name in ("base", "sft", "aligned"):
        for path in sorted((task_dir / name / "samples").glob("synthetic_*.jsonl"))[:2]:
            for rec in _read_jsonl(path)[:2]:
                gen = (rec.get("generations") or [""])[0]
                examples.append([path.stem, name, gen[-160:], str(rec.get("correct"))])
    if len(examples) > 1:
        out.append(("Sample generations on the reasoning tasks", examples))
    return out


def _value_se(d: dict) -> str:
    if not d or d.get("value") is None:
        return ""
    se = d.get("stderr")
    return f"{d['value']:.3f}" + (f" ± {se:.3f}" if se is not None else "")

"""The scaling sweep's report: `scaling.md`, `scaling.html` (lmlab.render), `scaling.json`,
the plots in `plots/`, and the summary table printed at the end of `lmlab scaling run|fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import UsageError
from lmlab.run.rundir import read_manifest
from lmlab.run.scaling_points import (
    ASPECT,
    MIN_STEPS,
    VAL_TOKENS,
    WARMUP_SHARE,
    WIDTH_STEP,
    fmt_count,
)
from lmlab.utils import read_json, write_json

RELATIVE_ERROR_GOAL = 0.05  # a prediction within this relative error of the actual loss


def outcome(target: dict | None, prediction: dict | None) -> dict[str, Any]:
    """Predicted against actual for the target, per form."""
    if not target or not prediction or prediction["target"]["label"] != target["label"]:
        return {}
    out = {}
    for form, p in prediction["predicted_loss"].items():
        rel = p / target["loss"] - 1
        out[form] = {
            "predicted": p,
            "actual": target["loss"],
            "relative_error": rel,
            "within_goal": abs(rel) <= RELATIVE_ERROR_GOAL,
        }
    return out


def print_summary(records, target, fits, prediction, wall: float | None) -> None:
    from rich.table import Table

    from lmlab.console import console, is_quiet
    from lmlab.train.scaling import predict

    table = Table(title="scaling sweep")
    for col in ("point", "N", "D", "C = 6ND", "val loss", "chinchilla", "kaplan", "seconds"):
        table.add_column(col)
    rows = [*records, *([target] if target else [])]
    for r in rows:
        table.add_row(
            r["label"] + (" (target)" if r["role"] == "target" else ""),
            fmt_count(r["n"]),
            fmt_count(r["d"]),
            f"{r['flops_6nd']:.2e}",
            f"{r['loss']:.4f}",
            *(f"{predict(fits[f], r['n'], r['d']):.4f}" for f in ("chinchilla", "kaplan")),
            f"{r['seconds']:.0f}",
        )
    if not is_quiet():
        console.print(table)
    res = outcome(target, prediction)
    for form, o in res.items():
        print(
            f"{form}: predicted {o['predicted']:.4f}, actual {o['actual']:.4f}, "
            f"relative error {100 * o['relative_error']:+.2f}%"
        )
    if wall is not None:
        print(f"wall clock: {wall / 60:.1f} min")


def write_report(run_dir: Path, records, target, fits, prediction) -> list[Path]:
    """`scaling.md`, `scaling.html` (lmlab.render) and `scaling.json`, plots in `plots/`."""
    from lmlab.render import Section, write_pages
    from lmlab.train.scaling import compute_optimal, predict

    spec = read_json(run_dir / "sweep.json")
    manifest = read_manifest(run_dir)
    res = outcome(target, prediction)
    plots = plot_sweep(run_dir, records, target, fits, prediction)
    recipe = manifest.get("recipe", {})
    pre = recipe.get("pretrain", {})
    tok = manifest.get("stages", {}).get("tokenizer", {}).get("summary", {})
    data_text = f"{run_dir.name}/tokenizer/tokens"
    if tok.get("tokens"):
        data_text += (
            f": {tok['tokens']['train']:,} training and {tok['tokens']['val']:,} validation "
            f"tokens, vocabulary {tok['vocab_size']}"
        )
    setup = [
        ["", "value"],
        [
            "recipe",
            f"{spec['recipe']}" + (f" with --set {' '.join(spec['sets'])}" if spec["sets"] else ""),
        ],
        ["data", data_text],
        [
            "grid",
            f"sizes {', '.join(map(fmt_count, spec['sizes']))} × budgets "
            f"{', '.join(map(fmt_count, spec['tokens']))} tokens",
        ],
        [
            "target",
            f"{fmt_count(spec['target']['size'])} parameters × "
            f"{fmt_count(spec['target']['tokens'])} tokens",
        ],
        [
            "model",
            f"the recipe's architecture (preset {recipe.get('model', {}).get('preset') or '-'}),"
            f" resized: depth from N (width ≈ {ASPECT} × layers), widths in steps of "
            f"{WIDTH_STEP}",
        ],
        ["N", "non-embedding parameters (Kaplan et al.)"],
        ["C", "6·N·D FLOPs"],
        [
            "training",
            f"batch {records[0]['batch_size']} × {records[0]['seq_len']} (at least {MIN_STEPS} "
            f"steps per point), peak lr {pre.get('lr')}, "
            f"warm-up min({pre.get('warmup_steps')} steps, {WARMUP_SHARE:.0%}), cosine to "
            f"{pre.get('min_lr_ratio')}× at each point's own budget, loss spikes logged but "
            f"not rolled back, seed {recipe.get('seed')}",
        ],
        ["loss", f"the final model's loss on the first {VAL_TOKENS:,} validation tokens (fp32)"],
        ["fit", "Huber (δ=1e-3) on log loss, from a grid of starts (Hoffmann et al. Approach 3)"],
    ]
    grid = [["point", "N", "layers × width", "D", "steps", "C = 6ND", "val loss",
             "Chinchilla fit", "Kaplan fit", "seconds"]]  # fmt: skip
    for r in [*records, *([target] if target else [])]:
        grid.append(
            [
                r["label"] + (" (target)" if r["role"] == "target" else ""),
                f"{r['n']:,}",
                f"{r['layers']} × {r['width']}",
                f"{r['d']:,}",
                str(r["steps"]),
                f"{r['flops_6nd']:.3g}",
                f"{r['loss']:.4f}",
                *(f"{predict(fits[f], r['n'], r['d']):.4f}" for f in ("chinchilla", "kaplan")),
                f"{r['seconds']:.0f}",
            ]
        )
    fit_rows = [["form", "parameters", "RMSE (nats)", "max |rel. error|", "R²"]]
    for form, fit in fits.items():
        fit_rows.append(
            [
                form,
                ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items()),
                f"{fit.rmse:.4f}",
                f"{100 * fit.max_abs_rel_error:.2f}%",
                f"{fit.r2:.4f}" if fit.r2 is not None else "-",
            ]
        )
    pred_rows = [
        ["form", "predicted", "actual", "relative error", f"within {RELATIVE_ERROR_GOAL:.0%}"]
    ]
    for form, o in res.items():
        pred_rows.append(
            [
                form,
                f"{o['predicted']:.4f}",
                f"{o['actual']:.4f}",
                f"{100 * o['relative_error']:+.2f}%",
                "yes" if o["within_goal"] else "no",
            ]
        )
    when = prediction_text(prediction, target)
    budgets = sorted({r["flops_6nd"] for r in records})
    opt_rows = [["C (FLOPs)", "form", "N_opt", "D_opt", "tokens / parameter", "predicted loss"]]
    optimal = []
    for c in [budgets[-1], *([target["flops_6nd"]] if target else [])]:
        for form, fit in fits.items():
            try:
                o = compute_optimal(fit, c)
            except UsageError:
                continue
            optimal.append(o)
            opt_rows.append(
                [
                    f"{c:.3g}",
                    form,
                    fmt_count(o["n_opt"]),
                    fmt_count(o["d_opt"]),
                    f"{o['tokens_per_parameter']:.1f}",
                    f"{o['loss']:.4f}",
                ]
            )
    sections: list[Section] = [
        ("Setup", setup),
        ("Grid", grid),
        ("Fits", fit_rows),
        ("Prediction", when),
    ]
    if len(pred_rows) > 1:
        sections.append(("Predicted vs actual", pred_rows))
    sections += [
        ("Compute-optimal allocation under each fit", opt_rows),
        ("Loss against tokens, per size", plots["data"]),
        ("Loss against compute", plots["compute"]),
        ("Predicted against actual", plots["parity"]),
    ]
    title = f"lmlab scaling sweep: {run_dir.name}"
    paths = write_pages(run_dir, "scaling", title, sections)
    result = {
        "name": run_dir.name,
        "sweep": spec,
        "definitions": {"N": "non-embedding parameters", "C": "6*N*D", "loss": "validation"},
        "points": records,
        "target": target,
        "fits": {f: fit.to_dict() for f, fit in fits.items()},
        "prediction": prediction,
        "outcome": res,
        "compute_optimal": optimal,
    }
    json_path = run_dir / "scaling.json"
    write_json(json_path, result)
    return [*paths, json_path]


def prediction_text(prediction: dict | None, target: dict | None) -> str:
    if not prediction:
        return "No prediction yet: the grid has not finished."
    p = prediction
    words = ", ".join(f"{f} {v:.4f}" for f, v in p["predicted_loss"].items())
    text = (
        f"Predicted validation loss of the target {p['target']['label']} "
        f"(N={p['target']['n']:,}, D={p['target']['d']:,}): {words}; written to "
        f"prediction.json at {p['written']}"
    )
    if p.get("written_after_target_trained"):
        return text + ", AFTER the target had trained (the grid changed since): not a blind test."
    if target:
        text += f", before the target's training started at {target['started']}"
    return text + "."


def plot_sweep(run_dir: Path, records, target, fits, prediction) -> dict[str, Path]:
    """Loss against D per size with both fits, loss against compute with the frontier,
    and predicted against actual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter

    from lmlab.train.scaling import frontier, predict

    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r["n"] for r in records})
    all_rows = [*records, *([target] if target else [])]
    d_lo = min(r["d"] for r in all_rows) / 1.5
    d_hi = max(r["d"] for r in all_rows) * 1.5
    ds = np.geomspace(d_lo, d_hi, 100)
    styles = {"chinchilla": "-", "kaplan": "--"}
    paths = {}

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ns = [*sizes, *([target["n"]] if target and target["n"] not in sizes else [])]
    for i, n in enumerate(ns):
        color = f"C{i % 10}"
        pts = [r for r in records if r["n"] == n]
        if pts:
            ax.plot([r["d"] for r in pts], [r["loss"] for r in pts], "o", color=color,
                    label=f"N={fmt_count(n)}")  # fmt: skip
        for form, fit in fits.items():
            label = f"N={fmt_count(n)} (target)" if not pts and form == "chinchilla" else None
            ax.plot(
                ds, predict(fit, n, ds), styles[form], color=color, lw=1, alpha=0.8, label=label
            )
    if target:
        ax.plot(target["d"], target["loss"], "*", ms=14, color="k", label="target (actual)")
        if prediction:
            for form, v in prediction["predicted_loss"].items():
                ax.plot(target["d"], v, "x" if form == "chinchilla" else "+", ms=10, color="k",
                        label=f"target ({form}, predicted)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs D per size: Chinchilla fit (solid), Kaplan fit (dashed)")
    _finish(ax, EngFormatter)
    paths["data"] = _save(fig, out / "loss_vs_tokens.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, n in enumerate(sizes):
        pts = [r for r in records if r["n"] == n]
        ax.plot([r["flops_6nd"] for r in pts], [r["loss"] for r in pts], "o-", color=f"C{i % 10}",
                lw=0.8, label=f"N={fmt_count(n)}")  # fmt: skip
    cs = np.geomspace(
        min(r["flops_6nd"] for r in all_rows) / 2, max(r["flops_6nd"] for r in all_rows) * 2, 60
    )
    for form, fit in fits.items():
        try:
            _, loss = frontier(fit, cs)
        except UsageError:
            continue
        ax.plot(cs, loss, styles[form], color="k", lw=1.2, label=f"{form} frontier")
    if target:
        ax.plot(target["flops_6nd"], target["loss"], "*", ms=14, color="k", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6·N·D (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs compute, with each fit's compute-optimal frontier")
    _finish(ax, EngFormatter)
    paths["compute"] = _save(fig, out / "loss_vs_compute.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    actual = [r["loss"] for r in records]
    for form, fit in fits.items():
        pred = predict(fit, [r["n"] for r in records], [r["d"] for r in records])
        marker = "o" if form == "chinchilla" else "s"
        ax.plot(actual, pred, marker, mfc="none", label=f"grid, {form} fit")
    if target and prediction:
        for form, v in prediction["predicted_loss"].items():
            ax.plot(target["loss"], v, "*", ms=14, label=f"target, {form} (predicted first)")
    lo = min(actual + ([target["loss"]] if target else [])) - 0.05
    hi = max(actual) + 0.05
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    for s in (1 + RELATIVE_ERROR_GOAL, 1 - RELATIVE_ERROR_GOAL):
        ax.plot([lo, hi], [lo * s, hi * s], "k:", lw=0.6)
    ax.set_xlabel("actual validation loss")
    ax.set_ylabel("predicted validation loss")
    ax.set_title(f"predicted vs actual (dotted: ±{RELATIVE_ERROR_GOAL:.0%})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths["parity"] = _save(fig, out / "predicted_vs_actual.png")
    return paths


def _finish(ax, formatter) -> None:
    ax.xaxis.set_major_formatter(formatter(sep=""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

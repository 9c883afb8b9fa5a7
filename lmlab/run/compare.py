"""Controlled architecture comparisons: one recipe, several model variants, one budget.

A recipe with `variants` (name -> model overrides) pre-trains every variant on the same
token shards, with the same seed (so the same initialisation stream and the same batches
in the same order) and the same token budget, each under `compare/<variant>/`, then
writes `compare.md`, `compare.html` and `compare.json` beside the run's other files.
The point is Zhao et al. §4.2.4: the survey recommends pre-RMSNorm, SwiGLU/GeGLU and
RoPE/ALiBi; the report says, from the numbers, whether that holds at the recipe's scale.

Noise. Every variant is scored on the same validation windows, so two variants are
compared by the paired difference of their per-window losses; its standard error (SE)
says how much of a difference the choice of windows alone could make. A difference is
called a tie when it is below max(0.01 nats, 2 SE). Seed-to-seed variation is *not*
covered by that SE (one seed per variant); docs/benchmarks.md measures it for the
shipped recipe.

Loss spikes. A logged training loss is a spike when it exceeds the mean of the previous
`SPIKE_WINDOW` logged losses by more than `SPIKE_K` of their standard deviations *and* by
more than `SPIKE_MIN_RISE` nats (so a very smooth stretch does not make ordinary batch
noise a spike); consecutive spiking steps count as one spike. Every variant sees the same
batches, so a spike that all variants share is a hard batch, not an instability; the
report counts a variant's spikes and how many of them no other variant has at that step.
Those are read off the logged curve after training. Separately, the training loop's own
detector (`pretrain.spike_zscore`) may have caught a spike while training and rolled back
or skipped batches; the report lists those events per variant (count, steps, rollbacks),
because a variant that skipped batches no longer trained on the same data as the others.
An unstable configuration can also fail without a spike, by stalling on a plateau; the
verdict says so when a variant's validation loss fell less than a quarter of what the
other's fell after the first evaluation.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmlab.console import log
from lmlab.data.shards import open_split
from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig
from lmlab.model.loading import load_model
from lmlab.model.precision import resolve_precision
from lmlab.model.scoring import score, stream_windows
from lmlab.render import Section, write_pages
from lmlab.run.rundir import Run, cached_record, mark_done, start_dir
from lmlab.train.metrics import read_metrics, spike_summary
from lmlab.train.pretrain import pretrain
from lmlab.utils import hash_obj, read_json, write_json

SPIKE_WINDOW = 20  # logged steps in the running mean / standard deviation
SPIKE_K = 4.0  # standard deviations above the running mean
SPIKE_MIN_RISE = 0.1  # nats above the running mean, at least
TIE_NATS = 0.01  # smaller differences in validation loss are ties whatever the SE
# a variant "stalled" when its validation loss fell less than this share of what the other
# variant's fell after the first evaluation (and the other's fell at least STALL_MIN_DROP)
STALL_SHARE = 0.25
STALL_MIN_DROP = 0.1
# fields that follow from another choice (the FFN width from the activation) or only
# label a config: two variants differing only in these and one choice compare that choice
DERIVED = {"ffn_hidden", "preset", "head_dim", "n_kv_heads"}


@dataclass(frozen=True)
class Claim:
    """A recommendation of the survey: on `field`, values in `better` beat those in `worse`."""

    field: str
    title: str
    better: tuple[str, ...]
    worse: tuple[str, ...]


CLAIMS = [
    Claim("norm_position", "pre-LN vs post-LN", ("pre",), ("post",)),
    Claim("norm", "RMSNorm vs LayerNorm", ("rmsnorm",), ("layernorm",)),
    Claim("position", "RoPE/ALiBi vs learned", ("rope", "alibi"), ("learned", "sinusoidal")),
    Claim(
        "activation",
        "SwiGLU/GeGLU vs GeLU",
        ("swiglu", "geglu", "geglu_tanh"),
        ("gelu", "gelu_tanh", "relu", "silu"),
    ),
]


# --- running the variants -------------------------------------------------------------


def run_comparison(
    run: Run,
    tokenizer_hash: str,
    redo: bool = False,
    record: Callable[[dict], None] | None = None,
) -> list[Path]:
    """Pre-train every variant of `run.recipe` (cached or resumed), then write the report.

    `tokenizer_hash` (the tokenizer stage's output hash) is part of each variant's cache
    key, so new shards retrain every variant; `record` receives the manifest entry after
    each variant."""
    recipe = run.recipe
    record = record or (lambda entry: None)
    seq_len = recipe.pretrain.seq_len
    if len(open_split(run.stage_dir("tokenizer") / "tokens", "val")) < seq_len + 1:
        raise UsageError(
            f"compare: the validation split has fewer than {seq_len + 1} tokens, so no "
            "window can be scored; raise data.val_fraction"
        )
    tok = Tokenizer.from_file(str(run.stage_dir("tokenizer") / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    models = {
        name: ModelConfig.from_dict({**m.to_dict(), "vocab_size": vocab})
        for name, m in recipe.variant_models().items()
    }
    pre = recipe.resolved()["pretrain"]
    entry: dict[str, Any] = {"status": "running", "variants": {}}
    t_all = time.monotonic()
    for i, (name, mcfg) in enumerate(models.items(), 1):
        vdir = run.dir / "compare" / name
        key = hash_obj(
            {
                "model": mcfg.to_dict(),
                "pretrain": pre,
                "seed": recipe.seed,
                "tokenizer": tokenizer_hash,
                "format": 1,
            }
        )
        done = cached_record(vdir, key, redo)
        if done:
            log(f"[dim]compare {name}: cached ({done['record']['seconds']:.1f}s when run)[/dim]")
            entry["variants"][name] = {**done["record"], "status": "cached"}
            record(entry)
            continue
        start_dir(vdir, key, redo)
        log(
            f"[bold cyan]compare {name}[/bold cyan] ({i}/{len(models)}): "
            f"{describe_change(recipe.variants[name])}, {mcfg.num_params():,} parameters, "
            f"precision {resolve_precision(recipe.pretrain.precision)}"
        )
        entry["variants"][name] = {"status": "running", "key": key}
        record(entry)
        t0 = time.monotonic()
        try:
            summary = pretrain(
                mcfg,
                recipe.pretrain,
                shard_dir=run.stage_dir("tokenizer") / "tokens",
                tokenizer_dir=run.stage_dir("tokenizer"),
                out_dir=vdir,
                seed=recipe.seed,
                key=key,
            )
        except KeyboardInterrupt:  # the checkpoint is saved; a rerun resumes this variant
            entry["variants"][name]["status"] = "interrupted"
            record(entry)
            raise
        write_json(vdir / "val_windows.json", window_losses(vdir / "model", run))
        rec = {
            "key": key,
            "seconds": round(time.monotonic() - t0, 2),
            "summary": {k: v for k, v in summary.items() if k != "config"},
        }
        mark_done(vdir, key, rec)
        entry["variants"][name] = {**rec, "status": "done"}
        record(entry)
        log(
            f"compare {name}: done in {rec['seconds']:.1f}s, "
            f"val loss {summary['final_val_loss']:.4f}"
        )
    paths = write_comparison(run, models)
    entry.update(status="done", seconds=round(time.monotonic() - t_all, 2))
    entry["files"] = [p.name for p in paths]
    record(entry)
    log(f"comparison: {paths[1]}  (markdown: {paths[0]})")
    return paths


def window_losses(model_dir: Path, run: Run) -> list[float]:
    """Mean loss of the final model on each validation window (the pretrain loop's set:
    the first `batch_size` × `eval_batches` non-overlapping windows of `seq_len` + 1).

    Their mean is the final validation loss; per window they pair two variants up."""
    cfg = run.recipe.pretrain
    val = open_split(run.stage_dir("tokenizer") / "tokens", "val")
    windows = stream_windows(val, cfg.seq_len + 1, limit=cfg.batch_size * cfg.eval_batches)
    s = score(load_model(model_dir), windows, cfg.batch_size, cfg.precision, per_row=True)
    return [round(v, 6) for v in s.row_means()]


# --- statistics -----------------------------------------------------------------------


def find_spikes(
    losses: list[float],
    window: int = SPIKE_WINDOW,
    k: float = SPIKE_K,
    min_rise: float = SPIKE_MIN_RISE,
) -> list[int]:
    """Indices where a loss spike starts (the rule in the module docstring)."""
    x = np.asarray(losses, dtype=float)
    starts: list[int] = []
    previous = False
    for i in range(window, len(x)):
        past = x[i - window : i]
        rise = x[i] - past.mean()
        spike = bool(rise > k * past.std() and rise > min_rise)
        if spike and not previous:
            starts.append(i)
        previous = spike
    return starts


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of the mean of the per-window differences a - b."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def variant_stats(vdir: Path, mcfg: ModelConfig, grad_clip: float) -> dict[str, Any]:
    """The table row of one variant, read from its `metrics.jsonl` and `summary.json`."""
    m = read_metrics(vdir / "metrics.jsonl")
    train, val = m.train, m.val
    summary = read_json(vdir / "summary.json")
    gn = np.array([r["grad_norm"] for r in train], dtype=float)
    spikes = find_spikes([r["loss"] for r in train])
    return {
        "parameters": mcfg.num_params(),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "seconds": summary["seconds"],
        "final_val_loss": round(summary["final_val_loss"], 5),
        "best_val_loss": min(r["val_loss"] for r in val),
        "first_val": {"step": val[0]["step"], "val_loss": val[0]["val_loss"]},
        "spike_steps": [train[i]["step"] for i in spikes],
        "spike_events": spike_summary(m),
        "grad_norm_median": round(float(np.median(gn)), 4),
        "grad_norm_max": round(float(gn.max()), 4),
        "clipped_share": round(float((gn > grad_clip).mean()), 4) if grad_clip > 0 else 0.0,
        "tokens_per_s": round(float(np.median([r["tokens_per_s"] for r in train[1:] or train]))),
    }


def changed_fields(a: ModelConfig, b: ModelConfig) -> set[str]:
    da, db = a.to_dict(), b.to_dict()
    return {k for k in da if da[k] != db[k]} - DERIVED


def describe_change(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in overrides.items()) or "the recipe's model"


def comparisons(
    models: dict[str, ModelConfig], stats: dict[str, dict], windows: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """Every pair of variants that differ in exactly one choice the survey has a view on."""
    out = []
    distinct: list[str] = []  # a replicate of an earlier variant adds no comparison
    for n, m in models.items():
        if all(m != models[d] for d in distinct):
            distinct.append(n)
    for x, y in itertools.combinations(distinct, 2):
        changed = changed_fields(models[x], models[y])
        claim = next((c for c in CLAIMS if changed == {c.field}), None)
        if claim is None:
            continue
        vx, vy = getattr(models[x], claim.field), getattr(models[y], claim.field)
        known = claim.better + claim.worse
        if vx not in known or vy not in known:
            continue
        if (vx in claim.better) == (vy in claim.better):  # e.g. RoPE vs ALiBi: no preference
            better, worse, preferred = x, y, False
        else:
            better, worse = (x, y) if vx in claim.better else (y, x)
            preferred = True
        delta = stats[worse]["final_val_loss"] - stats[better]["final_val_loss"]
        se = paired_se(windows[worse], windows[better])
        tol = TIE_NATS if math.isnan(se) else max(TIE_NATS, 2 * se)
        if abs(delta) <= tol:
            outcome = "tie"
        elif not preferred:
            outcome = f"{_pretty(vx if delta > 0 else vy)} lower"
        else:
            outcome = "held" if delta > 0 else "reversed"
        out.append(
            {
                "claim": claim.title,
                "field": claim.field,
                "recommended": better if preferred else None,
                "other": worse if preferred else None,
                "pair": [better, worse],
                "values": [
                    getattr(models[better], claim.field),
                    getattr(models[worse], claim.field),
                ],
                "delta": round(delta, 5),
                "se": round(se, 5),
                "tolerance": round(tol, 5),
                "outcome": outcome,
            }
        )
    return out


def verdict(comps: list[dict[str, Any]], stats: dict[str, dict]) -> str:
    """The paragraph that answers the issue: did the survey's recommendations reproduce?"""
    if not comps:
        return (
            "No two variants differ in exactly one of the choices the survey recommends on "
            "(normalization and its position, position encoding, activation), so there is no "
            "recommendation to check."
        )
    first = next(iter(stats.values()))
    params = [s["parameters"] for s in stats.values()]
    lo, hi = f"{min(params) / 1e6:.2f}M", f"{max(params) / 1e6:.2f}M"
    size = (lo if lo == hi else f"{lo}–{hi}") + " parameters"
    checked = [c for c in comps if c["recommended"]]
    held = sum(c["outcome"] == "held" for c in checked)
    ties = sum(c["outcome"] == "tie" for c in checked)
    rev = sum(c["outcome"] == "reversed" for c in checked)
    parts = [
        f"At this scale ({size}, {first['tokens']:,} training tokens each, one seed), "
        f"{held} of {len(checked)} recommendation checks held, {ties} "
        f"{'was a tie' if ties == 1 else 'were ties'} and {rev} reversed."
    ]
    for c in comps:
        b, w = c["pair"]
        sb, sw = stats[b], stats[w]
        noise = f"SE {c['se']:.4f}, tie below {c['tolerance']:.3f}"
        if not c["recommended"]:
            parts.append(
                f"{_pretty(c['values'][0])} vs {_pretty(c['values'][1])} (the survey prefers "
                f"neither): {c['outcome']} — {w} {c['delta']:+.4f} nats vs {b} ({noise})."
            )
            continue
        stalls = [
            f"{n} stalled: {t}" for n, m in ((w, b), (b, w)) if (t := _stall(stats[n], stats[m]))
        ]
        caught = [
            f"{n} did not train on the same batches (the training loop caught a loss spike: "
            f"{events_text(stats[n]['spike_events'])})"
            for n in (w, b)
            if stats[n]["spike_events"]["count"]
        ]
        parts.append(
            f"{c['claim']}: {c['outcome']} — {w} {c['delta']:+.4f} nats vs {b} ({noise}); "
            + "".join(f"{t}; " for t in stalls + caught)
            + f"loss spikes {len(sw['spike_steps'])} vs {len(sb['spike_steps'])}, median "
            f"gradient norm {sw['grad_norm_median']:.2f} vs {sb['grad_norm_median']:.2f}."
        )
    parts.append(
        "The SE covers which validation windows were scored, not the seed; a difference "
        "of a few hundredths from one seed is suggestive, not conclusive."
    )
    return " ".join(parts)


def events_text(e: dict) -> str:
    """The loop's spike events of one variant (`spike_summary`) in words, for a table cell."""
    if not e["count"]:
        return "none"
    steps = ", ".join(map(str, e["steps"]))
    text = f"{e['count']} at step{'s' if e['count'] > 1 else ''} {steps}"
    if e["rollbacks"]:
        rows = ", ".join(f"{a}–{b}" for a, b in e["skipped_rows"])
        text += f", {e['rollbacks']} rolled back (rows {rows} skipped)"
    if e["skipped_batches"]:
        text += f", {e['skipped_batches']} batch{'es' if e['skipped_batches'] > 1 else ''} skipped"
    return text


def _stall(s: dict, other: dict) -> str:
    """Words for a variant that stopped learning (its loss plateaued while the other's fell:
    the failure mode of an unstable configuration that never shows as a spike), or ''."""
    f, g = s["first_val"], other["first_val"]
    drop, other_drop = f["val_loss"] - s["final_val_loss"], g["val_loss"] - other["final_val_loss"]
    if other_drop <= STALL_MIN_DROP or drop >= STALL_SHARE * other_drop:
        return ""
    return (
        f"its validation loss fell {drop:.2f} nats after step {f['step']} "
        f"(the other's: {other_drop:.2f})"
    )


# --- the report -----------------------------------------------------------------------

_PRETTY = {"rope": "RoPE", "alibi": "ALiBi", "rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


def _pretty(value: Any) -> str:
    return _PRETTY.get(value, str(value))


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else alpha * v + (1 - alpha) * m
        out.append(m)
    return out


def plot_comparison(run_dir: Path, names: list[str], grad_clip: float, out_png: Path) -> None:
    """Loss (training EMA and validation) and gradient norms of every variant by tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, ScalarFormatter

    fig, (ax_loss, ax_zoom, ax_gn) = plt.subplots(1, 3, figsize=(17, 4.8))
    lows, highs, finals = [], [], []
    for i, name in enumerate(names):
        m = read_metrics(run_dir / "compare" / name / "metrics.jsonl")
        tr, va = m.train, m.val
        color = f"C{i % 10}"
        tx, ty = [r["tokens"] for r in tr], _ema([r["loss"] for r in tr])
        ax_loss.plot(tx, ty, color=color, lw=0.9, alpha=0.55)
        ax_loss.plot(
            [r["tokens"] for r in va],
            [r["val_loss"] for r in va],
            "o-",
            color=color,
            lw=1.6,
            ms=3,
            label=name,
        )
        half = [r for r in va if r["step"] >= va[-1]["step"] / 2] if va else []
        ax_zoom.plot(
            [r["tokens"] for r in half],
            [r["val_loss"] for r in half],
            "o-",
            color=color,
            lw=1.6,
            ms=3,
            label=name,
        )
        finals += [r["val_loss"] for r in va[-1:]]
        ax_gn.plot(tx, [r["grad_norm"] for r in tr], color=color, lw=0.7, alpha=0.8, label=name)
        lows += [min(ty), *(r["val_loss"] for r in va)]
        if ty:
            highs.append(ty[len(ty) // 5])  # the curve a fifth of the way in
    if lows and highs:  # the first steps (loss ~ ln V) would flatten the differences
        lo, hi = min(lows), max(highs)
        ax_loss.set_ylim(lo - 0.05 * (hi - lo), hi)
    if finals:  # variants more than 0.5 nats behind the best leave the zoomed axis
        ax_zoom.set_ylim(min(finals) - 0.03, min(finals) + 0.5)
    ax_loss.set_title("loss: validation (markers), training EMA (thin)")
    ax_zoom.set_title("validation loss, second half (zoom)")
    for ax in (ax_loss, ax_zoom):
        ax.set_ylabel("cross-entropy (nats/token)")
    ax_gn.set_title("gradient norm before clipping")
    ax_gn.set_yscale("log")
    ax_gn.yaxis.set_major_formatter(ScalarFormatter())
    ax_gn.yaxis.set_minor_formatter(ScalarFormatter())
    if grad_clip > 0:
        ax_gn.axhline(grad_clip, color="k", ls="--", lw=0.8, label=f"clip {grad_clip:g}")
    for ax in (ax_loss, ax_zoom, ax_gn):
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_comparison(run: Run, models: dict[str, ModelConfig]) -> list[Path]:
    """`compare.md`, `compare.html` (via lmlab.render) and `compare.json` in the run dir."""
    recipe = run.recipe
    names = list(models)
    ref = "baseline" if "baseline" in models else names[0]
    pcfg = recipe.pretrain
    stats = {n: variant_stats(run.dir / "compare" / n, models[n], pcfg.grad_clip) for n in names}
    windows = {n: read_json(run.dir / "compare" / n / "val_windows.json") for n in names}
    for n in names:  # a spike every variant shares is a hard batch, not an instability
        others = {s for m in names if m != n for s in stats[m]["spike_steps"]}
        stats[n]["own_spikes"] = sum(s not in others for s in stats[n]["spike_steps"])
        if n != ref:
            stats[n]["delta_vs_reference"] = round(
                stats[n]["final_val_loss"] - stats[ref]["final_val_loss"], 5
            )
            stats[n]["se_vs_reference"] = round(paired_se(windows[n], windows[ref]), 5)
    comps = comparisons(models, stats, windows)
    text = verdict(comps, stats)
    png = run.dir / "compare" / "curves.png"
    plot_comparison(run.dir, names, pcfg.grad_clip, png)
    first = stats[names[0]]
    setup = [
        ["", "value"],
        ["run", run.dir.name],
        ["data", f"{run.dir.name}/tokenizer/tokens (shared by every variant)"],
        ["budget per variant", f"{first['tokens']:,} tokens ({first['steps']} steps)"],
        [
            "batch × sequence",
            f"{pcfg.batch_size} × {pcfg.seq_len} (× {pcfg.grad_accum} accumulation)",
        ],
        ["peak lr, warm-up, clip", f"{pcfg.lr:g}, {pcfg.warmup_steps} steps, {pcfg.grad_clip:g}"],
        ["seed", str(recipe.seed)],
        ["precision", resolve_precision(pcfg.precision)],
        ["reference variant", ref],
        [
            "loss spike",
            f"a logged training loss more than {SPIKE_K:g} standard deviations and "
            f"{SPIKE_MIN_RISE:g} nats above the mean of the previous {SPIKE_WINDOW} "
            "(a run of such steps counts once)",
        ],
        [
            "spike events",
            "spikes the training loop caught as they happened (pretrain.spike_zscore "
            f"{pcfg.spike_zscore:g}, from step {pcfg.spike_grace + 1}"
            f", rollback {'on' if pcfg.spike_rollback else 'off'}); a variant with one "
            "skipped batches the others trained on",
        ],
        [
            "tie",
            f"|difference| below max({TIE_NATS} nats, 2 × paired SE over "
            f"{len(windows[ref])} validation windows)",
        ],
    ]
    table = [
        [
            "variant",
            "change",
            "parameters",
            "final val loss",
            f"Δ vs {ref} (± SE)",
            "best val loss",
            "loss spikes (own)",
            "spike events",
            "grad norm median / max",
            "clipped steps",
            "tokens/s",
        ]
    ]
    for n in names:
        s = stats[n]
        delta = f"{s['delta_vs_reference']:+.4f} ± {s['se_vs_reference']:.4f}" if n != ref else "—"
        table.append(
            [
                n,
                describe_change(recipe.variants[n]),
                f"{s['parameters']:,}",
                f"{s['final_val_loss']:.4f}",
                delta,
                f"{s['best_val_loss']:.4f}",
                f"{len(s['spike_steps'])} ({s['own_spikes']})",
                events_text(s["spike_events"]),
                f"{s['grad_norm_median']:.3f} / {s['grad_norm_max']:.2f}",
                f"{100 * s['clipped_share']:.0f}%",
                f"{s['tokens_per_s']:,}",
            ]
        )
    claims = [["comparison", "pair", "Δ loss (other − first) ± SE", "outcome"]]
    claims += [
        [
            c["claim"]
            if c["recommended"]
            else f"{_pretty(c['values'][0])} vs {_pretty(c['values'][1])}",
            f"{c['pair'][0]} vs {c['pair'][1]}",
            f"{c['delta']:+.4f} ± {c['se']:.4f}",
            c["outcome"],
        ]
        for c in comps
    ]
    sections: list[Section] = [
        ("Setup", setup),
        ("Results", table),
        ("Loss and gradient norms", png),
        ("The survey's recommendations", claims),
        ("Verdict", text),
    ]
    title = f"lmlab architecture comparison: {run.dir.name}"
    paths = write_pages(run.dir, "compare", title, sections)
    result = {
        "name": run.dir.name,
        "reference": ref,
        "seed": recipe.seed,
        "pretrain": recipe.resolved()["pretrain"],
        "spike_rule": {"window": SPIKE_WINDOW, "k": SPIKE_K, "min_rise": SPIKE_MIN_RISE},
        "spike_detector": {
            "zscore": pcfg.spike_zscore,
            "grace_steps": pcfg.spike_grace,
            "rollback": pcfg.spike_rollback,
        },
        "tie_nats": TIE_NATS,
        "variants": {
            n: {"overrides": recipe.variants[n], "model": models[n].to_dict(), **stats[n]}
            for n in names
        },
        "comparisons": comps,
        "verdict": text,
    }
    json_path = run.dir / "compare.json"
    write_json(json_path, result)
    return [*paths, json_path]

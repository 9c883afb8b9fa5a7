"""`lmlab scaling`: a scaling-law sweep that predicts a bigger run before training it.

`lmlab scaling run` prepares the recipe's data and tokenizer (its first two stages, reused
when finished), pre-trains a grid of models (every size in `--sizes` × every budget in
`--tokens`), fits the Chinchilla and Kaplan laws (`lmlab.train.scaling`) to their final
validation losses, writes the target's predicted loss to `prediction.json` with the time,
then trains the target (`--target SIZE:TOKENS`) and reports predicted against actual.

A point is the recipe's model (its preset and every architecture choice) at another
shape, and the recipe's pre-training settings with the point's own budget:

- shape: layers = round((N / (12·ASPECT²))^(1/3)), the depth at which width = ASPECT ×
  layers gives N (a block has ~12·width² parameters), so depth never falls as N grows;
  then the width (a multiple of `WIDTH_STEP`) whose non-embedding count is nearest N, with
  the preset's default heads. Kaplan et al. found the loss nearly flat over a wide range of
  aspect ratios, so the shape rule matters less than keeping it one rule;
- schedule: warm-up of the recipe's `warmup_steps` but at most `WARMUP_SHARE` of the
  point's steps, then cosine to `min_lr_ratio` exactly at the point's token budget: every
  point decays fully at its own budget (Hoffmann et al.'s fix of Kaplan's setup, and what
  makes the final losses comparable);
- the recipe's sequence length and peak learning rate (`--set pretrain.lr=...`) and its
  batch, halved until the smallest budget takes at least `MIN_STEPS` optimizer steps: a
  small model spends its first few hundred steps near the unigram plateau (loss ≈ the
  entropy of token frequencies), which no power law describes;
- loss spikes are logged but not rolled back: a rollback retrains from a checkpoint on
  other batches, so two points would differ in more than N and D;
- loss: the final model's loss on the same first `VAL_TOKENS` tokens of the validation
  split for every point, whatever its batch (`validation_loss`); no evaluation during
  training, which would cost time and change nothing.

N is the non-embedding parameter count (Kaplan's convention: at these sizes the
embeddings would dominate the count without adding much capacity per token); compute is
C = 6·N·D. Each point trains in `points/<label>/` with a completion marker keyed by its
model, its settings, the seed and the token shards, so a rerun skips finished points and
an interrupted point resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.run.rundir import (
    DONE,
    cached_record,
    check_run_dir,
    mark_done,
    read_done,
    read_manifest,
    start_dir,
    write_manifest,
)
from lmlab.utils import check_name, dir_lock, hash_obj, read_json, write_json

# The default sweep (docs/scaling.md): 4 sizes × 3 budgets on the `tiny` data, then a
# model 2× the largest size on 2× the largest budget.
DEFAULT_SIZES = "50k,100k,250k,500k"
DEFAULT_TOKENS = "0.25M,0.5M,1M"
DEFAULT_TARGET = "1M:2M"
ASPECT = 32  # width / layers of the shapes (GPT-2 small: 64; the compare recipe: 32)
WIDTH_STEP = 16
WARMUP_SHARE = 0.1  # warm-up takes at most this share of a point's steps
MIN_STEPS = 400  # the smallest budget's steps, at least: fewer end near the unigram plateau
VAL_TOKENS = 65_536  # validation tokens scored per point (the same windows for all)
FORMAT = 1  # bump when a point's training changes meaning, to retrain cached points
RELATIVE_ERROR_GOAL = 0.05


# --- parsing the command line -----------------------------------------------------------


def parse_count(text: str, what: str) -> int:
    """'0.5M' -> 500_000 (k, M, B suffixes); `what` names the option in the error."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise UsageError(f"{what}: {text!r} is not a count like 500k, 0.5M or 1.3B")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    n = int(round(float(m.group(1)) * mult))
    if n <= 0:
        raise UsageError(f"{what}: {text!r} must be positive")
    return n


def parse_counts(text: str, what: str) -> list[int]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what}: give a comma-separated list, e.g. 0.1M,0.2M")
    values = sorted({parse_count(t, what) for t in items})
    if len(values) < 2:
        raise UsageError(f"{what}: needs at least 2 different values to fit a law (got {text!r})")
    return values


def parse_target(text: str) -> tuple[int, int]:
    if text.count(":") != 1:
        raise UsageError(f"--target: {text!r} is not SIZE:TOKENS, e.g. 1.6M:2M")
    size, tokens = text.split(":")
    return parse_count(size, "--target size"), parse_count(tokens, "--target tokens")


def fmt_count(x: float) -> str:
    """1_600_000 -> '1.6M', 250_000 -> '250k'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def point_label(size: int, tokens: int) -> str:
    return f"n{fmt_count(size)}_d{fmt_count(tokens)}"


# --- shapes and settings of a point -------------------------------------------------------

SHAPE_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "n_decoder_layers",
    "vocab_size",
)


def shape_for(model, size: int, vocab_size: int):
    """The recipe's model (a `ModelConfig`) resized to about `size` non-embedding parameters:
    every architecture choice kept; depth from the size (module docstring), then the width
    whose count is nearest."""
    from lmlab.model.config import ModelConfig
    from lmlab.model.presets import resolve_fields

    choices = {k: v for k, v in model.to_dict().items() if k not in SHAPE_FIELDS}
    layers = max(1, round((size / (12 * ASPECT**2)) ** (1 / 3)))
    best = None
    for width in range(WIDTH_STEP, 8192 + 1, WIDTH_STEP):
        try:
            fields = resolve_fields({**choices, "layers": layers, "width": width})
            cfg = ModelConfig(**fields, vocab_size=vocab_size)  # checked by __post_init__
        except UsageError:
            continue
        err = abs(math.log(cfg.num_params(embeddings=False) / size))
        if best is None or err < best[0]:
            best = (err, cfg)
        if cfg.num_params(embeddings=False) > size:
            break  # wider only grows
    if best is None:
        raise UsageError(f"--sizes: no width of the recipe's model gives {fmt_count(size)}")
    return ModelConfig.from_dict(best[1].to_dict())  # fully validated, as a recipe's model


def steps_of(train) -> int:
    """Steps the loop takes for a token budget (it stops at the first step reaching it)."""
    return math.ceil(train.max_tokens / train.tokens_per_step)


def sweep_batch(base, smallest: int):
    """The recipe's `TrainConfig` with its batch halved until the smallest budget takes at
    least `MIN_STEPS` steps (one batch for the whole sweep, target included)."""
    rows = base.batch_size
    while rows > 1 and smallest / (rows * base.seq_len * base.grad_accum) < MIN_STEPS:
        rows //= 2
    if rows == base.batch_size:
        return base
    return dataclasses.replace(
        base, batch_size=rows, batch_warmup_start=min(base.batch_warmup_start, rows)
    )


def point_config(base, tokens: int):
    """The recipe's `TrainConfig` with the point's budget and schedule (module docstring)."""
    steps = math.ceil(tokens / base.tokens_per_step)
    warmup = min(base.warmup_steps, max(1, math.ceil(WARMUP_SHARE * steps)))
    # spikes are logged (metrics.jsonl), not rolled back (module docstring)
    quiet_spikes = {"spike_rollback": False} if hasattr(base, "spike_rollback") else {}
    return dataclasses.replace(
        base,
        **quiet_spikes,
        max_tokens=tokens,
        max_steps=None,
        max_minutes=None,
        warmup_steps=warmup,
        eval_every=steps + 1,  # no evaluation during training
        eval_batches=1,  # the loop's final one; `validation_loss` is what the sweep uses
        checkpoint_every=min(base.checkpoint_every, max(1, steps // 2)),
    )


@dataclasses.dataclass
class Point:
    """One (N, D) model of the sweep, before or after training."""

    label: str
    size: int  # asked for
    tokens: int  # asked for
    model: Any  # ModelConfig
    train: Any  # TrainConfig
    role: str = "grid"  # or "target"

    @property
    def n(self) -> int:
        return self.model.num_params(embeddings=False)

    @property
    def steps(self) -> int:
        return steps_of(self.train)

    @property
    def d(self) -> int:  # what the loop trains: whole steps
        return self.steps * self.train.tokens_per_step

    def describe(self) -> str:
        m = self.model
        return (
            f"N={fmt_count(self.n)} ({m.n_layers}×{m.d_model}, {m.n_heads} heads) "
            f"D={fmt_count(self.d)} ({self.steps} steps)"
        )


# --- the sweep ----------------------------------------------------------------------------


def run_sweep(
    recipe_ref: str = "tiny",
    sets: list[str] | None = None,
    sizes: str = DEFAULT_SIZES,
    tokens: str = DEFAULT_TOKENS,
    target: str = DEFAULT_TARGET,
    runs_dir: str | Path = "runs",
    name: str | None = None,
) -> Path:
    """The whole sweep (module docstring); returns the sweep's directory."""
    from lmlab.run.recipe import load_recipe
    from lmlab.train.scaling import FORMS

    size_list = parse_counts(sizes, "--sizes")
    token_list = parse_counts(tokens, "--tokens")
    target_nd = parse_target(target)
    n_points = len(size_list) * len(token_list)
    need = max(len(p) for p in FORMS.values())
    if n_points < need:
        raise UsageError(
            f"--sizes × --tokens gives {n_points} points; the Chinchilla form has {need} "
            f"parameters, so give at least {need} (e.g. 2 sizes × 3 budgets)"
        )
    recipe = load_recipe(recipe_ref, sets or [])
    if recipe.variants:
        raise UsageError(f"recipe {recipe_ref!r} has variants; a sweep takes a single model")
    run_dir = Path(runs_dir) / check_name(name or f"{recipe.name}-scaling", "sweep name")
    check_run_dir(run_dir)
    with dir_lock(run_dir, "sweep directory"):
        return _sweep(recipe, recipe_ref, sets, size_list, token_list, target_nd, run_dir)


def _sweep(recipe, recipe_ref, sets, size_list, token_list, target_nd, run_dir: Path) -> Path:
    from lmlab.run.runner import run_recipe

    t_start = time.monotonic()
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    spec_path = run_dir / "sweep.json"
    if spec_path.is_file():
        created = read_json(spec_path).get("created", created)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        spec_path,
        {
            "recipe": recipe_ref,
            "sets": list(sets or []),
            "sizes": size_list,
            "tokens": token_list,
            "target": {"size": target_nd[0], "tokens": target_nd[1]},
            "created": created,
        },
    )
    run_recipe(recipe, run_dir.parent, run_dir.name, until="tokenizer")
    points, target_pt = plan_points(recipe, run_dir, size_list, token_list, target_nd)
    tok_hash = hash_obj(read_json(run_dir / "tokenizer" / DONE)["outputs"])
    check_data(run_dir, [*points, target_pt], recipe)

    records = []
    for i, p in enumerate(points, 1):
        records.append(train_point(run_dir, p, recipe, tok_hash, f"{i}/{len(points)}"))
    fits = fit_grid(records)
    trained = cached_record(
        point_dir(run_dir, target_pt), point_key(target_pt, recipe.seed, tok_hash)
    )
    prediction = write_prediction(run_dir, target_pt, fits, records, trained is not None)
    target_rec = train_point(run_dir, target_pt, recipe, tok_hash, "target")
    write_report(run_dir, records, target_rec, fits, prediction)
    wall = time.monotonic() - t_start
    update_manifest(run_dir, records, target_rec, prediction, wall)
    print_summary(records, target_rec, fits, prediction, wall)
    return run_dir


def plan_points(recipe, run_dir: Path, sizes: list[int], tokens: list[int], target):
    """The grid points and the target, each with its model and training settings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run_dir / "tokenizer" / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    if recipe.model.family == "encoder_decoder":
        raise UsageError(
            "scaling: model.family encoder_decoder is not supported (a sweep scores the "
            "causal language-modelling loss); use a decoder or prefix model"
        )
    base = sweep_batch(recipe.pretrain, min(tokens))
    if base.seq_len > recipe.model.max_seq_len:
        raise UsageError(
            f"pretrain.seq_len: {base.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}"
        )
    shapes = {s: shape_for(recipe.model, s, vocab) for s in sorted({*sizes, target[0]})}
    points = [
        Point(point_label(s, d), s, d, shapes[s], point_config(base, d))
        for s in sizes
        for d in tokens
    ]
    ts, td = target
    tgt = Point(point_label(ts, td), ts, td, shapes[ts], point_config(base, td), role="target")
    if any((p.model, p.d) == (tgt.model, tgt.d) for p in points):
        raise UsageError(f"--target {fmt_count(ts)}:{fmt_count(td)} is one of the grid points")
    return points, tgt


def check_data(run_dir: Path, points: list[Point], recipe) -> None:
    """Warn when a budget repeats the training split (the laws assume fresh tokens)."""
    from lmlab.console import warn
    from lmlab.data.shards import open_split

    shards = run_dir / "tokenizer" / "tokens"
    train = len(open_split(shards, "train"))
    val = len(open_split(shards, "val"))
    if val < recipe.pretrain.seq_len + 1:
        raise UsageError(
            f"scaling: the validation split has {val} tokens, fewer than one window of "
            f"{recipe.pretrain.seq_len + 1}; raise data.val_fraction"
        )
    most = max(p.d for p in points)
    if most > train:
        warn(
            f"the largest budget ({fmt_count(most)} tokens) exceeds the training split "
            f"({fmt_count(train)} tokens): some tokens repeat, which the laws do not model"
        )


def point_key(p: Point, seed: int, tok_hash: str) -> str:
    return hash_obj(
        {
            "model": p.model.to_dict(),
            "train": dataclasses.asdict(p.train),
            "seed": seed,
            "tokenizer": tok_hash,
            "format": FORMAT,
        }
    )


def point_dir(run_dir: Path, p: Point) -> Path:
    return run_dir / ("target" if p.role == "target" else f"points/{p.label}")


def train_point(run_dir: Path, p: Point, recipe, tok_hash: str, tag: str) -> dict:
    """Train one point (or reuse it when finished with the same key); returns its record."""
    from lmlab.train.pretrain import pretrain

    pdir = point_dir(run_dir, p)
    key = point_key(p, recipe.seed, tok_hash)
    done = cached_record(pdir, key)
    if done:
        rec = done["record"]
        log(
            f"[dim]scaling {tag} {p.label}: cached (val loss {rec['loss']:.4f}, "
            f"{rec['seconds']:.0f}s when run)[/dim]"
        )
        return rec
    start_dir(pdir, key)
    first = pdir / ".first_start.json"  # kept across resumes: when training first began
    if not first.is_file():
        write_json(
            first, {"started": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        )
    started = read_json(first)["started"]
    log(f"[bold cyan]scaling {tag}[/bold cyan] {p.label}: {p.describe()}")
    t0 = time.monotonic()
    summary = pretrain(
        p.model,
        p.train,
        run_dir / "tokenizer" / "tokens",
        run_dir / "tokenizer",
        pdir,
        recipe.seed,
        key,
    )
    loss = validation_loss(pdir / "model", run_dir / "tokenizer" / "tokens", p.train.seq_len)
    rec = {
        "label": p.label,
        "role": p.role,
        "size": p.size,
        "tokens_asked": p.tokens,
        "n": p.n,
        "n_total": p.model.num_params(),
        "layers": p.model.n_layers,
        "width": p.model.d_model,
        "heads": p.model.n_heads,
        "d": summary["tokens"],
        "steps": summary["steps"],
        "loss": loss,
        "flops_6nd": 6.0 * p.n * summary["tokens"],
        "flops_model": p.model.flops_per_token(p.train.seq_len) * summary["tokens"],
        "batch_size": p.train.batch_size,
        "seq_len": p.train.seq_len,
        "lr": p.train.lr,
        "warmup_steps": p.train.warmup_steps,
        "seconds": round(time.monotonic() - t0, 2),  # this session's time (not resumed parts)
        "train_seconds": summary.get("seconds"),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }
    if not math.isfinite(rec["loss"]):
        raise UsageError(
            f"scaling {p.label}: validation loss {rec['loss']}; lower pretrain.lr and rerun"
        )
    mark_done(pdir, key, rec)
    log(f"scaling {p.label}: val loss {rec['loss']:.4f} in {rec['seconds']:.0f}s")
    return rec


def validation_loss(model_dir: Path, shards: Path, seq_len: int, rows: int = 16) -> float:
    """Mean next-token loss of a trained point on the first `VAL_TOKENS` tokens of the
    validation split: non-overlapping windows of `seq_len` + 1, the same for every point
    whatever its training batch, scored in fp32."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lmlab.data.shards import open_split
    from lmlab.model.loading import load_model

    val = open_split(shards, "val")
    stride = seq_len + 1
    n = min(len(val) // stride, max(1, VAL_TOKENS // seq_len))
    model = load_model(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, rows):
            arr = np.stack([val[j * stride : (j + 1) * stride] for j in range(i, min(i + rows, n))])
            t = torch.from_numpy(arr.astype(np.int64))
            out = model(t[:, :-1])
            logits = getattr(out, "logits", out)
            total += F.cross_entropy(
                logits.float().flatten(0, 1), t[:, 1:].flatten(), reduction="sum"
            ).item()
            count += t[:, 1:].numel()
    return total / count


def fit_grid(records: list[dict]) -> dict[str, Any]:
    """Both laws fitted to the grid's (N, D, loss)."""
    from lmlab.train.scaling import FORMS, fit_law

    n = [r["n"] for r in records]
    d = [r["d"] for r in records]
    loss = [r["loss"] for r in records]
    return {form: fit_law(n, d, loss, form) for form in FORMS}


def grid_key(records: list[dict]) -> str:
    return hash_obj(sorted((r["label"], r["n"], r["d"], r["loss"]) for r in records))


def write_prediction(
    run_dir: Path, tgt: Point, fits: dict, records: list[dict], target_trained: bool
) -> dict:
    """Record the target's predicted loss *before* it trains (kept on reruns: it is the
    evidence). Rewritten only when the grid changed; then, if the target had already
    trained, the record says so."""
    from lmlab.train.scaling import predict

    path = run_dir / "prediction.json"
    gkey = grid_key(records)
    target = {"label": tgt.label, "size": tgt.size, "tokens": tgt.tokens, "n": tgt.n, "d": tgt.d}
    if path.is_file():
        old = read_json(path)
        if old.get("grid_key") == gkey and old.get("target") == target:
            return old
    pred = {
        "written": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "grid_key": gkey,
        "target": target,
        "predicted_loss": {f: float(predict(fit, tgt.n, tgt.d)) for f, fit in fits.items()},
        "fits": {f: fit.to_dict() for f, fit in fits.items()},
        "written_after_target_trained": target_trained,
    }
    write_json(path, pred)
    log(
        "prediction for the target "
        + ", ".join(f"{f}: {v:.4f}" for f, v in pred["predicted_loss"].items())
        + f" (written to {path}"
        + (", after the target trained: not blind)" if target_trained else " before training it)")
    )
    return pred


def load_sweep(run_dir: Path) -> tuple[list[dict], dict | None, dict | None]:
    """The finished points of a sweep directory: grid records, target record, prediction."""
    if not (run_dir / "sweep.json").is_file():
        raise UsageError(f"{run_dir}: not a scaling sweep directory (no sweep.json)")
    records = []
    for marker in sorted((run_dir / "points").glob(f"*/{DONE}")):
        records.append(read_json(marker)["record"])
    tdone = read_done(run_dir / "target")
    target = tdone["record"] if tdone else None
    pred_path = run_dir / "prediction.json"
    pred = read_json(pred_path) if pred_path.is_file() else None
    if not records:
        raise UsageError(f"{run_dir}: no finished points yet (run `lmlab scaling run` first)")
    return records, target, pred


def refit(run_dir: Path) -> list[Path]:
    """`lmlab scaling fit DIR`: refit the finished grid points and rewrite the report.

    The prediction on record stays as written before the target trained."""
    records, target, pred = load_sweep(run_dir)
    spec = read_json(run_dir / "sweep.json")
    wanted = {point_label(s, d) for s in spec["sizes"] for d in spec["tokens"]}
    records = [r for r in records if r["label"] in wanted] or records
    fits = fit_grid(records)
    paths = write_report(run_dir, records, target, fits, pred)
    print_summary(records, target, fits, pred, None)
    return paths


def update_manifest(run_dir: Path, records, target, prediction, wall: float) -> None:
    manifest = read_manifest(run_dir)
    manifest.setdefault("stages", {})["scaling"] = {
        "status": "done",
        "seconds": round(wall, 2),
        "points": {r["label"]: {"loss": r["loss"], "seconds": r["seconds"]} for r in records},
        "target": target and {"label": target["label"], "loss": target["loss"]},
        "predicted_loss": prediction and prediction["predicted_loss"],
        "files": ["scaling.md", "scaling.html", "scaling.json", "prediction.json"],
    }
    write_manifest(run_dir, manifest)


# --- results ------------------------------------------------------------------------------


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


# --- the command line -----------------------------------------------------------------------

scaling_app = typer.Typer(
    no_args_is_help=True,
    help="Scaling laws (Zhao et al. §2.1): sweep sizes × budgets, fit Chinchilla and Kaplan "
    "laws, predict a bigger run, allocate a compute budget.",
)


@scaling_app.command("run")
def cli_run(
    recipe: Annotated[str, typer.Argument(help="Built-in recipe name or a YAML file.")] = "tiny",
    sizes: Annotated[
        str, typer.Option(help="Non-embedding parameter counts of the grid, comma-separated.")
    ] = DEFAULT_SIZES,
    tokens: Annotated[
        str, typer.Option(help="Training-token budgets of the grid, comma-separated.")
    ] = DEFAULT_TOKENS,
    target: Annotated[
        str, typer.Option(help="SIZE:TOKENS of the run to predict, then train.")
    ] = DEFAULT_TARGET,
    name: Annotated[
        str | None, typer.Option(help="Sweep directory name (default: <recipe>-scaling).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go.")] = Path("runs"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key, e.g. --set pretrain.lr=3e-3."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
) -> None:
    """Train a grid of sizes × budgets, fit both laws, predict the target, train it, report."""
    from lmlab.console import resumable, set_quiet

    set_quiet(quiet)
    resumable()
    run_dir = run_sweep(recipe, set_ or [], sizes, tokens, target, runs_dir, name)
    print(f"report: {run_dir / 'scaling.html'}  (markdown: {run_dir / 'scaling.md'})")


@scaling_app.command("fit")
def cli_fit(
    run_dir: Annotated[Path, typer.Argument(help="A sweep directory (lmlab scaling run).")],
) -> None:
    """Refit both laws to a sweep's finished points and rewrite its report."""
    for p in refit(run_dir):
        print(p)


@scaling_app.command("optimal")
def cli_optimal(
    flops: Annotated[float, typer.Option(help="Training compute budget C in FLOPs (6·N·D).")],
    fit: Annotated[
        str,
        typer.Option(
            help="hoffmann (published Chinchilla constants), besiroglu (their refit), kaplan, "
            "or a sweep's scaling.json / directory."
        ),
    ] = "hoffmann",
    form: Annotated[
        str | None, typer.Option(help="With a sweep's fits: chinchilla or kaplan (default both).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The compute-optimal model size and token count for a FLOP budget, and its loss."""
    import json

    from lmlab.train.scaling import compute_optimal

    rows = [compute_optimal(f, flops) for f in fits_from(fit, form)]
    if as_json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for r in rows:
        print(f"law: {r['form']} form, {r['source']}")
        print(f"compute: {r['flops']:.3g} FLOPs (C = 6·N·D)")
        print(f"N_opt: {fmt_count(r['n_opt'])} parameters ({r['n_opt']:.4g})")
        print(f"D_opt: {fmt_count(r['d_opt'])} tokens ({r['d_opt']:.4g})")
        print(f"tokens per parameter: {r['tokens_per_parameter']:.1f}")
        print(f"predicted loss: {r['loss']:.4f} nats/token")


def fits_from(ref: str, form: str | None) -> list:
    """The laws `--fit` names: a published set of constants, or a sweep's fits."""
    from lmlab.train.scaling import FORMS, PUBLISHED, Fit

    if form is not None and form not in FORMS:
        raise UsageError(f"--form {form!r}: known forms are {', '.join(FORMS)}")
    if ref in PUBLISHED:
        if form is not None and PUBLISHED[ref].form != form:
            raise UsageError(f"--fit {ref} is a {PUBLISHED[ref].form} law, not {form}")
        return [PUBLISHED[ref]]
    path = Path(ref)
    if path.is_dir():
        path = path / "scaling.json"
    if not path.is_file():
        raise UsageError(
            f"--fit {ref!r}: neither {', '.join(PUBLISHED)} nor a sweep's scaling.json"
        )
    try:
        data = read_json(path)
        fits = data["fits"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--fit {path}: not a scaling.json (no 'fits')") from None
    chosen = [Fit.from_dict(fits[f]) for f in FORMS if f in fits and (form is None or f == form)]
    if not chosen:
        raise UsageError(f"--fit {path}: holds no {form or 'fit'}")
    for f in chosen:
        f.source = f"fitted by the sweep {path.parent.name}"
    return chosen

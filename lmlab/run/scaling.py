"""The scaling-law sweep behind `lmlab scaling`: it predicts a bigger run before training it.

`lmlab scaling run` prepares the recipe's data and tokenizer (its first two stages, reused
when finished), pre-trains a grid of models (every size in `--sizes` × every budget in
`--tokens`), fits the Chinchilla and Kaplan laws (`lmlab.train.scaling`) to their final
validation losses, writes the target's predicted loss to `prediction.json` with the time,
then trains the target (`--target SIZE:TOKENS`) and reports predicted against actual.

What a point is (its shape, schedule, batch and loss) is `lmlab.run.scaling_points`; the
report and plots are `lmlab.run.scaling_report`; the command is `lmlab.cli.scaling`.

Each point trains in `points/<label>/` with a completion marker keyed by its model, its
settings, the seed and the token shards, so a rerun skips finished points and an
interrupted point resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
from lmlab.run.scaling_points import (
    VAL_TOKENS,
    Point,
    fmt_count,
    parse_counts,
    parse_target,
    point_config,
    point_label,
    shape_for,
    sweep_batch,
)
from lmlab.run.scaling_report import print_summary, write_report
from lmlab.utils import check_name, dir_lock, hash_obj, read_json, write_json

# The default sweep (docs/scaling.md): 4 sizes × 3 budgets on the `tiny` data, then a
# model 2× the largest size on 2× the largest budget.
DEFAULT_SIZES = "50k,100k,250k,500k"
DEFAULT_TOKENS = "0.25M,0.5M,1M"
DEFAULT_TARGET = "1M:2M"
FORMAT = 1  # bump when a point's training changes meaning, to retrain cached points


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
        shard_dir=run_dir / "tokenizer" / "tokens",
        tokenizer_dir=run_dir / "tokenizer",
        out_dir=pdir,
        seed=recipe.seed,
        key=key,
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
    from lmlab.data.shards import open_split
    from lmlab.model.loading import load_model
    from lmlab.model.scoring import score, stream_windows

    windows = stream_windows(
        open_split(shards, "val"), seq_len + 1, limit=max(1, VAL_TOKENS // seq_len)
    )
    return score(load_model(model_dir), windows, rows).loss


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


def _check_sweep_dir(run_dir: Path) -> None:
    if not (run_dir / "sweep.json").is_file():
        raise UsageError(f"{run_dir}: not a scaling sweep directory (no sweep.json)")


def load_sweep(run_dir: Path) -> tuple[list[dict], dict | None, dict | None]:
    """The finished points of a sweep directory: grid records, target record, prediction."""
    _check_sweep_dir(run_dir)
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

    The prediction on record stays as written before the target trained. The report is
    rewritten under the sweep's lock, so not while a sweep writes it (checked first: the
    lock would create a mistyped directory)."""
    _check_sweep_dir(run_dir)
    with dir_lock(run_dir, "sweep directory"):
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


# --- the laws of `lmlab scaling optimal` --------------------------------------------------


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

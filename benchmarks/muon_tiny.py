"""Muon against AdamW on the `tiny` recipe: validation loss against tokens seen.

Why: the training half of lmlab's speed target is fewer tokens to the same loss. The
metric is the tokens at which Muon (hidden matrices; AdamW for the rest) first reaches
the validation loss AdamW ends at, over the tokens AdamW trained on: the target is
≤ 0.7×. Wall time is not the metric (the CPU is shared); tokens are.

Each run is the `tiny` recipe's pre-training exactly as `lmlab run tiny` does it (its
data and tokenizer stages through `run_recipe`, then `lmlab.train.pretrain.pretrain` with
the recipe's model and `pretrain:` settings), except that the budget is `--tokens` tokens
instead of 7.5 minutes (a token budget is the same on a loaded machine) and validation
runs every `--eval-every` steps (the recipe's 8 fixed validation batches). Only
`optimizer`, `muon_lr`, `muon_adjust`, `packing` and the seed change between runs; the
cosine schedule runs to the same budget for every run.

AdamW's target is its final validation loss, averaged over seeds. A Muon run's tokens to
the target interpolate linearly between the two evaluations that straddle it.

Run: `nice -n 5 python benchmarks/muon_tiny.py --json /tmp/muon_tiny.json --png
/tmp/muon_tiny.png` (3 seeds × AdamW and Muon, stream packing); `--muon 0.01 0.02 0.04
0.002:match_rms_adamw --seeds 1337` is the lr sweep; `--packings stream bos_best_fit`
adds BOS-aligned best-fit packing; `--step-time 40 --threads 2` only times the loop's
step with each optimizer; `--report FILE` prints the tables of a --json file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import run_and_report  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Spec:
    optimizer: str
    muon_lr: float | None
    muon_adjust: str | None
    packing: str
    seed: int

    @property
    def tag(self) -> str:
        opt = self.optimizer
        if opt == "muon":
            opt += f"-lr{self.muon_lr:g}-{self.muon_adjust}"
        return f"{opt}-{self.packing}-s{self.seed}"

    @property
    def family(self) -> str:
        """The run without its seed: what the seeds average over."""
        return self.tag.rsplit("-s", 1)[0]


def prepare(runs_dir: Path) -> Path:
    """The tiny recipe's data and tokenizer stages (cached by the runner)."""
    from lmlab.run.recipe import load_recipe
    from lmlab.run.runner import run_recipe

    return run_recipe(load_recipe("tiny"), runs_dir, name="tiny-data", until="tokenizer")


def train_one(spec: Spec, data_run: str, out: str, tokens: int, eval_every: int, threads: int):
    """One pre-training run; returns its validation curve [(tokens, val_loss)] and summary."""
    import torch

    from lmlab.model import ModelConfig
    from lmlab.run.recipe import load_recipe
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train.pretrain import pretrain
    from lmlab.utils import hash_obj

    torch.set_num_threads(threads)
    out_dir = Path(out)
    done = out_dir / "summary.json"
    if not done.is_file():
        recipe = load_recipe("tiny")
        run_dir = Path(data_run)
        mcfg = recipe.model.to_dict()
        mcfg["vocab_size"] = load_tokenizer(run_dir / "tokenizer").get_vocab_size()
        mcfg = ModelConfig.from_dict(mcfg)
        extra = {}
        if spec.optimizer == "muon":
            extra = {"muon_lr": spec.muon_lr, "muon_adjust": spec.muon_adjust}
        cfg = dataclasses.replace(
            recipe.pretrain,
            optimizer=spec.optimizer,
            packing=spec.packing,
            max_minutes=None,
            max_tokens=tokens,
            eval_every=eval_every,
            keep_best=False,
            **extra,
        )
        pretrain(
            mcfg,
            cfg,
            shard_dir=run_dir / "tokenizer" / "tokens",
            tokenizer_dir=run_dir / "tokenizer",
            out_dir=out_dir,
            seed=spec.seed,
            key=hash_obj({"model": mcfg.to_dict(), "train": dataclasses.asdict(cfg)}),
        )
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    summary = json.loads(done.read_text())
    return {
        "curve": curve,
        "seconds": summary["seconds"],
        "steps": summary["steps"],
        "final_val_bos": bos_val_loss(out_dir / "model", Path(data_run)),
    }


def bos_val_loss(model_dir: Path, data_run: Path) -> float:
    """The final model's loss on validation windows packed as `bos_best_fit` packs
    training windows (each led by BOS), the recipe's 8 × 16 rows: the stream's validation
    windows never start with BOS, which a model trained on BOS-led windows always saw."""
    from lmlab.data.shards import open_split
    from lmlab.model.loading import load_model
    from lmlab.model.precision import resolve_precision
    from lmlab.run.recipe import load_recipe
    from lmlab.train.loop import evaluate_loss
    from lmlab.train.objectives import causal_batch
    from lmlab.train.pretrain import BestFitPacked, doc_starts_of

    cfg = load_recipe("tiny").pretrain
    shards = data_run / "tokenizer" / "tokens"
    manifest = json.loads((shards / "manifest.json").read_text())
    packed = BestFitPacked(
        open_split(shards, "val"),
        doc_starts_of(shards, manifest, "val"),
        cfg.seq_len,
        seed=0,
        bos_id=int(manifest["eos_id"]),
    )
    n = cfg.batch_size
    batches = [causal_batch(packed.rows(i * n, n)[0]) for i in range(cfg.eval_batches)]
    return evaluate_loss(load_model(model_dir), batches, resolve_precision(cfg.precision))


def step_times(data_run: Path, muon_lr: float, steps: int, threads: int) -> dict:
    """Milliseconds per optimizer step of the tiny recipe (batch 16 × 256, the recipe's
    precision) with AdamW and with Muon: the loop's own `backward_step`, clipping and
    optimizer step, the two alternating step by step so a shared machine's load hits
    both alike; medians. What Muon's Newton–Schulz iterations cost per step decides
    whether fewer tokens is also less time."""
    import statistics
    import time

    import torch

    from lmlab.data.shards import open_split
    from lmlab.model import ModelConfig
    from lmlab.model.encdec import build_model
    from lmlab.model.precision import resolve_precision
    from lmlab.run.recipe import load_recipe
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train.batch import token_cross_entropy
    from lmlab.train.distributed import Dist
    from lmlab.train.loop import backward_step, make_optimizer
    from lmlab.train.objectives import causal_batch
    from lmlab.train.pretrain import PackedStream

    torch.set_num_threads(threads)
    recipe = load_recipe("tiny")
    mcfg = recipe.model.to_dict()
    mcfg["vocab_size"] = load_tokenizer(data_run / "tokenizer").get_vocab_size()
    mcfg = ModelConfig.from_dict(mcfg)
    base = recipe.pretrain
    precision = resolve_precision(base.precision)
    tokens = open_split(data_run / "tokenizer" / "tokens", "train")
    stream = PackedStream(tokens, None, base.seq_len, recipe.seed)
    d = Dist()
    runs = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = build_model(mcfg)
        cfg = dataclasses.replace(base, optimizer=name, muon_lr=muon_lr)
        opt = make_optimizer(model, cfg, d.device)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        runs[name] = (model, opt, scaler)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps + 3):
        b = causal_batch(stream.rows(i * base.batch_size, base.batch_size)[0])
        for name, (model, opt, scaler) in runs.items():
            t = time.perf_counter()
            total = float(b.n_targets)
            backward_step(model, model, token_cross_entropy, [b], total, precision, scaler, d)
            torch.nn.utils.clip_grad_norm_(model.parameters(), base.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:  # the first steps pay one-off costs (fused kernels, allocations)
                times[name].append(1000 * (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms_per_step": med, "muon_over_adamw": med["muon"] / med["adamw"], "steps": steps}


def tokens_to(curve: list[list[float]], target: float) -> float | None:
    """First token count at which the validation loss reaches `target` (linear between
    evaluations; the loss before the first evaluation is unknown, so never earlier)."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None:
                return float(t)
            (t0, v0) = prev
            return float(t0 + (t - t0) * (v0 - target) / (v0 - v))
        prev = (t, v)
    return None


def run(args) -> dict:
    runs_dir = Path(args.runs_dir)
    data_run = prepare(runs_dir)
    if args.step_time:
        return {
            "step_time": step_times(
                data_run, float(args.muon[0].split(":")[0]), args.step_time, args.threads
            )
        }
    specs = []
    for opt, packing, seed in product(args.optimizers, args.packings, args.seeds):
        if opt == "muon":
            for m in args.muon:
                lr, _, adjust = m.partition(":")
                specs.append(Spec(opt, float(lr), adjust or "original", packing, seed))
        else:
            specs.append(Spec(opt, None, None, packing, seed))
    bench = runs_dir / f"muon-bench-{args.tokens}"
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            s: pool.submit(
                train_one,
                s,
                str(data_run),
                str(bench / s.tag),
                args.tokens,
                args.eval_every,
                args.threads,
            )
            for s in specs
        }
        runs = {
            s.tag: {**dataclasses.asdict(s), "family": s.family, **f.result()}
            for s, f in futures.items()
        }
    return {"runs": runs, "tokens": args.tokens, "analysis": analyse(runs)}


def analyse(runs: dict) -> dict:
    """Per packing: AdamW's mean final loss (the target) and each Muon family's tokens to
    reach it, per seed, with the ratio to AdamW's budget."""
    out: dict = {}
    for packing in sorted({r["packing"] for r in runs.values()}):
        adam = [r for r in runs.values() if r["optimizer"] == "adamw" and r["packing"] == packing]
        if not adam:
            continue
        finals = [r["curve"][-1][1] for r in adam]
        target = float(np.mean(finals))
        budget = float(np.mean([r["curve"][-1][0] for r in adam]))
        entry: dict = {
            "adamw_final": {f"s{r['seed']}": r["curve"][-1][1] for r in adam},
            "target": target,
            "adamw_tokens": budget,
            "adamw_tokens_to_target": {
                f"s{r['seed']}": tokens_to(r["curve"], target) for r in adam
            },
            "muon": {},
        }
        muon = [r for r in runs.values() if r["optimizer"] == "muon" and r["packing"] == packing]
        for fam in sorted({r["family"] for r in muon}):
            rs = [r for r in muon if r["family"] == fam]
            reach = {f"s{r['seed']}": tokens_to(r["curve"], target) for r in rs}
            # the same seed's AdamW run as the target: less exposed to one unlucky seed
            own = {r["seed"]: r for r in adam}
            paired = {}
            for r in rs:
                a = own.get(r["seed"])
                t = None if a is None else tokens_to(r["curve"], a["curve"][-1][1])
                paired[f"s{r['seed']}"] = None if t is None else t / a["curve"][-1][0]
            got = [v for v in reach.values() if v is not None]
            mean = float(np.mean(got)) if len(got) == len(reach) else None
            entry["muon"][fam] = {
                "tokens_to_target": reach,
                "mean_tokens": mean,
                "ratio": None if mean is None else mean / budget,
                "paired_ratio": paired,
                "final": {f"s{r['seed']}": r["curve"][-1][1] for r in rs},
            }
        out[packing] = entry
    return out


def plot(saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    runs = saved["results"]["runs"].values()
    fams = sorted({r["family"] for r in runs})
    colors = dict(zip(fams, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    first = min(r["seed"] for r in runs)
    for r in runs:
        t, v = zip(*r["curve"], strict=True)
        label = r["family"] if r["seed"] == first else None
        ax.plot(np.asarray(t) / 1e6, v, color=colors[r["family"]], alpha=0.8, lw=1, label=label)
    for a in saved["results"]["analysis"].values():
        ax.axhline(a["target"], color="grey", ls=":", lw=1)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.set_title("tiny recipe: AdamW vs Muon (dotted: AdamW's mean final loss)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(saved: dict) -> None:
    res = saved["results"]
    if "step_time" in res:
        st = res["step_time"]
        print(
            f"median ms per step over {st['steps']} steps: "
            + ", ".join(f"{k} {v:.0f}" for k, v in st["ms_per_step"].items())
            + f"; Muon/AdamW {st['muon_over_adamw']:.3f}"
        )
        return
    print(f"budget {res['tokens']:,} tokens per run")
    print(
        "\n| run | seed | final val loss | on BOS-led val windows | steps | seconds |\n"
        "|---|---|---|---|---|---|"
    )
    for r in sorted(res["runs"].values(), key=lambda r: (r["family"], r["seed"])):
        final, bos = r["curve"][-1][1], r.get("final_val_bos", float("nan"))
        print(
            f"| {r['family']} | {r['seed']} | {final:.4f} | {bos:.4f} | {r['steps']} "
            f"| {r['seconds']:.0f} |"
        )
    for packing, a in res["analysis"].items():
        print(
            f"\npacking {packing}: AdamW final (mean over seeds) {a['target']:.4f} at "
            f"{a['adamw_tokens']:,.0f} tokens"
        )
        print(
            "\n| Muon | tokens to AdamW's final loss, per seed | mean | ratio "
            "| paired ratio (seed s vs AdamW seed s) |"
        )
        print("|---|---|---|---|---|")
        for fam, m in a["muon"].items():
            per = ", ".join(
                f"{k}: {'never' if v is None else f'{v / 1e6:.3f}M'}"
                for k, v in m["tokens_to_target"].items()
            )
            mean = "—" if m["mean_tokens"] is None else f"{m['mean_tokens'] / 1e6:.3f}M"
            ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}×"
            pr = ", ".join(
                f"{k}: {'never' if v is None else f'{v:.2f}×'}"
                for k, v in m.get("paired_ratio", {}).items()
            )
            print(f"| {fam} | {per} | {mean} | {ratio} | {pr} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", default="/tmp/lmlab-muon-bench")
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    ap.add_argument(
        "--muon",
        nargs="+",
        default=["0.02"],
        help="Muon settings LR[:ADJUST], ADJUST original (default) or match_rms_adamw",
    )
    ap.add_argument("--packings", nargs="+", default=["stream"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338, 1339])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--eval-every", type=int, default=20, help="steps (of 4,096 tokens)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--step-time", type=int, default=0, help="only time N steps of each optimizer")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args()

    def report_and_plot(saved: dict) -> None:
        report(saved)
        if args.png and "runs" in saved["results"]:
            plot(saved, args.png)

    run_and_report(args, run, report_and_plot)


if __name__ == "__main__":
    main()

"""Training throughput and MFU of lmlab versus transformers and litgpt, in one process.

Why: lmlab's training-speed target is tokens/s for a ~10M-parameter LLaMA-style model of at
least 1.3x Hugging Face's `LlamaForCausalLM` (sdpa attention) and 1.0x litgpt's `GPT`, with
the same shapes, batch, precision and optimizer. All three start from lmlab's initial
weights, so their first losses must agree: a check that they compute the same function,
not only that they hold the same number of parameters. Rounds are interleaved (lmlab,
transformers, litgpt, then the next round starting one peer later) so that drift and
other jobs' load hit every peer alike; a ratio is the median of the per-round ratios.

Every peer runs the training step of `lmlab.train.loop.train` (one micro-batch, one
process): `make_optimizer`, then the loop's own `backward_step` (autocast, the objective
`token_cross_entropy` on the forward, its loss scaled by the target count plus any
aux loss, backward through the loss scaler), `StepSums.reduce` and `renormalise`,
`clip_grad_norm_`, the optimizer step and `zero_grad(set_to_none=True)`, with the host
reads the loop makes (target count, loss, gradient norm). Only the model differs: lmlab's
`Transformer`, `LlamaForCausalLM(...).logits`, `GPT(...)`. `--loop-check` also runs the
real `train()` on the lmlab model and reports its tokens/s, to show what the loop adds
around the step.

Run: `python benchmarks/train_throughput.py` (CPU, fp32, the 10M model); `--compile`
compiles every peer, `--compile both` runs eager and compiled copies side by side;
`--fused off|both` likewise for the unfused AdamW (the loop's default is fused); on a
GPU, `--device cuda --dtype bf16 --model gpt2-124m` (MFU against the spec peak).
Needs `transformers` and `litgpt` (docs/benchmarks.md: installing litgpt without changing
torch or huggingface-hub).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lmlab.errors import UsageError
from lmlab.model import ModelConfig, Transformer
from lmlab.model.hf import config_to_hf, state_to_hf
from lmlab.model.precision import cpu_has_native_bf16
from lmlab.train.batch import Batch, token_cross_entropy
from lmlab.train.distributed import Dist
from lmlab.train.loop import TrainConfig, backward_step, make_optimizer, train
from lmlab.train.mfu import device_name, mfu, parse_dtype, peak_flops
from lmlab.utils import write_json

# LLaMA-style shapes (pre-RMSNorm, RoPE, SwiGLU, no biases, tied embeddings). Vocabularies
# are multiples of 64, so lmlab's padding adds nothing and all three hold the same tensors.
MODELS: dict[str, dict] = {
    "llama-10m": dict(
        model=dict(vocab_size=8192, n_layers=4, d_model=384, n_heads=6, max_seq_len=256),
        batch=8,
    ),
    # GPT-2 small's shapes (12 x 768, 12 heads, 1024 context, vocabulary 50257 padded to
    # 50304 as nanoGPT does) in the LLaMA architecture: ~124M parameters.
    "gpt2-124m": dict(
        model=dict(vocab_size=50304, n_layers=12, d_model=768, n_heads=12, max_seq_len=1024),
        batch=16,
    ),
    # a smoke test of the script itself (`--quick`), not a measurement
    "quick": dict(
        model=dict(vocab_size=512, n_layers=2, d_model=128, n_heads=4, max_seq_len=64),
        batch=4,
    ),
}
PEERS = ("lmlab", "transformers", "litgpt")


class Logits(torch.nn.Module):
    """A peer's model called as the loop calls lmlab's, `model(input_ids) -> logits`, so
    every peer trains through the same objective, `token_cross_entropy`."""

    def __init__(self, inner: torch.nn.Module, forward: Callable) -> None:
        super().__init__()
        self.inner = inner
        self._forward = forward

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(self.inner, input_ids)


@dataclass
class Peer:
    name: str
    model: torch.nn.Module  # model(input_ids) -> logits
    runner: torch.nn.Module | None = None  # the model, or its torch.compile wrapper
    step: Callable[[Batch], float] | None = None
    seconds: list[float] = field(default_factory=list)  # one entry per round
    first_loss: float = math.nan


def build_lmlab(cfg: ModelConfig) -> Peer:
    return Peer("lmlab", Transformer(cfg))


def build_transformers(cfg: ModelConfig, src: Transformer) -> Peer:
    """`LlamaForCausalLM` with sdpa attention, from the config and weights lmlab exports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = config_to_hf("llama", cfg, "float32", {})
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        hf_cfg.pop(key)
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg, use_cache=False, attn_implementation="sdpa"))
    state = state_to_hf("llama", cfg, src.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers weights: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return Peer("transformers", Logits(model, lambda m, x: m(input_ids=x, use_cache=False).logits))


def build_litgpt(cfg: ModelConfig, src: Transformer) -> Peer:
    """litgpt's `GPT` configured as its LLaMA models are, with lmlab's weights (q, k and v
    side by side in one `qkv` matrix, as litgpt 0.5 stores them; SwiGLU's gate is fc_1)."""
    from litgpt.config import Config
    from litgpt.model import GPT

    lc = Config(
        name="lmlab-bench",
        block_size=cfg.max_seq_len,
        vocab_size=cfg.padded_vocab_size,
        padded_vocab_size=cfg.padded_vocab_size,
        n_layer=cfg.n_layers,
        n_embd=cfg.d_model,
        n_head=cfg.n_heads,
        n_query_groups=cfg.n_kv_heads,
        head_size=cfg.head_dim,
        rotary_percentage=1.0,
        rope_base=int(cfg.rope_theta),
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.ffn_hidden,
    )
    model = GPT(lc)
    s = src.state_dict()
    state = {
        "transformer.wte.weight": s["embed_tokens.weight"],
        "transformer.ln_f.weight": s["norm.weight"],
        "lm_head.weight": s["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"transformer.h.{i}."
        state[b + "norm_1.weight"] = s[a + "input_layernorm.weight"]
        state[b + "norm_2.weight"] = s[a + "post_attention_layernorm.weight"]
        state[b + "attn.qkv.weight"] = torch.cat(
            [s[a + f"self_attn.{p}_proj.weight"] for p in "qkv"]
        )
        state[b + "attn.proj.weight"] = s[a + "self_attn.o_proj.weight"]
        state[b + "mlp.fc_1.weight"] = s[a + "mlp.gate_proj.weight"]
        state[b + "mlp.fc_2.weight"] = s[a + "mlp.up_proj.weight"]
        state[b + "mlp.proj.weight"] = s[a + "mlp.down_proj.weight"]
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return Peer("litgpt", model)  # GPT(input_ids) returns the logits


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied tensor counts once


def make_step(
    peer: Peer, tcfg: TrainConfig, device: torch.device, precision: str
) -> Callable[[Batch], float]:
    """The loop's step for one micro-batch in one process; returns the logged loss."""
    model = peer.model
    opt = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    clip = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
    d = Dist(device=device)

    def step(b: Batch) -> float:
        total = float(b.n_targets)
        sums = backward_step(
            peer.runner, model, token_cross_entropy, [b], total, precision, scaler, d
        )
        loss, _ = sums.reduce(d)
        sums.renormalise(model, total, peer.name)
        scaler.unscale_(opt)
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_rate(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    batches: list[Batch],
    tcfg: TrainConfig,
    warmup: int,
    steps: int,
) -> float:
    """tokens/s of the real `train()` on a copy of the lmlab model, over the steps after
    `warmup`, from its own metrics rows (logged every step)."""
    model = Transformer(cfg)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        lcfg = TrainConfig(
            **{
                **{k: getattr(tcfg, k) for k in ("batch_size", "seq_len", "fused", "compile")},
                "precision": tcfg.precision,
                "device": tcfg.device,
                "max_steps": warmup + steps,
                "log_every": 1,
                "eval_every": 10**9,
                "checkpoint_every": 10**9,
                "spike_zscore": 0.0,
                "keep_best": False,
            }
        )

        def get_batch(index: int, start_row: int, rows: int) -> Batch:
            return batches[index % len(batches)].rows(slice(0, rows))

        train(model, get_batch, [], lcfg, Path(tmp) / "run", tmp, key="bench", name="loop")
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    rows = {r["step"]: r for r in rows if "tokens_per_s" in r}
    a, b = rows[warmup], rows[warmup + steps]
    return (b["tokens"] - a["tokens"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)


def machine() -> dict:
    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "cpu": device_name("cpu"),
        "cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "litgpt": ver("litgpt"),
        "threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-10m", choices=sorted(MODELS))
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per peer (default 12)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per peer first")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (model's default)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (<= the model's)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated, with lmlab")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="off",
        choices=["off", "on", "both"],
        help="torch.compile every peer's model (both: eager and compiled, side by side)",
    )
    ap.add_argument(
        "--fused",
        default="auto",
        choices=["auto", "on", "off", "both"],
        help="AdamW kernel for every peer (auto: the loop's default, fused where available)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--measure-peak", action="store_true", help="measure even on a known GPU")
    ap.add_argument("--loop-check", action="store_true", help="also time lmlab's real train()")
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.model = "quick"
    steps, rounds, warmup = (2, 1, 1) if args.quick else (12, 6, 3 if args.compile != "off" else 2)
    args.steps = steps if args.steps is None else args.steps
    args.rounds = rounds if args.rounds is None else args.rounds
    args.warmup = warmup if args.warmup is None else args.warmup
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    if not peers <= set(PEERS) or "lmlab" not in peers:
        raise UsageError(f"--peers {args.peers!r}: a subset of {','.join(PEERS)} with lmlab")
    args.peers = [p for p in PEERS if p in peers]
    if not 1 <= args.rounds <= args.steps or args.warmup < 0:
        raise UsageError(
            f"--steps {args.steps}, --rounds {args.rounds}, --warmup {args.warmup}: "
            "need steps >= rounds >= 1 and warmup >= 0"
        )
    return args


def variants(args: argparse.Namespace) -> list[tuple[bool, bool | None]]:
    """(compiled, fused) settings to run every peer under, from --compile and --fused."""
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    fused = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.fused]
    return [(c, f) for c in compiled for f in fused]


def label(name: str, compiled: bool, fused: bool | None, args: argparse.Namespace) -> str:
    """The peer's name, plus the settings that vary in this run."""
    out = name
    if args.compile == "both" and compiled:
        out += " +compile"
    if args.fused == "both":
        out += " fused" if fused else " unfused"
    return out


def build(name: str, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Peer:
    """A fresh peer holding lmlab's initial weights `state`."""
    if name == "lmlab":
        peer = build_lmlab(cfg)
        peer.model.load_state_dict(state)
        return peer
    src = Transformer(cfg)
    src.load_state_dict(state)
    builder = build_transformers if name == "transformers" else build_litgpt
    try:
        return builder(cfg, src)
    except ImportError as e:
        raise UsageError(
            f"peer {name} needs its package ({e}); install it (docs/benchmarks.md) or "
            "leave it out with --peers"
        ) from None


def median_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of time(slow) / time(fast): how many times faster `fast` ran."""
    return round(statistics.median(a / b for a, b in zip(slow, fast, strict=True)), 3)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    dtype = parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    spec = MODELS[args.model]
    cfg = ModelConfig(**spec["model"])
    seq = args.seq or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise UsageError(f"--seq {seq}: at most {cfg.max_seq_len} for --model {args.model}")
    batch = args.batch or spec["batch"]

    def train_config(compiled: bool, fused: bool | None) -> TrainConfig:
        return TrainConfig(
            batch_size=batch,
            seq_len=seq,
            max_steps=args.steps,
            precision=args.dtype,
            device=args.device,
            compile=compiled,
            fused=fused,
        )

    torch.manual_seed(args.seed)
    state = Transformer(cfg).state_dict()
    runs: list[tuple[str, bool, bool | None]] = [
        (name, c, f) for c, f in variants(args) for name in args.peers
    ]
    peers: list[Peer] = []
    for name, compiled, fused in runs:
        p = build(name, cfg, state)
        p.name = label(name, compiled, fused, args)
        p.model.to(device).train()
        p.runner = torch.compile(p.model) if compiled else p.model
        p.step = make_step(p, train_config(compiled, fused), device, args.dtype)
        peers.append(p)
    counts = {p.name: n_params(p.model) for p in peers}
    lm_params = counts[peers[0].name]
    for name, n in counts.items():
        if abs(n - lm_params) > 0.01 * lm_params:
            raise RuntimeError(f"{name} has {n:,} parameters, lmlab {lm_params:,}")

    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(4):
        tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        batches.append(Batch(tok[:, :-1], tok[:, 1:]).to(device))

    t0 = time.perf_counter()
    for p in peers:  # every first step: the same weights, the same batch
        p.first_loss = p.step(batches[0])
    ref = peers[0]
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for p in peers:
        if not math.isclose(p.first_loss, ref.first_loss, rel_tol=tol):
            raise RuntimeError(
                f"first loss: {p.name} {p.first_loss:.6f}, {ref.name} {ref.first_loss:.6f}"
            )
    for i in range(args.warmup):
        for p in peers:
            p.step(batches[(i + 1) % len(batches)])
    sync(device)
    log(f"first step + {args.warmup} warm-up step(s) each: {time.perf_counter() - t0:.1f} s")

    per_round = [
        args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)
    ]
    tokens_per_step = batch * seq
    k = 0
    for r, n in enumerate(per_round):
        shift = r % len(peers)  # who goes first rotates, so no one always follows a warm cache
        for p in peers[shift:] + peers[:shift]:
            sync(device)
            t1 = time.perf_counter()
            for j in range(n):
                p.step(batches[(k + j) % len(batches)])
            sync(device)
            p.seconds.append(time.perf_counter() - t1)
        k += n
        rates = ", ".join(f"{p.name} {n * tokens_per_step / p.seconds[-1]:,.0f}" for p in peers)
        log(f"round {r + 1}/{args.rounds} ({n} steps), tokens/s: {rates}")

    loop_tps = None
    if args.loop_check:
        c, f = variants(args)[0]
        loop_tps = loop_rate(cfg, state, batches, train_config(c, f), args.warmup + 1, args.steps)
        log(f"lmlab's train(): {loop_tps:,.0f} tokens/s over {args.steps} steps")

    peak = peak_flops(device, dtype, measure=args.measure_peak)
    fpt = cfg.flops_per_token(seq, training=True)
    by_label = {p.name: p for p in peers}
    results: dict[str, dict] = {}
    for (name, compiled, fused), p in zip(runs, peers, strict=True):
        tps = args.steps * tokens_per_step / sum(p.seconds)
        r = {
            "peer": name,
            "compiled": compiled,
            "fused_adamw": fused,
            "params": counts[p.name],
            "tokens_per_s": round(tps, 1),
            "round_tokens_per_s": [
                round(n * tokens_per_step / s, 1) for n, s in zip(per_round, p.seconds, strict=True)
            ],
            "step_ms": round(1000 * sum(p.seconds) / args.steps, 1),
            "mfu": round(mfu(tps, fpt, peak), 4),
            "first_loss": round(p.first_loss, 6),
        }
        # the same steps in each round, so a time ratio is a speed ratio
        lm = by_label[label("lmlab", compiled, fused, args)]
        if p is not lm:
            r["lmlab_speedup"] = median_ratio(p.seconds, lm.seconds)
            r["lmlab_speedup_rounds"] = [
                round(a / b, 3) for a, b in zip(p.seconds, lm.seconds, strict=True)
            ]
        if compiled and args.compile == "both":
            r["compile_speedup"] = median_ratio(
                by_label[label(name, False, fused, args)].seconds, p.seconds
            )
        if fused and args.fused == "both":
            r["fused_speedup"] = median_ratio(
                by_label[label(name, compiled, False, args)].seconds, p.seconds
            )
        results[p.name] = r
    if loop_tps is not None:
        results[peers[0].name]["train_loop_tokens_per_s"] = round(loop_tps, 1)
    return {
        "command": " ".join(["python benchmarks/train_throughput.py", *sys.argv[1:]]),
        "machine": {**machine(), "load_avg_1min_end": round(os.getloadavg()[0], 2)},
        "device": str(device),
        "dtype": args.dtype,
        "model": args.model,
        "config": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "ffn_hidden": cfg.ffn_hidden,
            "vocab": cfg.padded_vocab_size,
            "seq_len": seq,
            "batch": batch,
            "tokens_per_step": tokens_per_step,
            "flops_per_token": fpt,
        },
        "options": {
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "compile": args.compile,
            "fused": args.fused,
        },
        "peak": {
            "flops": peak.flops,
            "source": peak.source,
            "detail": peak.detail,
            "device_name": peak.device_name,
        },
        "results": results,
    }


def table(report: dict) -> str:
    """The report as a markdown table, with the peak it was measured against."""
    res, peak = report["results"], report["peak"]
    scale, unit = (1e12, "TFLOP/s") if peak["flops"] >= 1e12 else (1e9, "GFLOP/s")
    extra = [k for k in ("compile_speedup", "fused_speedup") if any(k in r for r in res.values())]
    heads = {"compile_speedup": "torch.compile speed-up", "fused_speedup": "fused AdamW speed-up"}
    lines = [
        f"{report['model']}, {report['dtype']} on {peak['device_name']}; peak "
        f"{peak['flops'] / scale:,.1f} {unit} ({peak['source']}: {peak['detail']}); "
        f"{report['config']['flops_per_token'] / 1e6:,.1f} MFLOPs per trained token",
        "",
        "| run | params | tokens/s | ms/step | MFU | first loss | lmlab speed-up |"
        + "".join(f" {heads[k]} |" for k in extra),
        "|---|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for name, r in res.items():
        ratio = f"{r['lmlab_speedup']:.3f}×" if "lmlab_speedup" in r else "—"
        cells = "".join(f" {r[k]:.3f}× |" if k in r else " — |" for k in extra)
        lines.append(
            f"| {name} | {r['params']:,} | {r['tokens_per_s']:,.0f} | {r['step_ms']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['first_loss']:.4f} | {ratio} |{cells}"
        )
    loop = next(iter(res.values())).get("train_loop_tokens_per_s")
    if loop is not None:
        lines.append(f"\nlmlab's train() itself: {loop:,.0f} tokens/s")
    lines.append("\nspeed-ups are medians over rounds of the paired time ratios")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        report = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.out, report)
    print(table(report))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

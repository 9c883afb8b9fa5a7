"""Cost and latency estimates: what a model costs to train and to serve on given hardware.

Deployment is decided as much by cost and latency as by quality (Yang et al. §5). The
numbers here are roofline lower bounds: a step cannot finish before its arithmetic has run
at the device's peak FLOP/s, nor before the bytes it must read have crossed the memory bus
at the peak bandwidth. FLOPs, parameters and KV-cache bytes come from the one accounting in
`lmlab.model.info` (`lmlab model info`), never a second one, so the two commands agree.
`measure` times lmlab's own prefill and decode so a report can show how far above the bound
a real run lands. docs/cost.md has the formulas and what the bounds leave out.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig
from lmlab.model.info import accounting

# Bytes per weight (and per cached key/value: a KV cache quantized alike) at each precision.
PRECISIONS: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
# Which peak the arithmetic runs at: int4 weights are unpacked to int8 or 16-bit for the
# math, and int8 is the faster of the two, so using it keeps the bound a lower bound.
COMPUTE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8", "int4": "int8"}

TERA, GB = 1e12, 1e9
DEFAULT_TOKENS = "default: 20 per parameter, Hoffmann et al."


@dataclass(frozen=True)
class Hardware:
    """A device's peak dense FLOP/s per arithmetic precision, memory bandwidth (bytes/s) and
    memory size (bytes; None if unknown), and where the numbers come from."""

    name: str
    flops: dict[str, float]
    bandwidth: float
    memory: float | None
    source: str
    detail: dict[str, str] = field(default_factory=dict)

    def peak(self, precision: str) -> float:
        """FLOP/s for a precision's arithmetic. A precision the device lacks fast units for
        (int8 on some cards) falls back to the fastest 16-bit figure, the rate its math then
        runs at."""
        kind = COMPUTE[precision]
        if kind in self.flops:
            return self.flops[kind]
        sixteen = [self.flops[k] for k in ("bf16", "fp16") if k in self.flops]
        return max(sixteen or self.flops.values())


def _gpu(name: str, tf: dict[str, float], tb_s: float, mem_gb: float, src: str) -> Hardware:
    return Hardware(name, {k: v * TERA for k, v in tf.items()}, tb_s * 1e12, mem_gb * GB, src)


# Vendor data sheets, dense figures (the "with sparsity" ones are 2× these): bf16/fp16 and
# int8 on tensor cores, fp32 on CUDA cores (not TF32); bandwidth and memory as printed (TB/s,
# GB). Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5 and PCIe columns), NVIDIA H200
# datasheet, NVIDIA A100 datasheet (80GB SXM: 2,039 GB/s; 40GB SXM: 1,555 GB/s), NVIDIA L4
# datasheet, NVIDIA Ada Lovelace architecture whitepaper appendix (GeForce RTX 4090: FP16/BF16
# tensor with FP32 accumulate 165.2 dense, INT8 660.6 dense, 82.6 fp32, 1,008 GB/s).
ACCELERATORS: dict[str, Hardware] = {
    "h200": _gpu(
        "NVIDIA H200 SXM",
        {"bf16": 989.0, "fp16": 989.0, "int8": 1979.0, "fp32": 67.0},
        4.8,
        141,
        "NVIDIA H200 datasheet",
    ),
    "h100-sxm": _gpu(
        "NVIDIA H100 SXM5 80GB",
        {"bf16": 989.0, "fp16": 989.0, "int8": 1979.0, "fp32": 67.0},
        3.35,
        80,
        "NVIDIA H100 datasheet, SXM",
    ),
    "h100-pcie": _gpu(
        "NVIDIA H100 PCIe 80GB",
        {"bf16": 756.0, "fp16": 756.0, "int8": 1513.0, "fp32": 51.0},
        2.0,
        80,
        "NVIDIA H100 datasheet, PCIe",
    ),
    "a100-80gb": _gpu(
        "NVIDIA A100 SXM 80GB",
        {"bf16": 312.0, "fp16": 312.0, "int8": 624.0, "fp32": 19.5},
        2.039,
        80,
        "NVIDIA A100 datasheet, 80GB SXM",
    ),
    "a100-40gb": _gpu(
        "NVIDIA A100 SXM 40GB",
        {"bf16": 312.0, "fp16": 312.0, "int8": 624.0, "fp32": 19.5},
        1.555,
        40,
        "NVIDIA A100 datasheet, 40GB SXM",
    ),
    "l4": _gpu(
        "NVIDIA L4",
        {"bf16": 121.0, "fp16": 121.0, "int8": 242.5, "fp32": 30.3},
        0.3,
        24,
        "NVIDIA L4 datasheet",
    ),
    "rtx-4090": _gpu(
        "NVIDIA GeForce RTX 4090",
        {"bf16": 165.2, "fp16": 165.2, "int8": 660.6, "fp32": 82.6},
        1.008,
        24,
        "NVIDIA Ada Lovelace architecture whitepaper",
    ),
}


# --- this machine, measured --------------------------------------------------------------


def this_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_BANDWIDTH: dict[str, float] = {}


def measure_bandwidth(device: str | torch.device = "cpu", mib: int | None = None) -> float:
    """Memory bandwidth in bytes/s: the best of a few timings of reading a tensor far larger
    than any cache (a sum: bytes once) and of copying it (bytes read + written). The best is
    kept, and so the bound built on it stays below what a real run can reach."""
    dev = torch.device(device)
    if str(dev) in _BANDWIDTH:
        return _BANDWIDTH[str(dev)]
    mib = mib or (1024 if dev.type == "cuda" else 256)
    x = torch.ones(mib * 2**18, device=dev)  # float32: 4 bytes
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    best = 0.0
    for _ in range(4):
        for work, moved in ((lambda: x.sum(), nbytes), (lambda: y.copy_(x), 2 * nbytes)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            work()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = max(best, moved / (time.perf_counter() - t0))
    _BANDWIDTH[str(dev)] = best
    return best


def _memory_size(dev: torch.device) -> float | None:
    if dev.type == "cuda":
        return float(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return None


def this_machine(precision: str = "fp32", device: str | torch.device | None = None) -> Hardware:
    """This machine's peak matmul FLOP/s and memory bandwidth, measured in a few seconds.

    The FLOP/s are `lmlab.train.mfu.peak_flops`: a known GPU's data-sheet figure, else the
    best large matmul here. On a CPU 16-bit and integer math is not faster than fp32 unless
    it has matrix units; the fp32 figure stands for them unless a small 16-bit matmul is
    faster (the larger of the two keeps the bound a lower bound)."""
    from lmlab.train.mfu import measure_peak_flops, peak_flops

    check_precision(precision)
    dev = torch.device(device) if device is not None else this_device()
    fp32 = peak_flops(dev, torch.float32)
    flops = {"fp32": fp32.flops}
    detail = {"fp32": f"{fp32.source}: {fp32.detail}"}
    if precision != "fp32":
        if dev.type == "cuda":
            p16 = peak_flops(dev, torch.bfloat16)
            f16, how = p16.flops, f"{p16.source}: {p16.detail}"
        else:
            f16 = measure_peak_flops(dev, torch.bfloat16, size=512, reps=2, warmup=1)
            how = "best 512×512 bf16 matmul"
            if f16 < fp32.flops:
                f16, how = fp32.flops, "the fp32 figure (bf16 matmul is slower here)"
        for k in ("bf16", "fp16", "int8"):
            flops[k], detail[k] = f16, how
    bw = measure_bandwidth(dev)
    detail["bandwidth"] = "best of sum and copy of a large float32 tensor"
    return Hardware(f"this machine ({fp32.device_name})", flops, bw, _memory_size(dev),
                    "measured", detail)  # fmt: skip


def hardware(name: str, precision: str = "bf16") -> Hardware:
    """A named accelerator from `ACCELERATORS`, or "this" (measured here)."""
    if name == "this":
        return this_machine(precision)
    if name not in ACCELERATORS:
        raise UsageError(f"hardware {name!r}: allowed 'this' or one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]


# --- a catalog entry as a config ------------------------------------------------------------

_TOKENS_RE = re.compile(r"([\d.]+)\s*([MBT])\s+tokens", re.IGNORECASE)


def catalog_config(name: str) -> tuple[ModelConfig, float | None, str]:
    """A catalog model (`lmlab.guide.catalog`) as (config, training tokens or None, note).

    The surveys give a size, not a shape: the entry's own preset at that size where the
    catalog links one, else a decoder-only llama-like shape. The training tokens are the
    entry's pre-training data where it is stated as a token count."""
    from lmlab.guide.catalog import find, load_catalog
    from lmlab.model.info import config_of

    entry = find(load_catalog(), name)
    if entry.size_b is None:
        raise UsageError(f"catalog entry {entry.name!r} states no size; give a preset and --size")
    preset = entry.preset or "llama"
    cfg = config_of(preset, f"{entry.size_b:g}B")
    m = _TOKENS_RE.search(entry.pretrain_data or "")
    tokens = float(m.group(1)) * {"M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()] if m else None
    note = f"{entry.name}: {entry.size_b:g}B parameters from the catalog, shaped as preset {preset}"
    if tokens is not None:
        note += f"; training tokens from its pre-training data ({entry.pretrain_data})"
    return cfg, tokens, note


# --- estimates ---------------------------------------------------------------------------


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Workload:
    """Requests of `prompt_tokens` in and `output_tokens` out, served `batch` at a time."""

    prompt_tokens: int = 512
    output_tokens: int = 128
    requests: int = 1000
    batch: int = 1

    def __post_init__(self) -> None:
        for key in ("prompt_tokens", "output_tokens", "requests", "batch"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")


def forward_flops(cfg: ModelConfig) -> Callable[[int], float]:
    """t ↦ `cfg.flops_per_token(t, training=False)`, from a few calls: the accounting is
    affine in the context t on either side of a sliding window, so sums over thousands of
    positions stay exact and cheap."""
    f = lambda t: cfg.flops_per_token(t, training=False)  # noqa: E731
    w = cfg.sliding_window
    lo1, lo2 = f(1), f(2)
    if not w:
        return lambda t: lo1 + (t - 1) * (lo2 - lo1)
    at_w, after = f(w), f(w + 1)
    return lambda t: lo1 + (t - 1) * (lo2 - lo1) if t <= w else at_w + (t - w) * (after - at_w)


def _sum_forward(cfg: ModelConfig, f: Callable[[int], float], lo: int, hi: int) -> float:
    """Σ f(t) for t in [lo, hi], affine piece by piece (trapezoids are exact)."""
    w = cfg.sliding_window
    pieces = [(lo, w), (w + 1, hi)] if w and lo <= w < hi else [(lo, hi)]
    return sum((b - a + 1) * (f(a) + f(b)) / 2 for a, b in pieces if b >= a)


def streamed_params(cfg: ModelConfig) -> int:
    """Parameters a decode step must read: the body (active experts only) and the LM head.
    An untied input embedding is only looked up (a row per token), not streamed."""
    return cfg.num_params(embeddings=False, active=True) + cfg.padded_vocab_size * cfg.d_model


def estimate(
    cfg: ModelConfig,
    workload: Workload,
    hw: Hardware,
    precision: str = "bf16",
    train_tokens: float | None = None,
    mfu: float = 0.4,
    price_per_hour: float | None = None,
) -> dict[str, Any]:
    """Training cost and serving latency bounds for a model, workload and device."""
    check_precision(precision)
    if train_tokens is not None and train_tokens < 0:
        raise UsageError(f"train-tokens must be >= 0, got {train_tokens}")
    if not 0 < mfu <= 1:
        raise UsageError(f"mfu must be in (0, 1], got {mfu}")
    if price_per_hour is not None and price_per_hour < 0:
        raise UsageError(f"price-per-hour must be >= 0, got {price_per_hour}")
    wl, wb = workload, PRECISIONS[precision]
    p, o, b = wl.prompt_tokens, wl.output_tokens, wl.batch
    context = p + o
    info = accounting(cfg, context)  # what `lmlab model info --seq-len P+O --json` reports
    params = info["parameters"]
    peak, bw = hw.peak(precision), hw.bandwidth
    kv_token = cfg.kv_cache_bytes_per_token(1) * wb  # bytes per token of context
    weights_read = streamed_params(cfg) * wb
    f = forward_flops(cfg)

    # Prefill: every prompt position attends to the ones before it (causal), so its FLOPs
    # are Σ f(t) for t = 1..P; only the last position needs the LM head's logits.
    head = 2 * cfg.padded_vocab_size * cfg.d_model
    pre_flops = b * (_sum_forward(cfg, f, 1, p) - (p - 1) * head)
    pre_bytes = weights_read + b * p * kv_token  # weights once, the prompt's keys/values out
    pre_compute, pre_memory = pre_flops / peak, pre_bytes / bw

    # Decode: the prefill gave the first token; step j = 1..O-1 feeds one token per row at
    # context P+j, reading the weights once and every row's cache of P+j-1 tokens.
    steps = []
    for j in range(1, o):
        c = p + j
        steps.append(max(b * f(c) / peak, (weights_read + b * (c - 1) * kv_token) / bw))
    decode_s = sum(steps)
    first = (b * f(p + 1) / peak, (weights_read + b * p * kv_token) / bw)
    batch_s = max(pre_compute, pre_memory) + decode_s
    batches = math.ceil(wl.requests / b)
    total_s = batches * batch_s

    tokens = float(train_tokens if train_tokens is not None else 20 * params)
    train_peak = hw.peak("fp32" if precision == "fp32" else "bf16")
    # training sequences fill the model's context: `lmlab model info`'s default
    train_per_token = accounting(cfg)["training_flops_per_token"]
    train_flops = tokens * train_per_token
    memory = {
        name: {
            "weights_bytes": params * nb,
            "kv_cache_bytes": b * context * cfg.kv_cache_bytes_per_token(1) * nb,
        }
        for name, nb in PRECISIONS.items()
    }
    for row in memory.values():
        row["total_bytes"] = row["weights_bytes"] + row["kv_cache_bytes"]
        row["fits"] = None if hw.memory is None else row["total_bytes"] <= hw.memory
    out: dict[str, Any] = {
        "model": {"config": cfg.to_dict(), **info},
        "workload": asdict(wl),
        "hardware": {**asdict(hw), "peak_flops": peak, "precision": precision},
        "memory": memory,
        "training": {
            "tokens": tokens,
            "tokens_default": None if train_tokens is not None else DEFAULT_TOKENS,
            "context": cfg.max_seq_len,
            "flops_per_token": train_per_token,
            "flops": train_flops,
            "flops_6nd": 6 * params * tokens,
            "mfu": mfu,
            "peak_flops": train_peak,
            "seconds": train_flops / (train_peak * mfu),
        },
        "prefill": {
            "flops": pre_flops,
            "bytes": pre_bytes,
            "compute_s": pre_compute,
            "memory_s": pre_memory,
            "bound_s": max(pre_compute, pre_memory),
            "bound": "compute" if pre_compute >= pre_memory else "memory",
        },
        "decode": {
            "steps": o - 1,
            "first_step_compute_s": first[0],
            "first_step_memory_s": first[1],
            "step_bound_s": decode_s / len(steps) if steps else 0.0,
            "bound": "compute" if first[0] >= first[1] else "memory",
            "tokens_per_s_bound": b * len(steps) / decode_s if steps else None,
            "total_s": decode_s,
        },
        "totals": {
            "batches": batches,
            "batch_s": batch_s,
            "seconds": total_s,
            "seconds_per_1000": total_s * 1000 / wl.requests,
            "output_tokens_per_s": wl.requests * o / total_s,
        },
        "notes": [],
    }
    if price_per_hour is not None:
        out["totals"]["price_per_hour"] = price_per_hour
        out["totals"]["cost"] = total_s / 3600 * price_per_hour
        out["totals"]["cost_per_1000"] = out["totals"]["cost"] * 1000 / wl.requests
        out["training"]["cost"] = out["training"]["seconds"] / 3600 * price_per_hour
    if context > cfg.max_seq_len:
        out["notes"].append(
            f"prompt + output ({context}) exceeds the model's context ({cfg.max_seq_len})"
        )
    if memory[precision]["fits"] is False:
        out["notes"].append(f"weights + KV cache at {precision} exceed the device's memory")
    return out


# --- measured ---------------------------------------------------------------------------


def model_precision(model: torch.nn.Module) -> str:
    """The precision a loaded model's weights are at. Quantized layers count as int4, the
    smallest lmlab writes, so a bound computed from it stays a lower bound."""
    if any(t.dtype in (torch.int8, torch.uint8) for t in model.buffers()):
        return "int4"
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def measure(
    model: torch.nn.Module,
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    batch: int = 1,
    repeats: int = 3,
    hw: Hardware | None = None,
) -> dict[str, Any]:
    """lmlab's prefill time and decode step time for `model` here (the best of `repeats`
    after a warm-up, `lmlab bench infer`'s timing), beside the bounds for the same workload
    on this machine, measured: ratios ≥ 1 are how far above the roofline lmlab runs."""
    from lmlab.infer.bench import bench_infer

    cfg = model.cfg
    prompt_tokens = min(prompt_tokens, cfg.max_seq_len - new_tokens)
    if prompt_tokens < 1:
        raise UsageError(f"measure: the model's context ({cfg.max_seq_len}) is too short")
    precision = model_precision(model)
    hw = hw or this_machine(precision, next(model.parameters()).device)
    run = bench_infer(model, [batch], prompt_tokens, new_tokens, repeats)
    row = run["results"][0]
    wl = Workload(prompt_tokens, new_tokens, 1, batch)
    bound = estimate(cfg, wl, hw, precision)
    prefill_s = batch * prompt_tokens / row["prefill_tokens_per_s"]
    step_s = batch / row["decode_tokens_per_s"]
    return {
        "device": run["device"],
        "threads": run["threads"],
        "precision": precision,
        "workload": asdict(wl),
        "prefill_s": prefill_s,
        "prefill_bound_s": bound["prefill"]["bound_s"],
        "prefill_ratio": prefill_s / bound["prefill"]["bound_s"],
        "decode_step_s": step_s,
        "decode_tokens_per_s": row["decode_tokens_per_s"],
        "decode_step_bound_s": bound["decode"]["step_bound_s"],
        "decode_ratio": step_s / bound["decode"]["step_bound_s"],
        "hardware": {"name": hw.name, "flops": hw.peak(precision), "bandwidth": hw.bandwidth},
    }


# --- text --------------------------------------------------------------------------------


def _num(x: float, unit: str = "") -> str:
    if abs(x) >= 1e21:
        return f"{x:.3g} {unit}".rstrip()
    for s, d in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= d:
            return f"{x / d:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    units = (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60), ("s", 1))
    for unit, div in (*units, ("ms", 1e-3)):
        if s >= div:
            return f"{s / div:.3g} {unit}"
    return f"{s * 1e6:.3g} µs"


def format_estimate(r: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    """The report as plain text (what `lmlab guide cost` prints)."""
    m, wl, hw, tr = r["model"], r["workload"], r["hardware"], r["training"]
    pre, dec, tot = r["prefill"], r["decode"], r["totals"]
    prec = hw["precision"]
    lines = [
        f"model: {_num(m['parameters'])} parameters, forward "
        f"{_num(m['forward_flops_per_token'], 'FLOP')}/token at context {m['context']}, KV cache "
        f"{_bytes(m['kv_cache_bytes_per_token_16bit'])}/token (16-bit)",
        f"hardware: {hw['name']} ({hw['source']}): {_num(hw['peak_flops'], 'FLOP/s')} "
        f"{prec} peak, {_num(hw['bandwidth'], 'B/s')} memory bandwidth"
        + (f", {_bytes(hw['memory'])}" if hw["memory"] else ""),
        f"workload: {wl['requests']} requests × {wl['prompt_tokens']} prompt + "
        f"{wl['output_tokens']} output tokens, batch {wl['batch']}, weights at {prec}",
        "",
        "memory (weights + KV cache for one batch at full context):",
    ]
    for name, row in r["memory"].items():
        fits = "" if row["fits"] is None else ("  fits" if row["fits"] else "  does not fit")
        lines.append(
            f"  {name:>5}: weights {_bytes(row['weights_bytes']):>10}, KV "
            f"{_bytes(row['kv_cache_bytes']):>10}, total {_bytes(row['total_bytes']):>10}{fits}"
        )
    lines += [
        "",
        f"training (context {tr['context']}): {_num(tr['tokens'])} tokens"
        + (f" ({tr['tokens_default']})" if tr["tokens_default"] else "")
        + f" × {_num(tr['flops_per_token'], 'FLOP')}/token = {_num(tr['flops'], 'FLOP')} "
        f"(6ND: {_num(tr['flops_6nd'], 'FLOP')}); at {tr['mfu']:.0%} MFU: "
        f"{_time(tr['seconds'])} on one device"
        + (f", cost {tr['cost']:,.2f}" if "cost" in tr else ""),
        f"prefill bound: {_time(pre['bound_s'])} per batch ({pre['bound']}-bound: compute "
        f"{_time(pre['compute_s'])}, memory {_time(pre['memory_s'])})",
        f"decode bound: {_time(dec['step_bound_s'])} per step ({dec['bound']}-bound), "
        + (
            f"{dec['tokens_per_s_bound']:,.0f} tokens/s at most"
            if dec["tokens_per_s_bound"]
            else "no decode steps"
        ),
        f"total bound: {_time(tot['seconds'])} for {wl['requests']} requests "
        f"({_time(tot['seconds_per_1000'])} per 1,000)"
        + (
            f", cost {tot['cost']:,.2f} ({tot['cost_per_1000']:,.4f} per 1,000)"
            if "cost" in tot
            else ""
        ),
    ]
    if measured:
        mw = measured["workload"]
        lines += [
            "",
            f"measured here ({measured['device']}, {measured['threads']} threads, "
            f"{measured['precision']}; prompt {mw['prompt_tokens']}, {mw['output_tokens']} new, "
            f"batch {mw['batch']}):",
            f"  prefill {_time(measured['prefill_s'])} vs bound "
            f"{_time(measured['prefill_bound_s'])}: {measured['prefill_ratio']:.1f}× the bound",
            f"  decode {_time(measured['decode_step_s'])}/step vs bound "
            f"{_time(measured['decode_step_bound_s'])}: {measured['decode_ratio']:.1f}× the bound",
        ]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)

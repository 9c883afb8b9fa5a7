"""`lmlab bench infer`: how fast a checkpoint reads a prompt and writes tokens here.

Prefill (the whole prompt in one pass) is compute-bound and reported in tokens/s; decode
(one token per row per step against the KV cache) is memory-bound at small batch, so it
is reported per batch size, with the per-step latency a user waits for each token.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from lmlab.errors import UsageError
from lmlab.infer.engine import Runner


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def tensor_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0, compile: bool = False
) -> dict:
    """One timed run: prefill `batch` random prompts, then `new_tokens` greedy steps
    (through the compiled decode step with `compile`)."""
    cfg = model.cfg
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise UsageError(
            f"bench: prompt-len {prompt_len} + new-tokens {new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    runner = Runner(model, new_tokens, compile=compile)
    device = runner.device
    _sync(device)
    t0 = time.perf_counter()
    logits = runner.prefill(prompts)
    _sync(device)
    t1 = time.perf_counter()
    steps = []
    for _ in range(new_tokens - 1):  # the prefill already gave the first token
        s = time.perf_counter()
        logits = runner.step(logits.argmax(-1))
        _sync(device)
        steps.append(time.perf_counter() - s)
    decode_s = sum(steps)
    kv = runner.cache.nbytes()
    return {
        "batch": batch,
        "prefill_tokens_per_s": batch * prompt_len / (t1 - t0),
        "prefill_s": t1 - t0,
        "decode_tokens_per_s": batch * len(steps) / decode_s if steps else 0.0,
        "latency_ms_p50": 1000 * statistics.median(steps) if steps else 0.0,
        "latency_ms_p90": 1000 * sorted(steps)[int(0.9 * (len(steps) - 1))] if steps else 0.0,
        "kv_cache_mb": kv / 2**20,
    }


def bench_infer(
    model,
    batches: list[int],
    prompt_len: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    compile: bool = False,
) -> dict:
    """The best of `repeats` runs per batch size (after one warm-up run, which compiles
    the decode step with `compile`: its time is reported as `warmup_s`), plus memory."""
    if any(b < 1 for b in batches) or prompt_len < 1 or new_tokens < 2 or repeats < 1:
        raise UsageError("bench: need batch >= 1, prompt-len >= 1, new-tokens >= 2, repeats >= 1")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for b in batches:
        t0 = time.perf_counter()  # warm-up: allocator, kernels, caches, compilation
        measure(model, b, min(prompt_len, 8), 4, compile=compile)
        warmup_s = time.perf_counter() - t0
        runs = [
            measure(model, b, prompt_len, new_tokens, seed=i, compile=compile)
            for i in range(repeats)
        ]
        best = max(runs, key=lambda r: r["decode_tokens_per_s"])
        best["prefill_tokens_per_s"] = max(r["prefill_tokens_per_s"] for r in runs)
        best["warmup_s"] = warmup_s
        rows.append(best)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_mb": tensor_bytes(model) / 2**20,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compiled": compile,
        "results": rows,
        "peak_memory_mb": peak_memory_mb(device),
    }


def format_bench(report: dict) -> str:
    head = (
        f"{report['params'] / 1e6:.1f}M params, {report['dtype']}, {report['device']}, "
        f"{report['threads']} threads; prompt {report['prompt_len']}, "
        f"{report['new_tokens']} new tokens; weights {report['weights_mb']:.1f} MiB, "
        f"peak memory {report['peak_memory_mb']:.0f} MiB"
    )
    if report.get("compiled"):
        warm = ", ".join(f"{r['warmup_s']:.0f} s" for r in report["results"])
        head += f"; compiled decode step (warm-up, compile included: {warm})"
    lines = [
        head,
        "",
        "| batch | prefill tok/s | decode tok/s | latency p50 ms | p90 ms | KV cache MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} "
            f"| {r['latency_ms_p50']:.2f} | {r['latency_ms_p90']:.2f} | {r['kv_cache_mb']:.1f} |"
        )
    return "\n".join(lines)


# --- where a decode step's time goes -----------------------------------------------------

# Operator names (torch profiler keys) by what they do in a decode step; the first group
# whose pattern is in the name wins. Anything else is "other ops".
OP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "matmul",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::matmul",
            "aten::linear",
            "quantized::linear",
            "_weight_int8pack_mm",
            "aten::_int_mm",
        ),
    ),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("KV cache", ("aten::copy_", "aten::index_put", "aten::slice_scatter", "aten::index_copy")),
    ("argmax / sampling", ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial")),
    (
        "norms, activations, rotary",
        (
            "aten::mul",
            "aten::add",
            "aten::rsqrt",
            "aten::pow",
            "aten::mean",
            "aten::silu",
            "aten::gelu",
            "aten::neg",
            "aten::cat",
            "aten::div",
            "aten::sub",
            "aten::aminmax",
            "aten::addcmul",
            "aten::rms_norm",
            "aten::layer_norm",
            "aten::sigmoid",
        ),
    ),
)


def _group(name: str) -> str:
    for group, patterns in OP_GROUPS:
        if any(p in name for p in patterns):
            return group
    return "other ops"


@torch.no_grad()
def profile_decode(model, batch: int = 1, prompt_len: int = 64, steps: int = 16) -> dict:
    """Where a greedy decode step's time goes: torch profiler self-times of the operators
    over `steps` steps after a warm-up, in groups (matmul, attention, KV cache, ...), and
    the rest of the wall time as Python and dispatch (the framework's own overhead)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.cfg
    if prompt_len + steps + 4 > cfg.max_seq_len or batch < 1 or steps < 1:
        raise UsageError(
            f"profile: need batch >= 1, steps >= 1 and prompt-len + steps + 4 <= "
            f"max_seq_len ({cfg.max_seq_len})"
        )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    runner = Runner(model, steps + 4)
    logits = runner.prefill(prompts)
    for _ in range(3):  # warm-up: allocator, packed weights, caches
        logits = runner.step(logits.argmax(-1))
    acts = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    _sync(runner.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.step(logits.argmax(-1))
        _sync(runner.device)
        wall = time.perf_counter() - t0
    ops: dict[str, dict] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total <= 0:
            continue
        ops[e.key] = {"self_ms": e.self_cpu_time_total / 1000 / steps, "calls": e.count / steps}
    groups: dict[str, float] = {}
    for name, o in ops.items():
        groups[_group(name)] = groups.get(_group(name), 0.0) + o["self_ms"]
    step_ms = 1000 * wall / steps
    profiled = sum(groups.values())
    # The profiler's own bookkeeping inflates self-times a little; never report negative.
    groups["Python and dispatch"] = max(0.0, step_ms - profiled)
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])[:12]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "step_ms": step_ms,
        "op_calls_per_step": sum(o["calls"] for o in ops.values()),
        "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": k, **v} for k, v in top],
    }


def format_profile(p: dict) -> str:
    lines = [
        f"decode step, batch {p['batch']}, {p['threads']} threads: {p['step_ms']:.2f} ms "
        f"(over {p['steps']} steps), {p['op_calls_per_step']:.0f} operator calls per step",
        "",
        "| where | ms/step | share |",
        "|---|---:|---:|",
    ]
    total = p["step_ms"] or 1.0
    for g, ms in p["groups"].items():
        lines.append(f"| {g} | {ms:.2f} | {100 * ms / total:.0f}% |")
    lines += ["", "| operator | self ms/step | calls/step |", "|---|---:|---:|"]
    for o in p["top_ops"]:
        lines.append(f"| {o['op']} | {o['self_ms']:.3f} | {o['calls']:.0f} |")
    return "\n".join(lines)


# --- how many threads ----------------------------------------------------------------------


@torch.no_grad()
def choose_threads(
    model, candidates: list[int] | None = None, batch: int = 1, steps: int = 8
) -> tuple[int, dict[int, float]]:
    """The intra-op thread count whose greedy decode steps run fastest here, now, and the
    median step time (ms) of each candidate.

    Measured rather than assumed: on a machine whose cores are busy with other work, more
    threads than free cores make each step wait for the slowest (2 threads on a loaded
    2-core machine were seen to run far slower than 1). Candidates default to 1, 2, 4, …
    up to the cores this process may use. The previous thread count is restored."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if candidates is None:
        candidates, n = [], 1
        while n <= (cores or 1):
            candidates.append(n)
            n *= 2
        if (cores or 1) not in candidates:
            candidates.append(cores or 1)
    if not candidates or any(c < 1 for c in candidates):
        raise UsageError(f"threads: candidates must be >= 1, got {candidates}")
    before = torch.get_num_threads()
    cfg = model.cfg
    prompt = min(16, max(1, cfg.max_seq_len - 2 * steps - 4))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).tolist()
    timings: dict[int, float] = {}
    try:
        for rnd in range(2):  # two interleaved rounds: a burst of load hits both counts
            for n in candidates:
                torch.set_num_threads(n)
                runner = Runner(model, steps + 4)
                logits = runner.step(runner.prefill(prompts).argmax(-1))  # warm-up step
                times = []
                for _ in range(steps):
                    s = time.perf_counter()
                    logits = runner.step(logits.argmax(-1))
                    _sync(runner.device)
                    times.append(1000 * (time.perf_counter() - s))
                med = statistics.median(times)
                timings[n] = med if rnd == 0 else min(timings[n], med)
    finally:
        torch.set_num_threads(before)
    return min(timings, key=lambda n: timings[n]), timings


def apply_threads(spec: str | int | None, model, log=None) -> int:
    """Set torch's intra-op threads from a `--threads` value: None keeps torch's default,
    a number sets it, `auto` measures (`choose_threads`) and says what it found."""
    if spec is None:
        return torch.get_num_threads()
    if str(spec).strip().lower() == "auto":
        n, timings = choose_threads(model)
        torch.set_num_threads(n)
        if log is not None:
            shown = ", ".join(f"{k}: {v:.1f} ms" for k, v in timings.items())
            log(f"threads: {n} (decode step by thread count, measured now: {shown})")
        return n
    try:
        n = int(spec)
    except ValueError:
        raise UsageError(f"--threads {spec!r}: a number of threads, or auto") from None
    if n < 1:
        raise UsageError(f"--threads {spec!r}: must be >= 1")
    torch.set_num_threads(n)
    return n

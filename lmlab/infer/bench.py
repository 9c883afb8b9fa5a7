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
def measure(model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """One timed run: prefill `batch` random prompts, then `new_tokens` greedy steps."""
    cfg = model.cfg
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise UsageError(
            f"bench: prompt-len {prompt_len} + new-tokens {new_tokens} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    runner = Runner(model, new_tokens)
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
    kv = runner.cache.k.numel() * runner.cache.k.element_size() * 2
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
) -> dict:
    """The best of `repeats` runs per batch size (after one warm-up run), plus memory."""
    if any(b < 1 for b in batches) or prompt_len < 1 or new_tokens < 2 or repeats < 1:
        raise UsageError("bench: need batch >= 1, prompt-len >= 1, new-tokens >= 2, repeats >= 1")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for b in batches:
        measure(model, b, min(prompt_len, 8), 4)  # warm-up: allocator, kernels, caches
        runs = [measure(model, b, prompt_len, new_tokens, seed=i) for i in range(repeats)]
        best = max(runs, key=lambda r: r["decode_tokens_per_s"])
        best["prefill_tokens_per_s"] = max(r["prefill_tokens_per_s"] for r in runs)
        rows.append(best)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_mb": tensor_bytes(model) / 2**20,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
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

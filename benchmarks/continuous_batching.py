"""Serving throughput: the continuous-batching scheduler on the paged KV cache versus
running the same requests one by one with `lmlab.infer.generate.generate`, in one process.

Why: one decode step of a small model is dominated by fixed per-forward costs (kernel
launches, Python, reading every weight once), so serving requests one at a time leaves
the hardware idle; continuous batching shares each weight read across every running
sequence, and its paged cache holds only the blocks sequences really use.

The workload: 16 concurrent greedy requests with mixed prompt lengths and output budgets
(seeded), on a ~10M-parameter LLaMA-style model (lmlab's own random init: the model's
quality does not change the arithmetic). Rounds alternate the two peers so that other
load on the machine hits both alike; each figure is the median over rounds. Both peers
must give the same tokens (greedy, fp32): the table says how many of the 16 agree.

Run: `python benchmarks/continuous_batching.py` (CPU, fp32); `--shared-prefix 64` gives
every prompt the same 64-token system prompt (prefix caching); `--n-blocks` shrinks the
cache to exercise preemption; `--device cuda` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from lmlab.infer.generate import generate
from lmlab.infer.options import GenerationConfig
from lmlab.infer.paged import PagedKVCache
from lmlab.infer.scheduler import Scheduler
from lmlab.model import ModelConfig, Transformer
from lmlab.train.mfu import device_name
from lmlab.utils import write_json

# the llama-10m shapes of benchmarks/train_throughput.py: pre-RMSNorm, RoPE, SwiGLU, tied
MODEL = dict(vocab_size=8192, n_layers=4, d_model=384, n_heads=6, max_seq_len=256)


def workload(
    n: int, seed: int, prompt_range: tuple[int, int], new_range: tuple[int, int], shared: int
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1, MODEL["vocab_size"]) for _ in range(shared)]
    prompts = [
        system + [rng.randrange(1, MODEL["vocab_size"]) for _ in range(rng.randint(*prompt_range))]
        for _ in range(n)
    ]
    # within max_seq_len: past it `generate` drops prompt tokens, the scheduler stops early
    news = [min(rng.randint(*new_range), MODEL["max_seq_len"] - len(p)) for p in prompts]
    return prompts, news


def one_by_one(model, prompts, news) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = [
        generate(model, p, GenerationConfig(max_new_tokens=m))
        for p, m in zip(prompts, news, strict=True)
    ]
    return time.perf_counter() - t0, out


def batched(model, prompts, news, args) -> tuple[float, list[list[int]], Scheduler]:
    sched = Scheduler(
        model,
        n_blocks=args.n_blocks,
        block_size=args.block_size,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
    )
    cfgs = [GenerationConfig(max_new_tokens=m) for m in news]
    t0 = time.perf_counter()
    out = sched.run(prompts, cfgs)
    return time.perf_counter() - t0, out, sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--new-tokens", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--shared-prefix", type=int, default=0, help="a common system prompt")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--n-blocks", type=int, default=None, help="default: no preemption")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(**MODEL)
    model = Transformer(cfg).to(args.device).eval()
    prompts, news = workload(
        args.requests, args.seed, args.prompt_len, args.new_tokens, args.shared_prefix
    )
    print(
        f"{device_name(args.device)} ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32"
    )
    print(
        f"model: {cfg.num_params() / 1e6:.1f}M parameters ({cfg.n_layers}×{cfg.d_model}, "
        f"{cfg.n_heads} heads, vocab {cfg.vocab_size}); {args.requests} requests, prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens (shared prefix "
        f"{args.shared_prefix}), outputs {min(news)}-{max(news)} tokens, {sum(news)} in all"
    )
    # warm-up: allocator, thread pool, RoPE tables
    one_by_one(model, prompts[:2], [4, 4])
    batched(model, prompts[:4], [4] * 4, args)

    seconds: dict[str, list[float]] = {"generate": [], "scheduler": []}
    for r in range(args.rounds):
        order = ["generate", "scheduler"] if r % 2 == 0 else ["scheduler", "generate"]
        for peer in order:
            if peer == "generate":
                dt, ref = one_by_one(model, prompts, news)
            else:
                dt, out, sched = batched(model, prompts, news, args)
            seconds[peer].append(dt)
    tokens = {"generate": sum(map(len, ref)), "scheduler": sum(map(len, out))}
    same = sum(a == b for a, b in zip(out, ref, strict=True))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    tps = {k: tokens[k] / v for k, v in med.items()}
    st = sched.stats
    block = PagedKVCache.block_bytes(cfg, args.block_size, torch.float32)
    dense = sum(len(p) + m for p, m in zip(prompts, news, strict=True)) * block / args.block_size
    static = args.requests * cfg.max_seq_len * block / args.block_size
    print()
    print("| peer | seconds (median) | tokens/s | vs one by one |")
    print("|---|---|---|---|")
    print(f"| generate, one by one | {med['generate']:.2f} | {tps['generate']:,.0f} | 1.00x |")
    ratio = tps["scheduler"] / tps["generate"]
    print(
        f"| scheduler, continuous batching | {med['scheduler']:.2f} | "
        f"{tps['scheduler']:,.0f} | {ratio:.2f}x |"
    )
    print()
    print(
        f"outputs identical: {same}/{len(ref)}; scheduler: {st.steps} steps, {st.forwards} "
        f"forwards, peak batch {st.peak_batch}, {st.preemptions} preemptions, prefix-cache "
        f"hits {st.prefix_hit_tokens} tokens, peak {st.peak_blocks_used} blocks of "
        f"{args.block_size} = {st.peak_blocks_used * block / 2**20:.1f} MiB KV "
        f"(a static batch holding every request's full length to the end "
        f"{dense / 2**20:.1f} MiB; reserving max_seq_len per request {static / 2**20:.1f} MiB)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "device": device_name(args.device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "args": vars(args),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tps,
                "ratio": ratio,
                "identical": same,
                "stats": vars(st),
            },
        )
        print(json.dumps({"ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()

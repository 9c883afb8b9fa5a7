"""DPO with the reference's log-probs cached (computed once before training, lmlab's
default) against a live reference (a frozen copy of the model scoring every batch, what
DPO trainers usually do): peak memory and time per step, on the same pairs and steps.

Why: the cache removes a whole second model from memory and a forward per step; this
measures how much that is on a real model. Each mode runs in a fresh process (its peak
RSS is its own); the reference pass of the cached mode is timed separately, since it is
paid once per run.

Run: `python benchmarks/dpo_reference.py --model smollm2-135m-instruct --steps 8`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from lmlab.adapt.dpo import DPOConfig, align_dpo
from lmlab.train.loop import TrainConfig
model, data, out, mode, steps, bs, seq = sys.argv[1:8]
cfg = TrainConfig(batch_size=int(bs), seq_len=int(seq), lr=1e-6, max_steps=int(steps),
                  warmup_steps=0, log_every=1, eval_every=1000, checkpoint_every=1000,
                  keep_best=False)
t0 = time.perf_counter()
align_dpo(model, [data], out, DPOConfig(reference=mode, heldout=0.0), cfg)
total = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"total_s": total, "peak_rss_mib": int(hwm) / 1024}))
"""


def write_pairs(path: Path, n: int) -> None:
    topics = ["the sea", "a bicycle", "bread", "winter", "a library", "rain", "music", "a bridge"]
    with open(path, "w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            rec = {
                "prompt": f"Write one sentence about {t}.",
                "chosen": f"Here is a sentence about {t}: it is worth a closer look.",
                "rejected": "No.",
            }
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data, args.pairs)
        rows = {}
        for mode in ("cached", "live"):
            out = Path(tmp) / mode
            argv = [args.model, str(data), str(out), mode, str(args.steps), str(args.batch_size),
                    str(args.seq_len)]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True
            )
            if proc.returncode:
                sys.exit(f"{mode}: failed\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            steps = [x for x in lines if "reward_margin" in x and "val_loss" not in x]
            step_s = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / max(len(steps) - 1, 1)
            rows[mode] = {**res, "step_s": step_s, "wall_s": time.perf_counter() - t0}
    print(f"model {args.model}, {args.pairs} pairs, {args.steps} steps of {args.batch_size} pairs")
    print("| reference | peak RSS MiB | s/step | run s (with load) |")
    print("|---|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_rss_mib']:,.0f} | {r['step_s']:.2f} | {r['total_s']:.1f} |")
    c, live = rows["cached"], rows["live"]
    print(f"cached / live: memory {c['peak_rss_mib'] / live['peak_rss_mib']:.2f}x, "
          f"step time {c['step_s'] / live['step_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

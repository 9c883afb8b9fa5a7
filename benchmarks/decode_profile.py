"""Where a greedy decode step's time goes, for a 10M-parameter Llama-style model and for
SmolLM2-135M-Instruct, in float32 and (SmolLM2) w8a8: `lmlab.infer.bench.profile_decode`
tables at batch 1 and 8, the thread count `--threads auto` picks, and the un-profiled step
time beside the profiled one (the profiler's own cost).

The 10M model is randomly initialised (`llama` preset, 8,192-token vocabulary): a step's
cost does not depend on what the weights learned. w8a8 is calibrated on random token ids
here, which is enough to time it (its quality is `benchmarks/int8_decode.py`'s subject).

Run: `python benchmarks/decode_profile.py --json profile.json` (a few minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import machine

from lmlab import load_model
from lmlab.infer.bench import choose_threads, format_profile, measure, profile_decode
from lmlab.model.encdec import build_model
from lmlab.model.presets import resolve_model
from lmlab.model.quant import quantize_model


def models(which: list[str]) -> dict[str, torch.nn.Module]:
    out = {}
    if "10m" in which:
        cfg = resolve_model(
            {"preset": "llama", "size": "10M", "vocab_size": 8192, "max_seq_len": 512}
        )
        torch.manual_seed(0)
        out["10M fp32"] = build_model(cfg).eval()
    if "smollm2" in which:
        smol = load_model("smollm2-135m-instruct").eval()
        out["SmolLM2 fp32"] = smol
        g = torch.Generator().manual_seed(0)
        cal = [torch.randint(0, smol.cfg.vocab_size, (1, 256), generator=g) for _ in range(4)]
        q = quantize_model(copy.deepcopy(smol), "w8a8", include_lm_head=True, calibration=cal)
        out["SmolLM2 w8a8 +head"] = q
    return out


def unprofiled_step_ms(model, batch: int, prompt: int, steps: int) -> float:
    runs = [measure(model, batch, prompt, steps + 1, seed=i) for i in range(3)]
    return statistics.median(r["latency_ms_p50"] for r in runs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["10m", "smollm2"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", default="auto", help="a number, or auto (measured per model)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report = {"runs": []}
    for name, model in models(args.models).items():
        if args.threads == "auto":
            n, timings = choose_threads(model)
        else:
            n, timings = int(args.threads), {}
        torch.set_num_threads(n)
        for b in args.batches:
            p = profile_decode(model, b, args.prompt_len, args.steps)
            p["model"], p["thread_timings_ms"] = name, timings
            p["unprofiled_step_ms"] = unprofiled_step_ms(model, b, args.prompt_len, args.steps)
            report["runs"].append(p)
            print(f"\n## {name}, batch {b}")
            if timings:
                shown = ", ".join(f"{k}: {v:.1f} ms" for k, v in timings.items())
                print(f"threads by measurement: {n} ({shown})")
            print(f"un-profiled step: {p['unprofiled_step_ms']:.2f} ms")
            print(format_profile(p))
    report["machine"] = machine()
    report["when"] = time.strftime("%Y-%m-%d %H:%M")
    print("\n" + report["machine"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

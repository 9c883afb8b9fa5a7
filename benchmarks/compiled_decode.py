"""Eager against compiled decoding (`GenerationConfig(compile=True)`), lmlab engines only:
each model decodes greedily eager and compiled, all engines alternating round by round
so a busy machine slows them alike; best of `--repeats` rounds after a warm-up round
(which compiles). A lighter companion to `int8_decode.py --compile`, which adds
transformers, llama.cpp and perplexity.

Run: `python benchmarks/compiled_decode.py --models smollm2-135m-instruct W8A8_DIR
--json compiled.json` (W8A8_DIR from `lmlab quantize smollm2-135m-instruct --method w8a8
--include-lm-head --outliers 0 --calibration calib.txt`; ~5 minutes on 2 cores, most of
it compiling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _machine import machine
from infer_throughput import lmlab_generate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from lmlab import load_model

    torch.set_num_threads(args.threads)
    models = {name: load_model(name).eval() for name in args.models}
    engines = [(name, c) for c in (False, True) for name in models]
    rows = []
    for batch in args.batches:
        prompts = [[100 + (i * 7 + j) % 1000 for j in range(args.prompt_len)] for i in range(batch)]
        best: dict[tuple[str, bool], float] = {}
        first: dict[tuple[str, bool], float] = {}
        tokens: dict[tuple[str, bool], list] = {}
        for rnd in range(args.repeats + 1):
            for name, compiled in engines:
                t0 = time.perf_counter()
                r = lmlab_generate(models[name], prompts, args.new_tokens, compiled)
                if rnd == 0:
                    first[(name, compiled)] = time.perf_counter() - t0
                    tokens[(name, compiled)] = r.tokens
                else:
                    best[(name, compiled)] = max(best.get((name, compiled), 0.0), r.decode_tps)
                print(f"\rbatch {batch} round {rnd} {name} {compiled}   ", end="", file=sys.stderr)
        print(file=sys.stderr)
        for name in models:
            e, c = best[(name, False)], best[(name, True)]
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "eager_tps": e,
                    "compiled_tps": c,
                    "speedup": c / e,
                    "first_call_s": first[(name, True)],
                    "same_tokens": tokens[(name, True)] == tokens[(name, False)],
                }
            )
    rep = {"machine": machine(), "config": vars(args) | {"json": None}, "results": rows}
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    print("| model | batch | eager tok/s | compiled tok/s | × | first call s | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['eager_tps']:.1f} | {r['compiled_tps']:.1f} | "
            f"{r['speedup']:.2f}× | {r['first_call_s']:.0f} | {r['same_tokens']} |"
        )
    print(
        f"\n{rep['machine']}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"best of {args.repeats}"
    )


if __name__ == "__main__":
    main()

"""Decode throughput of a real model: lmlab fp32 and INT8 against transformers, one process.

`benchmarks/infer_throughput.py` times random-weight models of set sizes; this times any
model `lmlab.load_model` reads (a checkpoint, a run, a GGUF file, a store name such as
`smollm2-135m-instruct`), with its own tokenizer, on real text, reusing that script's
timing code (the same Run/Engine/rounds, the same prefill/decode split, best of
`--repeats` rounds after a warm-up, rotating order). Engines:

- lmlab fp32: `generate_batch` on the model, greedy, no stop ids.
- lmlab INT8: the same on `--int8 DIR`, a checkpoint written by
  `lmlab quantize MODEL --method int8 --out DIR` (optional).
- transformers fp32: the same weights (the GGUF file through `gguf_file=`, or an lmlab
  checkpoint exported with `export_to_hf`), `generate(do_sample=False,
  min_new_tokens=N, max_new_tokens=N)`, sdpa attention, no EOS.
- transformers dynamic INT8 (`--hf-dynamic-int8`): that model after
  `torch.ao.quantization.quantize_dynamic` of its Linear layers (int8 weights, activations
  quantized per step): the nearest CPU INT8 transformers has.

Prompts: `--batch` rows cut from Python standard-library sources, each tokenized and
truncated to `--prompt-len` tokens (equal lengths, so nobody pads).

    python benchmarks/real_model_decode.py --model runs/smol --int8 runs/smol-int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_throughput import (  # noqa: E402
    Engine,
    hf_generate,
    lmlab_generate,
    machine,
    play,
    stdlib_texts,
    summarize,
)

from lmlab import load_model, load_tokenizer  # noqa: E402
from lmlab.model.hf import export_to_hf  # noqa: E402
from lmlab.model.loading import resolve_checkpoint  # noqa: E402


def hf_model(path: Path, tmp: Path):
    """transformers' fp32 model of the same weights, with no EOS (every row runs N steps)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path.suffix == ".gguf":
        where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    else:
        where = dict(pretrained_model_name_or_path=str(export_to_hf(path, tmp / "hf")))
    model = AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0  # never used: no row ends early, no padding
    return model.eval()


def prompts(tok, batch: int, length: int) -> list[list[int]]:
    rows = []
    for text in stdlib_texts(2_000_000):
        ids = tok.encode(text[:20_000]).ids
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == batch:
            return rows
    raise SystemExit(f"not {batch} texts of {length} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any lmlab model path")
    ap.add_argument("--int8", type=Path, help="its `lmlab quantize --method int8` checkpoint")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-dynamic-int8", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    src = resolve_checkpoint(args.model)
    tok = load_tokenizer(args.model)
    models = {"lmlab": ("lmlab", "fp32", load_model(args.model))}
    if args.int8:
        models["lmlab int8"] = ("lmlab int8", "int8", load_model(args.int8))
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(src, Path(tmp))
    models["transformers"] = ("transformers", "fp32", hf)
    if args.hf_dynamic_int8:
        import copy

        dq = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(hf), {torch.nn.Linear}, dtype=torch.qint8
        )
        models["transformers dynamic int8"] = ("transformers", "int8 dynamic", dq)
    params = sum(p.numel() for p in models["lmlab"][2].parameters())
    mach = machine(torch.get_num_threads())
    print(
        f"{src} ({params / 1e6:.1f}M parameters); {mach['cpu']}, {mach['cores']} cores, "
        f"torch {mach['torch']} on {args.threads} threads, transformers {mach['transformers']}"
        f"; load average {load0:.2f}"
    )
    out = []
    new = args.new_tokens
    for b in [int(x) for x in args.batches.split(",")]:
        ps = prompts(tok, b, args.prompt_len)
        engines = []
        for name, (kind, precision, m) in models.items():
            gen = hf_generate if kind == "transformers" else lmlab_generate
            engines.append(Engine(name, kind, precision, lambda m=m, g=gen, ps=ps: g(m, ps, new)))
        print(f"batch {b}: prompt {args.prompt_len}, {new} new tokens")
        play(engines, args.repeats, print)
        rows = [summarize(e, engines[0].warmup.tokens) for e in engines]
        out.append({"batch": b, "results": rows})
    print(
        f"\nload average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"best of {args.repeats} rounds after a warm-up; greedy, fp32 KV cache everywhere"
    )
    print(
        "| batch | engine | weights | prefill tok/s | decode tok/s | ms/step (p50) "
        "| ÷ transformers fp32 | ÷ lmlab fp32 | tokens = lmlab fp32's |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---|")
    for block in out:
        rs = block["results"]
        ref_hf = next(r for r in rs if r["engine"] == "transformers")["decode_tokens_per_s"]
        ref_lm = next(r for r in rs if r["engine"] == "lmlab")["decode_tokens_per_s"]
        for r in rs:
            a = r.get("agreement_with_lmlab")
            agree = (
                "—"
                if a is None
                else f"{a['rows_equal']}/{a['rows']}"
                + ("" if a["rows_equal"] == a["rows"] else f" (from step {a['first_difference']})")
            )
            d = r["decode_tokens_per_s"]
            print(
                f"| {block['batch']} | {r['engine']} | {r['precision']} | "
                f"{r['prefill_tokens_per_s']:,.0f} | {d:,.1f} | {r['step_ms_p50']:.1f} | "
                f"{d / ref_hf:.2f}× | {d / ref_lm:.2f}× | {agree} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "model": str(src), "cpu": out}) + "\n")


if __name__ == "__main__":
    main()

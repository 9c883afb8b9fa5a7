"""INT8 that decodes faster than float32, without breaking the model: perplexity change and
decode tokens/s side by side, on SmolLM2-135M-Instruct (or any lmlab-loadable model).

Engines, each greedy, no stop ids, the same real prompts, alternating round by round so a
busy machine slows them alike (best of `--repeats` rounds):
- `transformers fp32`: the model exported with `export_to_hf`, `LlamaForCausalLM` (SDPA).
- `lmlab fp32`: `generate_batch` on the float model.
- `lmlab int8`: weight-only per-channel int8 (`lmlab quantize --method int8`).
- `lmlab w8a8 …`: `--method w8a8` (FBGEMM int8 × int8, per-token activations, SmoothQuant
  smoothing α, N input channels per layer in float), with and without the output head.
- `… compiled` (`--compile`): lmlab fp32 and each w8a8 engine decoding through the
  torch.compile'd decode step (`GenerationConfig.compile`); the warm-up round compiles, and
  its time per batch size is reported as `first_call_s`.
- `llama.cpp f32 / q8_0` (`--llama-cpp`, needs `llama-cpp-python`): the same checkpoint
  exported with `export_gguf`, batched through llama.cpp's low-level API, f32 KV cache;
  and the package's own Q4_1 file. With `--compile`, each runs in a process of its own
  (see `llama_cpp_process`). Speed only (no llama.cpp perplexity here).

`--isolate`: every engine decodes in a process of its own that holds only its model, as a
user's `lmlab chat` or `generate` would (`EngineProcess`); the w8a8 engines are rebuilt
there from the same calibration statistics, so their weights are the ones measured for
perplexity. Rounds still alternate between engines. Without it, every lmlab and
transformers engine shares the benchmark's process (before `call_with_stack_room`, the
compiled w8a8 step ran as slowly as eager there in most runs: docs/benchmarks.md).

Perplexity: the held-out text is Python's library documentation (python3.11-doc), every
10th page from the 6th, html-to-text; calibration uses every 10th page from the first, so
the two never overlap. Windows of 512 tokens, the same for every engine.
Greedy agreement: the tokens of each lmlab engine against transformers fp32's, position
by position (the share equal before the first difference, over all rows).

Run: `python benchmarks/int8_decode.py --json int8.json` (about 15 minutes on 2 cores);
smoke: `--eval-tokens 1024 --new-tokens 8 --repeats 1 --batches 1`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine, peak_rss_mib
from infer_throughput import (
    EngineProcess,
    LlamaCppBatch,
    build_hf,
    hf_generate,
    llama_cpp_process,
    lmlab_generate,
    serve_jobs,
)

DOCS = "/usr/share/doc/python3.11/html/library"
QTYPES = ("f32", "q8_0")


def doc_text(pages: list[Path]) -> str:
    from lmlab.data.keywords import HtmlConfig, html_to_text

    return "\n\n".join(html_to_text(p.read_text(errors="replace"), HtmlConfig())[0] for p in pages)


@torch.no_grad()
def perplexity(model, ids: list[int], window: int, hf: bool = False) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        x = torch.tensor(ids[i : i + window + 1])[None]
        if x.shape[1] < 2:
            break
        out = model(x[:, :-1])
        lg = out.logits if hf else out
        nll += F.cross_entropy(lg[0].float(), x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    """Share of positions equal to the reference before each row's first difference."""
    same = total = 0
    for a, b in zip(tokens, ref, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))
        same, total = same + k, total + len(b)
    return same / total


def build_engine(fp, recipe: tuple, stats: dict | None):
    """The lmlab engine a recipe names, from the float model (changed in place):
    ("fp32",), ("int8",) or ("w8a8", include_lm_head, outliers, alpha)."""
    from lmlab.model.quant import quantize_model

    if recipe[0] == "fp32":
        return fp
    if recipe[0] == "int8":
        return quantize_model(fp, "int8")
    _, head, k, alpha = recipe
    return quantize_model(
        fp, "w8a8", include_lm_head=head, calibration=stats, alpha=alpha, outliers=k
    )


def _lmlab_worker(conn, model: str, recipe: tuple, stats, threads: int, compile: bool) -> None:
    from lmlab import load_model

    torch.set_num_threads(threads)
    m = build_engine(load_model(model).eval(), recipe, stats)
    serve_jobs(conn, lambda prompts, new: lmlab_generate(m, prompts, new, compile))


def _hf_worker(conn, hf_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    hf = build_hf(Path(hf_dir), torch.device("cpu"), torch.float32)
    serve_jobs(conn, lambda prompts, new: hf_generate(hf, prompts, new))


def run(args) -> dict:
    from lmlab import load_model, load_tokenizer
    from lmlab.model.hf import export_to_hf
    from lmlab.model.loading import as_checkpoint, resolve_checkpoint
    from lmlab.model.quant import w8a8_kernel_works

    torch.set_num_threads(args.threads)
    pages = sorted(Path(args.docs).glob("*.html"))
    if len(pages) < 20:
        sys.exit(f"{args.docs}: needs the python3.11-doc pages (apt install python3.11-doc)")
    tok = load_tokenizer(args.model)
    calib = tok.encode(doc_text(pages[0::10]), add_special_tokens=False).ids[: args.calib_tokens]
    held = tok.encode(doc_text(pages[5::10]), add_special_tokens=False).ids[: args.eval_tokens]
    fp = load_model(args.model).eval()
    window = min(512, fp.cfg.max_seq_len)
    calib_batches = [
        torch.tensor(calib[i : i + window])[None] for i in range(0, len(calib), window)
    ]

    from lmlab.model.quant import activation_absmax, quantizable

    names = quantizable(fp, include_lm_head=True)
    t0 = time.perf_counter()
    stats = activation_absmax(fp, names, calib_batches)
    calib_s = time.perf_counter() - t0
    recipes = {"lmlab fp32": ("fp32",), "lmlab int8": ("int8",)}
    for head in (False, True):
        for k in args.outliers:
            recipes[f"lmlab w8a8 o{k}{' +head' if head else ''}"] = ("w8a8", head, k, args.alpha)
    engines: dict[str, object] = {
        name: build_engine(fp if r == ("fp32",) else copy.deepcopy(fp), r, stats)
        for name, r in recipes.items()
    }

    compiled = set()
    if args.compile:
        for name in [n for n in engines if n != "lmlab int8"]:
            engines[f"{name} compiled"] = engines[name]
            compiled.add(f"{name} compiled")

    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    src = resolve_checkpoint(args.model)
    llama = {}
    with as_checkpoint(src, scratch=tmp) as ckpt:
        hf = build_hf(export_to_hf(ckpt, tmp / "hf"), torch.device("cpu"), torch.float32)
        if args.llama_cpp:
            from lmlab.infer.gguf import export_gguf, load_llama_cpp

            files = {f"llama.cpp {q}": export_gguf(ckpt, tmp / f"{q}.gguf", q) for q in QTYPES}
            if str(src).endswith(".gguf"):
                files["llama.cpp (the package's file)"] = src
            per_seq = args.prompt_len + args.new_tokens
            for name, f in files.items():
                if args.compile or args.isolate:  # see llama_cpp_process
                    llama[name] = llama_cpp_process(f, args.threads, max(args.batches), per_seq)
                    continue
                llm = load_llama_cpp(f, n_threads=args.threads, type_k=0, type_v=0, verbose=False)
                llama[name] = LlamaCppBatch(llm, max(args.batches), per_seq)

    procs: dict[str, EngineProcess] = {}
    if args.isolate:  # one process per engine, each holding only its model
        print("starting one process per engine", file=sys.stderr)
        procs["transformers fp32"] = EngineProcess(
            _hf_worker, str(tmp / "hf"), args.threads, name="transformers fp32"
        )
        for name in engines:
            recipe = recipes[name.removesuffix(" compiled")]
            procs[name] = EngineProcess(
                _lmlab_worker,
                args.model,
                recipe,
                stats if recipe[0] == "w8a8" else None,
                args.threads,
                name in compiled,
                name=name,
            )

    results: dict[str, dict] = {}
    print(f"perplexity on {len(held):,} held-out tokens (windows of {window})", file=sys.stderr)
    results["transformers fp32"] = {"perplexity": perplexity(hf, held, window, hf=True)}
    for name, m in engines.items():
        if name in compiled:  # the same weights: the same perplexity
            results[name] = dict(results[name.removesuffix(" compiled")])
            continue
        results[name] = {"perplexity": perplexity(m, held, window)}
        print(f"  {name}: {results[name]['perplexity']:.4f}", file=sys.stderr)
    base = results["lmlab fp32"]["perplexity"]
    for r in results.values():
        r["perplexity_change"] = r["perplexity"] / base - 1

    prompts_all = [
        held[i * 997 % (len(held) - args.prompt_len) :][: args.prompt_len]
        for i in range(max(args.batches))
    ]
    for batch in args.batches:
        prompts = prompts_all[:batch]
        best: dict[str, object] = {}
        ref_tokens = None
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for name in ["transformers fp32", *engines, *llama]:
                t0 = time.perf_counter()
                if name in procs:
                    r = procs[name].generate(prompts, args.new_tokens)
                elif name == "transformers fp32":
                    r = hf_generate(hf, prompts, args.new_tokens)
                elif name in llama:
                    r = llama[name].generate(prompts, args.new_tokens)
                else:
                    r = lmlab_generate(engines[name], prompts, args.new_tokens, name in compiled)
                if name == "transformers fp32":
                    ref_tokens = r.tokens
                elif rnd == 0 and name in engines:
                    first = results.setdefault(name, {}).setdefault("first_call_s", {})
                    first[str(batch)] = time.perf_counter() - t0
                if rnd and (name not in best or r.decode_tps > best[name].decode_tps):
                    best[name] = r
                print(
                    f"\rbatch {batch} round {rnd} {name}: {r.decode_tps:.1f} tok/s   ",
                    end="",
                    file=sys.stderr,
                )
        print(file=sys.stderr)
        hf_tps = best["transformers fp32"].decode_tps
        for name, r in best.items():
            row = results.setdefault(name, {}).setdefault("decode", {})
            row[str(batch)] = {
                "tokens_per_s": r.decode_tps,
                "vs_transformers": r.decode_tps / hf_tps,
                "step_ms_p50": r.step_ms_p50,
                "greedy_agreement": agreement(r.tokens, ref_tokens) if r.tokens else None,
            }
    for b in [*llama.values(), *procs.values()]:
        b.close()
    tmpdir.cleanup()
    return {
        "machine": machine("transformers", "llama_cpp_python"),
        "model": args.model,
        "threads": args.threads,
        "isolated": args.isolate,
        "fbgemm": w8a8_kernel_works(),
        "alpha": args.alpha,
        "calibration_tokens": len(calib),
        "calibration_s": calib_s,
        "eval_tokens": len(held),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "peak_rss_mib": peak_rss_mib(),
        "results": results,
    }


def table(rep: dict) -> str:
    batches = sorted({b for r in rep["results"].values() for b in r.get("decode", {})}, key=int)
    head = "| engine | perplexity | change | " + " | ".join(
        f"batch {b} tok/s | ×transformers | greedy same" for b in batches
    )
    lines = [head + " |", "|---" * (3 + 3 * len(batches)) + "|"]
    for name, r in rep["results"].items():
        if "perplexity" in r:
            cells = [name, f"{r['perplexity']:.3f}", f"{100 * r['perplexity_change']:+.2f}%"]
        else:
            cells = [name, "-", "-"]
        for b in batches:
            d = r.get("decode", {}).get(b)
            if d is None:
                cells += ["-", "-", "-"]
                continue
            agree = "-" if d["greedy_agreement"] is None else f"{100 * d['greedy_agreement']:.0f}%"
            cells += [f"{d['tokens_per_s']:.1f}", f"{d['vs_transformers']:.2f}×", agree]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{rep['machine']}; {rep['model']}, prompt {rep['prompt_len']}, {rep['new_tokens']} new "
        f"tokens, best of {rep['repeats']}"
        f"{'; each engine in a process of its own' if rep.get('isolated') else ''}; "
        f"perplexity on {rep['eval_tokens']:,} held-out tokens; "
        f"w8a8 α={rep['alpha']}, calibrated on {rep['calibration_tokens']:,} tokens "
        f"({rep['calibration_s']:.0f} s); FBGEMM kernel: {rep['fbgemm']}; "
        f"peak RSS {rep['peak_rss_mib']:,.0f} MiB"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--docs", default=DOCS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=12_288)
    ap.add_argument("--calib-tokens", type=int, default=16_384)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--outliers", type=int, nargs="+", default=[0, 32])
    ap.add_argument("--llama-cpp", action="store_true", help="add llama.cpp f32/q8_0 engines")
    ap.add_argument("--compile", action="store_true", help="add compiled-decode lmlab engines")
    ap.add_argument(
        "--isolate", action="store_true", help="each engine decodes in a process of its own"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path, help="print a saved result and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads(args.report.read_text())))
        return
    rep = run(args)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    print(table(rep))


if __name__ == "__main__":
    main()

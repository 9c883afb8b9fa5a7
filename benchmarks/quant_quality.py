"""Post-training quantization on a trained checkpoint: size, memory, speed and perplexity of
int8, int4 (groups of 32, 64, 128) and LLM.int8 against the full-precision model.

Why: the survey's §5.4 claim to check at our scale is that 8-bit weights cost almost no
perplexity and 4-bit groups a little, growing with the group size. Every method runs
`lmlab.infer.quantize.quantize_checkpoint`, the code behind `lmlab quantize`, so the table is
what a user gets. Run:

    python benchmarks/quant_quality.py runs/NAME/pretrain/model
    python benchmarks/quant_quality.py            # trains a tiny model for ~2 minutes first

Speeds are tokens/s at this process's thread count, the full-precision and quantized model
measured in alternating rounds (best of 3); perplexity is on the run's held-out tokens.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.errors import UsageError
from lmlab.infer.quantize import quantize_checkpoint
from lmlab.model.quant import int8_backend_name

CONFIGS = [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128), ("llm_int8", 64)]


def train_checkpoint(work: Path, minutes: float) -> Path:
    """`lmlab pretrain tiny` (the data, tokenizer and pretrain stages of `lmlab run`) for
    `minutes`, at the size of the `compare` recipe (4 layers × 128, 128-token context) so
    that two minutes are a few hundred steps; every group size divides its input dims."""
    sets = {
        "pretrain.max_minutes": minutes,
        "pretrain.seq_len": 128,
        "model.d_model": 128,
        "model.n_heads": 2,
        "model.max_seq_len": 128,
        "model.ffn_hidden": 384,
    }
    cmd = [sys.executable, "-m", "lmlab.cli", "pretrain", "tiny", "--name", "quantbench"]
    cmd += ["--runs-dir", str(work), "--quiet"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    print(f"training: lmlab {' '.join(cmd[3:])}", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout is for the table
    return work / "quantbench" / "pretrain" / "model"


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def row(method: str, group: int, r: dict) -> str:
    name = f"int4 g{group}" if method == "int4" else method
    ppl = r["perplexity"]
    if ppl["measured"]:
        change = f"{ppl['after']:.3f} ({100 * ppl['relative_change']:+.2f}%)"
    else:
        change = "not measured"
    q, disk = r["quantized_weight_bytes"], r["disk_bytes"]
    cells = [
        name,
        f"{mib(disk['after'])} (×{disk['after'] / disk['before']:.2f})",
        f"×{q['after'] / q['before']:.3f}",
        f"{r['weight_relative_error']:.4f}",
        f"{mib(r['memory_bytes']['after'])}",
        f"{r['forward_tokens_per_s']['after']:,.0f} (×{_ratio(r, 'forward_tokens_per_s')})",
        f"{r['decode_tokens_per_s']['after']:,.0f} (×{_ratio(r, 'decode_tokens_per_s')})",
        change,
    ]
    return "| " + " | ".join(cells) + " |"


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]['after'] / r[key]['before']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="lmlab checkpoint or run directory")
    ap.add_argument("--eval-data", help="token-shard directory (default: the run's val split)")
    ap.add_argument("--eval-tokens", type=int, default=50_000)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--train-minutes", type=float, default=2.0)
    ap.add_argument("--work", help="where to train and write quantized copies (default: temp)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="quantbench-"))
    src = Path(args.checkpoint) if args.checkpoint else train_checkpoint(work, args.train_minutes)

    rows, fp = [], None
    t0 = time.monotonic()
    for method, group in CONFIGS:
        try:
            r = quantize_checkpoint(
                src, work / f"{method}-g{group}", method, group_size=group,
                eval_tokens=args.eval_tokens, eval_data=args.eval_data,
                decode_tokens=args.decode_tokens, progress=False,
            )  # fmt: skip
        except UsageError as e:  # a group size that does not divide this model's dims
            rows.append(f"| int4 g{group} | n/a: {e} | | | | | | |")
            continue
        fp = fp or r
        rows.append(row(method, group, r))
    if fp is None:
        raise SystemExit("no method could quantize this checkpoint")
    ppl = fp["perplexity"]
    print(
        f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, int8 backend "
        f"{int8_backend_name()}; checkpoint {src} ({fp['parameters']:,} parameters, "
        f"{fp['quantized_parameters']:,} in {fp['modules']} quantized linears); "
        f"{time.monotonic() - t0:.0f} s"
    )
    base_ppl = f"{ppl['before']:.3f}" if ppl["measured"] else "not measured"
    where = f" on {ppl['tokens']:,} held-out tokens" if ppl["measured"] else f": {ppl['reason']}"
    print(
        f"\nfp32: weights file {mib(fp['disk_bytes']['before'])}, parameter memory "
        f"{mib(fp['memory_bytes']['before'])}, perplexity {base_ppl}{where}\n"
    )
    print(
        "| method | weights file | quantized matrices | weight error ‖W−Ŵ‖/‖W‖ | parameter memory "
        "| forward tok/s (× fp32) | decode tok/s (× fp32) | perplexity (change) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

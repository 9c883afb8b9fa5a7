"""Training-step throughput of fp32 versus bf16 autocast on this CPU, same model and batch.

Why: `precision: auto` picks bf16 only where the CPU has native bf16 matmuls; this is the
measurement behind that choice. Run: `python benchmarks/cpu_precision.py`.
"""

from __future__ import annotations

import platform
import time

import torch

from lmlab.model import ModelConfig, Transformer
from lmlab.model.precision import autocast, cpu_has_native_bf16
from lmlab.train.batch import Batch, token_cross_entropy

SHAPES = [(4, 256, 4, 256, 16), (6, 384, 6, 256, 8)]  # layers, width, heads, seq, batch


def step_time(model: Transformer, x: torch.Tensor, precision: str, steps: int = 4) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        with autocast(precision):
            out = token_cross_entropy(model, Batch(x, x))  # the training loop's objective
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    torch.manual_seed(0)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}"
    )
    print("| model | params | fp32 tok/s | bf16 tok/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for layers, width, heads, seq, batch in SHAPES:
        cfg = ModelConfig(
            vocab_size=4096, n_layers=layers, d_model=width, n_heads=heads, max_seq_len=seq
        )
        x = torch.randint(0, 4096, (batch, seq))
        tps = {p: batch * seq / step_time(Transformer(cfg), x, p) for p in ("fp32", "bf16")}
        print(
            f"| {layers}×{width} | {cfg.num_params() / 1e6:.1f}M | {tps['fp32']:,.0f} | "
            f"{tps['bf16']:,.0f} | {tps['bf16'] / tps['fp32']:.3f} |"
        )


if __name__ == "__main__":
    main()

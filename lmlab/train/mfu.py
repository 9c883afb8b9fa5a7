"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

MFU (Chowdhery et al. 2022, PaLM appendix B) counts only the FLOPs the model needs
(`ModelConfig.flops_per_token`), not recomputation or overheads, so it compares
implementations and machines on one scale. The peak is the vendor's dense (no sparsity)
tensor-core figure where the device name matches a known GPU, else a measurement: the
best of several large square matmuls on the device. A measured peak is what the BLAS
library reaches, not the silicon's theoretical maximum, so MFU against it reads higher.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import UsageError

# Dense (no sparsity) peak TFLOP/s by device-name pattern, from the vendors' data sheets:
# bf16/fp16 on tensor cores, fp32 on CUDA cores (no TF32). A dtype a card lacks (bf16 on
# V100/T4) is left out, so it falls back to a measurement. Patterns are tried in order,
# the specific ones first ("H100 PCIe" before "H100", "L40S" before "L4").
SPEC_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"GH200", "NVIDIA GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H200", "NVIDIA H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H100.*PCIe", "NVIDIA H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    (r"H100.*NVL", "NVIDIA H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H100|H800", "NVIDIA H100 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"B200", "NVIDIA B200", {"bf16": 2250.0, "fp16": 2250.0}),
    (r"A100|A800", "NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", "NVIDIA L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", "NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"V100", "NVIDIA V100", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "NVIDIA T4", {"fp16": 65.0, "fp32": 8.1}),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and where it came from (`source` is "spec" or "measured")."""

    flops: float
    source: str
    detail: str
    device_name: str


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r}: allowed {sorted(DTYPES)}")
    return DTYPES[name]


def device_name(device: str | torch.device) -> str:
    """The accelerator's marketing name, or the CPU model from /proc/cpuinfo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def spec_peak_flops(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """(FLOP/s, which row) for a known GPU name, or None (CPUs and unlisted GPUs)."""
    kind = next((k for k, v in DTYPES.items() if v == dtype), None)
    for pattern, label, table in SPEC_TFLOPS:
        if re.search(pattern, name) and kind in table:
            return table[kind] * 1e12, f"{label} {kind} dense"
    return None


_MEASURED: dict[tuple[str, torch.dtype, int, int], float] = {}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_peak_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    reps: int = 5,
    warmup: int = 2,
) -> float:
    """FLOP/s of the fastest of `reps` timings of an n×n @ n×n matmul (2n³ FLOPs each),
    after `warmup` untimed ones. Cached per (device, dtype, size, CPU threads) for the
    process: the answer is a property of the machine, and measuring costs seconds."""
    dev = torch.device(device)
    if size is None:
        size = 8192 if dev.type == "cuda" else 2048
    if size <= 0 or reps <= 0 or warmup < 0:
        raise UsageError(f"measure_peak_flops: size={size}, reps={reps}, warmup={warmup}")
    key = (str(dev), dtype, size, torch.get_num_threads() if dev.type == "cpu" else 0)
    if key in _MEASURED:
        return _MEASURED[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dev, dtype)
    b = torch.randn(size, size, generator=g).to(dev, dtype)
    # On a GPU one matmul takes ~1 ms, below the timer's resolution: time a burst.
    inner = 10 if dev.type == "cuda" else 1
    for _ in range(warmup):
        torch.mm(a, b)
    _sync(dev)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(dev)
        best = min(best, (time.perf_counter() - t0) / inner)
    flops = 2 * size**3 / best
    _MEASURED[key] = flops
    return flops


def peak_flops(
    device: str | torch.device,
    dtype: torch.dtype,
    measure: bool = False,
    size: int | None = None,
) -> Peak:
    """The spec peak where the device name matches a known GPU (unless `measure`), else the
    measured one (`size`: the matmul's n, see `measure_peak_flops`)."""
    name = device_name(device)
    spec = None if measure else spec_peak_flops(name, dtype)
    if spec is not None:
        return Peak(spec[0], "spec", spec[1], name)
    dev = torch.device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    flops = measure_peak_flops(dev, dtype, size=n)
    detail = f"best {n}×{n} {str(dtype).removeprefix('torch.')} matmul"
    if dev.type == "cpu":
        detail += f", {torch.get_num_threads()} threads"
    return Peak(flops, "measured", detail, name)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | Peak) -> float:
    """Model FLOPs utilisation: tokens/s × model FLOPs per token / peak FLOP/s."""
    p = peak.flops if isinstance(peak, Peak) else peak
    if not p > 0:
        raise UsageError(f"mfu: peak FLOP/s must be > 0, got {p}")
    if tokens_per_s < 0 or flops_per_token < 0:
        raise UsageError(
            f"mfu: tokens_per_s ({tokens_per_s}) and flops_per_token ({flops_per_token}) "
            "must be >= 0"
        )
    return tokens_per_s * flops_per_token / p

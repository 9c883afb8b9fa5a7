"""Numeric precision of a forward pass: `auto` resolved for the device, and the autocast
context for it. In the model layer because training, inference and evaluation all run
forwards under the same rule."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """`auto` becomes bf16 where the device computes it natively (fp16 on a CUDA device
    without bf16), else fp32; any other name is returned as given."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): without them, CPU bf16
    autocast is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(precision: str, device: torch.device | str = "cpu") -> AbstractContextManager:
    """`torch.autocast` to bf16 or fp16 as `precision` resolves, or a no-op for fp32."""
    kind = torch.device(device).type
    p = resolve_precision(precision, device)
    if p == "bf16":
        return torch.autocast(kind, dtype=torch.bfloat16)
    if p == "fp16":
        return torch.autocast(kind, dtype=torch.float16)
    return nullcontext()

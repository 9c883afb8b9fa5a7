"""What every benchmark records beside its numbers: the machine (CPU model, cores, SIMD
flags, versions) and a process's peak memory. The numbers mean nothing without them."""

from __future__ import annotations

import os
import platform
import resource
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def pkg(name: str) -> str | None:
    """An installed package's version, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of `FLAGS` it has."""
    cpu, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in FLAGS if f in have]
    except OSError:
        pass
    return cpu or platform.processor() or platform.machine(), flags


def machine(*packages: str) -> str:
    """One line: CPU, cores, SIMD flags, torch's threads and the named packages' versions."""
    import torch

    cpu, flags = cpu_and_flags()
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512"
    versions = "".join(f", {p} {pkg(p)}" for p in packages)
    return (
        f"{cpu}, {os.cpu_count()} cores ({', '.join(flags) or 'no AVX2'}; {avx512}), "
        f"torch {pkg('torch')} ({torch.get_num_threads()} threads){versions}, "
        f"Python {platform.python_version()}"
    )


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM). Not `ru_maxrss`: Linux carries that
    over an exec from the forking parent, so a child's figure would be at least the
    parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

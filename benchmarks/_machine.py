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


def run_and_report(args, run, report, *packages: str) -> None:
    """The tail every benchmark shares: with `--report FILE`, print an earlier run's
    tables; else set torch's threads (`args.threads`), record the machine, the command
    and the arguments, `run(args)`, write it all to `--json` and print the tables."""
    import json
    import shlex
    import sys
    import time

    if getattr(args, "report", None):
        report(json.loads(Path(args.report).read_text()))
        return
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    saved: dict = {
        "machine": machine(*packages),
        "command": f"python {' '.join(shlex.quote(a) for a in sys.argv)}",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    print(saved["machine"], flush=True)
    saved["results"] = run(args)
    saved["wall_s"] = time.perf_counter() - t
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(saved))
    print()
    report(saved)

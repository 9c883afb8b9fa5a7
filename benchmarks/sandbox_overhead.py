"""What the code sandbox costs per run: `run_code` on honest code that passes, in the
bubblewrap mode (the default) and the weak mode, beside the floor every run pays — a bare
`python -I` start of the same interpreter — in one process, rounds alternating so other
load on the machine hits every peer alike. Also `run_many` with 4 workers (per run).

Why: code evaluation (pass@k) and, later, tool use and code rewards run generated code in
a loop; the isolation must not make that loop slow.

Run: `python benchmarks/sandbox_overhead.py [--rounds 20]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from lmlab.prompt.sandbox import isolation_available, run_code, run_many

CODE = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def bare_python() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
    return time.perf_counter() - t0


def one_run(isolation: str) -> float:
    t0 = time.perf_counter()
    r = run_code(CODE, TESTS, isolation=isolation)
    assert r.passed, r
    return time.perf_counter() - t0


def many(isolation: str, n: int = 8) -> float:
    t0 = time.perf_counter()
    rs = run_many([(CODE, TESTS)] * n, workers=4, isolation=isolation)
    assert all(r.passed for r in rs), rs
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    ok, why = isolation_available()
    modes = ["os", "weak"] if ok else ["weak"]
    if not ok:
        print(f"bubblewrap cannot run here ({why}): weak mode only", file=sys.stderr)
    peers = {"python -I -c pass": bare_python}
    for m in modes:
        peers[f"run_code, {m}"] = lambda m=m: one_run(m)
        peers[f"run_many x4 workers, {m} (per run)"] = lambda m=m: many(m)
    times: dict[str, list[float]] = {k: [] for k in peers}
    for fn in peers.values():  # warm-up: page cache, bwrap binary
        fn()
    for _ in range(args.rounds):
        for name, fn in peers.items():
            times[name].append(fn())
    floor = statistics.median(times["python -I -c pass"])
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, Python {platform.python_version()}, {args.rounds} rounds, medians\n")
    print("| peer | median ms | min ms | vs bare python |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1000 * med:.0f} | {1000 * min(ts):.0f} | {med / floor:.2f}× |")


if __name__ == "__main__":
    main()

"""Data-pipeline throughput and memory, side by side with datatrove on the same input.

    python benchmarks/data_throughput.py --docs 4000 --workers 1      # throughput table
    python benchmarks/data_throughput.py --memory-mb 100 1000          # peak RSS vs size

The input is English-like web text generated offline by a word-bigram chain trained on
the pydoc topic texts (real prose), with lognormal page lengths, 5% exact and 5% near
copies, and 5% junk pages (boilerplate, repeated lines, symbol soup), split over 8 JSONL
files (one task each). Both tools run the same four rule families with their published
defaults (Gopher repetition, Gopher quality, C4, FineWeb), read JSONL and write JSONL;
lmlab additionally runs its full default web pipeline (language ID, HTML, blocklists,
exact + MinHash dedup, PII) as a second row. Throughput is per core: wall time ×
workers. Memory mode runs `lmlab data prepare` in a subprocess and reports its peak RSS
(largest of the main process and its workers).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path


def bigram_model() -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    nxt: dict[str, list[str]] = defaultdict(list)
    for text in topics.values():
        words = [w for w in text.split() if w.isalpha() or w[:-1].isalpha()]
        for a, b in zip(words, words[1:], strict=False):
            nxt[a].append(b)
    return dict(nxt)


def make_page(rng: random.Random, model: dict[str, list[str]], keys: list[str]) -> str:
    n_words = int(min(max(rng.lognormvariate(6.0, 0.8), 60), 8000))
    lines, line, w = [], [], rng.choice(keys)
    for _ in range(n_words):
        line.append(w)
        if len(line) > rng.randint(8, 25):
            lines.append(" ".join(line).capitalize().rstrip(".,;:") + ".")
            line = []
        w = rng.choice(model.get(w) or keys)
    if line:
        lines.append(" ".join(line).capitalize() + ".")
    paras = []
    while lines:
        k = rng.randint(2, 6)
        paras.append("\n".join(lines[:k]))
        lines = lines[k:]
    return "\n\n".join(paras)


def junk(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return "\n".join(["Click here to subscribe to our newsletter"] * 40)
    if kind == 1:
        return " ".join("#" * rng.randint(1, 6) + "..." for _ in range(300))
    return "Home | About | Contact | Login\n" * 30


def make_corpus(out: Path, docs: int, files: int = 8, seed: int = 0) -> int:
    rng = random.Random(seed)
    model = bigram_model()
    keys = list(model)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        handles = [
            stack.enter_context(open(out / f"part-{i:02d}.jsonl", "w", encoding="utf-8"))
            for i in range(files)
        ]
        pages: list[str] = []
        total = 0
        for i in range(docs):
            r = rng.random()
            if r < 0.05 and pages:
                text = rng.choice(pages)
            elif r < 0.10 and pages:
                words = rng.choice(pages).split(" ")
                for j in rng.sample(range(len(words)), max(1, len(words) // 30)):
                    words[j] = rng.choice(keys)
                text = " ".join(words)
            elif r < 0.15:
                text = junk(rng)
            else:
                text = make_page(rng, model, keys)
                if len(pages) < 2000:
                    pages.append(text)
            line = json.dumps({"id": f"doc-{i}", "text": text}) + "\n"
            total += len(line.encode())
            handles[i % files].write(line)
    return total


def run_datatrove(inp: Path, out: Path, workers: int, files: int) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    ex = LocalPipelineExecutor(
        [
            JsonlReader(str(inp)),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(),
            FineWebQualityFilter(),
            JsonlWriter(str(out / "docs"), compression=None),
        ],
        tasks=files,
        workers=workers,
        logging_dir=str(out / "logs"),
        skip_completed=False,
    )
    t0 = time.perf_counter()
    ex.run()
    return time.perf_counter() - t0


def run_lmlab(inp: Path, out: Path, workers: int, steps: list | None) -> tuple[float, dict]:
    from lmlab.console import set_quiet
    from lmlab.data.pipeline import load_config, prepare

    set_quiet(True)
    data = {"sources": [{"name": "web", "paths": [str(inp)]}], "workers": workers}
    if steps is not None:
        data["steps"] = steps
    cfg = load_config(data, "benchmark")
    t0 = time.perf_counter()
    stats = prepare(cfg, out, card=False)
    return time.perf_counter() - t0, stats


def throughput(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-"))
    try:
        size = make_corpus(tmp / "in", args.docs, args.files)
        mb = size / 1e6
        rows = []
        dt = run_datatrove(tmp / "in", tmp / "dt", args.workers, args.files)
        rows.append(("datatrove: Gopher rep + Gopher + C4 + FineWeb", dt, None))
        same = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
        lt, stats = run_lmlab(tmp / "in", tmp / "lm", args.workers, same)
        rows.append(("lmlab: the same four steps", lt, stats))
        full, stats_full = run_lmlab(tmp / "in", tmp / "lm_full", args.workers, None)
        rows.append(
            ("lmlab: default web pipeline (+lang, HTML, blocklist, dedup, PII)", full, stats_full)
        )
        dt_kept = sum(
            len(p.read_text().splitlines()) for p in (tmp / "dt" / "docs").glob("*.jsonl")
        )
        print(
            f"\ninput: {args.docs} documents, {mb:.1f} MB, {args.files} files; "
            f"workers {args.workers}"
        )
        print(
            f"kept: datatrove {dt_kept}, lmlab (same steps) {stats['kept']['train']['documents']}\n"
        )
        print("| pipeline | seconds | docs/s/core | MB/s/core | vs datatrove |")
        print("|---|---|---|---|---|")
        for name, sec, _ in rows:
            core = sec * args.workers
            print(
                f"| {name} | {sec:.1f} | {args.docs / core:,.0f} | {mb / core:.2f} | "
                f"{dt / sec:.2f}× |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memory(args: argparse.Namespace) -> None:
    print("| input MB | documents | seconds | peak RSS MB |")
    print("|---|---|---|---|")
    for target in args.memory_mb:
        tmp = Path(tempfile.mkdtemp(prefix="lmlab-mem-"))
        try:
            docs = int(target * 1e6 / 3600)  # ~3.6 kB per generated document
            size = make_corpus(tmp / "in", docs, args.files)
            cmd = [
                sys.executable,
                "-m",
                "lmlab.cli",
                "data",
                "prepare",
                str(tmp / "in"),
                "--out",
                str(tmp / "out"),
                "--workers",
                str(args.workers),
                "--quiet",
            ]
            # a fresh parent per size, so RUSAGE_CHILDREN's maximum is this run's alone
            probe = (
                "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True
            )
            peak = int(res.stdout.split()[-1])
            print(
                f"| {size / 1e6:,.0f} | {docs:,} | {time.perf_counter() - t0:.0f} | "
                f"{peak / 1024:,.0f} |",
                flush=True,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--memory-mb", type=float, nargs="*", default=None)
    args = ap.parse_args()
    if args.memory_mb:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()

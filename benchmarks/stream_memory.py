"""Peak memory and throughput of the JSONL reader, against datatrove's JsonlReader.

Each reading runs in a fresh subprocess that reports its peak RSS growth over the
baseline after imports, for a small and a large input: streaming means the growth is
the same for both (a few MB), not proportional to the input.

    python benchmarks/stream_memory.py --mb 1024          # 128 MB and 1 GB inputs
    python benchmarks/stream_memory.py --mb 200 --gz      # gzip-compressed input too
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_jsonl(path: Path, mb: float, seed: int = 0) -> None:
    """Documents of 200..8000 characters drawn from a small vocabulary, written fast."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    lines = []
    for i in range(2000):
        text = " ".join(rng.choices(words, k=rng.randint(40, 1500)))
        lines.append(json.dumps({"id": f"d{i}", "text": text, "metadata": {"n": i}}) + "\n")
    block = "".join(lines).encode()
    target = int(mb * 2**20)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:  # ids repeat across blocks; the reader does not care
        written = 0
        while written < target:
            fh.write(block)
            written += len(block)


def child(reader: str, path: str) -> None:
    """Runs in the subprocess: read everything, print docs, seconds and RSS growth."""
    if reader == "lmlab":
        from lmlab.data.sources import ReadStats, SourceConfig, read_all

        def docs():
            return read_all(SourceConfig(paths=[path]), ReadStats())
    else:
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.utils.logging import logger

        logger.remove()
        p = Path(path)

        def docs():
            return JsonlReader(str(p.parent), glob_pattern=p.name).run()

    base = rss_kb()
    start = time.perf_counter()
    n = chars = peak = 0
    for d in docs():
        n += 1
        chars += len(d.text)
        if n % 500 == 0:
            peak = max(peak, rss_kb())
    secs = time.perf_counter() - start
    peak = max(peak, rss_kb())
    print(json.dumps({"docs": n, "chars": chars, "secs": secs, "rss_growth_kb": peak - base}))


def rss_kb() -> int:
    """Current resident set size (sampled: the high-water mark would include import peaks)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(reader: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", reader, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=float, default=1024, help="size of the large input (MB)")
    ap.add_argument("--gz", action="store_true", help="also measure .jsonl.gz inputs")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    readers = ["lmlab"] + ([] if args.no_datatrove else ["datatrove"])
    suffixes = [".jsonl"] + ([".jsonl.gz"] if args.gz else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in suffixes:
            for mb in (args.mb / 8, args.mb):
                path = Path(tmp) / f"in{suffix}"
                make_jsonl(path, mb)
                size = path.stat().st_size / 2**20
                for reader in readers:
                    r = run(reader, path)
                    rows.append(
                        {
                            "reader": reader,
                            "input": suffix,
                            "file_mb": round(size, 1),
                            "docs": r["docs"],
                            "text_mb": round(r["chars"] / 2**20, 1),
                            "secs": round(r["secs"], 2),
                            "file_mb_per_s": round(size / r["secs"], 1),
                            "peak_rss_growth_mb": round(r["rss_growth_kb"] / 1024, 1),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                path.unlink()
    print("\n| reader | input | file MB | text MB | docs | s | file MB/s | peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['reader']} | {r['input']} | {r['file_mb']} | {r['text_mb']} | {r['docs']} "
            f"| {r['secs']} "
            f"| {r['file_mb_per_s']} | {r['peak_rss_growth_mb']} |"
        )


if __name__ == "__main__":
    main()

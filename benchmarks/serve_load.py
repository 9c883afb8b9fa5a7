"""Load benchmark of `lmlab serve` against `transformers serve`, over HTTP, one run.

Why: the scheduler's throughput in one process (`benchmarks/continuous_batching.py`) is
not what a user of the server sees: HTTP, JSON, server-sent events, tokenization,
detokenization and the event loop all sit between the scheduler and the client. This
drives both OpenAI-compatible servers the way a user would, with the `openai` async
client, and measures what users feel: output tokens/s, time to the first token and the
gaps between tokens, at 1, 8, 32 and 64 concurrent streams.

For each model and each peer, the server starts as a subprocess on a free port:

- `lmlab`: `lmlab serve MODEL --port P --max-concurrency MAX(--concurrency)`, ready when
  `GET /health` answers.
- `transformers`: `transformers serve HF_DIR --host 127.0.0.1 --port P --device cpu
  --dtype float32 --continuous-batching --cb-num-blocks B`, with HF_HUB_OFFLINE=1 and
  TRANSFORMERS_OFFLINE=1 (it runs offline from the directory), on the same weights
  exported by `lmlab export MODEL --to hf`; ready when `GET /v1/models` answers. It runs
  the model in a child process, whose memory is counted. B is twice what the widest
  level needs (see `cb_blocks`): left alone, it sizes its KV cache from the machine's RAM.
- `transformers-generate`: the same without `--continuous-batching` (its default, which
  runs one request at a time: 4x slower at 8 streams on a 2-core EPYC).

Both must stop a reply at the same tokens: the export's `eos_token_id` gets every id that
ends a chat reply in lmlab (see `export_hf`); the `same reply` column checks the texts.

Each level sends `--requests-per-level` streamed chat completions (default 2 per stream)
through that many concurrent streams: greedy (temperature 0), a fixed `--max-tokens`,
16 varied prompts that ask for long answers (a reply that ends earlier has fewer tokens;
the table gives the mean per request). After two warm-up requests, per request: TTFT =
time to the first content delta; ITL = the gaps between content chunks; output tokens
from the final usage chunk (`stream_options.include_usage`). Per level: total output
tokens / wall seconds, p50/p99 TTFT and ITL, errors. A request that raises, times out or
ends without a usage chunk is an error. Peak memory: the sum of VmHWM over the server
process and its descendants, read just before it is stopped (an upper bound on their
peak together; it includes loading). Servers run one after the other, never at once;
the client shares the machine's CPU with them (alike for every peer).

    python benchmarks/serve_load.py --model smollm2-135m-instruct --model runs/tiny \
        --out serve_load.json
    python benchmarks/serve_load.py --peers transformers transformers-generate \
        --concurrency 8 --max-tokens 16 --requests-per-level 16          # a short trial
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from openai import AsyncOpenAI

PEERS = ("lmlab", "transformers", "transformers-generate")

# varied topics and lengths, each asking for more text than --max-tokens allows
PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bicycle works, covering every major part.",
    "List twenty fruits and describe the taste of each one in a sentence.",
    "Describe the water cycle in detail for a ten-year-old student.",
    "Write a long letter to a friend about your trip to the mountains.",
    "Explain how to bake bread at home, from flour to the finished loaf.",
    "What are the main causes of the seasons on Earth? Explain thoroughly.",
    "Write a Python function that sorts a list with merge sort, and explain every line.",
    "Give a history of the printing press and its effects on Europe.",
    "Describe a busy city market in the morning, using all five senses.",
    "Compare cats and dogs as pets in a long, balanced essay.",
    "Explain what a computer's memory does, then describe caches, RAM and disks.",
    "Write a recipe for vegetable soup with a list of ingredients and many steps.",
    "Tell me about the planets of the solar system, one paragraph for each.",
    "Write a dialogue between a teacher and a student about learning to read.",
    "Describe how to plant and care for a small vegetable garden through a year.",
]


PROMPT_BUDGET = 128  # tokens: the longest prompt above in a chat template, with room to spare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """The CPU (model, cores, SIMD flags) and versions: the numbers mean nothing without it."""
    cpu, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                simd = ("avx2", "fma", "avx_vnni", "avx512", "amx")
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(simd))
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "flags": flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{p: pkg(p) for p in ("torch", "transformers", "openai", "fastapi", "uvicorn", "lmlab")},
    }


def descendants(pid: int) -> list[int]:
    """pid and every process under it, from the parent ids in /proc/*/stat."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def memory_mib(pid: int) -> dict:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process tree, summed, in MiB."""
    hwm = rss = 0
    pids = descendants(pid)
    for p in pids:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for key, val in re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, re.M):
            if key == "VmHWM":
                hwm += int(val)
            else:
                rss += int(val)
    return {"peak_rss_mib": round(hwm / 1024, 1), "rss_mib": round(rss / 1024, 1), "procs": pids}


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Server:
    """One server subprocess in its own session, so that stopping it stops its children."""

    def __init__(self, cmd: list[str], env: dict, ready_path: str, port: int, log: Path):
        self.cmd, self.port, self.log, self.ready_path = cmd, port, log, ready_path
        self.base = f"http://127.0.0.1:{port}"
        self.fh = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float) -> str:
        """The model id that /v1/models lists first (requests must name it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode} before answering")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=5) as r:
                    r.read()
                with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
                    return json.loads(r.read())["data"][0]["id"]
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(0.5)
        raise RuntimeError(f"no answer from {self.ready_path} within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, transformers ends its model process), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        # whatever is left of the session it started (our own processes only)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.fh.close()


async def one_request(
    client: AsyncOpenAI, model: str, prompt: str, max_tokens: int
) -> dict[str, object]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage = finish = error = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    stamps.append(now)
                    text.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        if usage is None:
            error = "no usage chunk"
    except Exception as e:  # every failure is counted, none ends the run
        error = f"{type(e).__name__}: {e}"[:300]
    return {
        "seconds": time.perf_counter() - t0,
        "ttft": stamps[0] - t0 if stamps else None,
        "gaps": [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)],
        "chunks": len(stamps),
        "tokens": usage if usage is not None else len(stamps),
        "finish": finish,
        "error": error,
        "text": "".join(text),
    }


def pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) of a non-empty list, else None."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


async def level(
    base: str, model: str, streams: int, n: int, max_tokens: int, timeout: float
) -> dict:
    """n requests through `streams` concurrent streams; each stream takes the next prompt."""
    client = AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=timeout)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    results: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
            results.append({**r, "prompt": i % len(PROMPTS)})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    errors = Counter(r["error"] for r in results if r["error"] is not None)
    return {
        "streams": streams,
        "requests": n,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "chunks": sum(r["chunks"] for r in ok),
        "ttft_p50_ms": ms(pct(ttft, 50)),
        "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(gaps, 50)),
        "itl_p99_ms": ms(pct(gaps, 99)),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "finish_reasons": dict(Counter(str(r["finish"]) for r in ok)),
        # each prompt's reply (greedy: the same prompt should give the same text at every level)
        "texts": {r["prompt"]: r["text"] for r in ok},
    }


def export_hf(model: str, root: Path) -> tuple[Path, list[int]]:
    """`lmlab export MODEL --to hf` once per model (transformers serve needs an HF directory),
    with every id that ends a chat reply in lmlab as an EOS id of its generation config.

    Why the second part: both servers must stop a reply at the same tokens, or one of them
    generates more tokens per request than the other (and the throughputs are of different
    work). lmlab's own models end a turn with `<|end|>`, which the export leaves out of
    `eos_token_id`. Returns the directory and the ids added, if any."""
    out = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))
    if not (out / "config.json").exists():
        cmd = ["lmlab", "export", model, "--to", "hf", "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    from lmlab import load_tokenizer
    from lmlab.tokenizer.chat import stop_ids_of

    stops = stop_ids_of(load_tokenizer(model), chat=True)
    path = out / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    added = [i for i in stops if i not in eos]
    if added:
        path.write_text(json.dumps({**gen, "eos_token_id": eos + added}, indent=2) + "\n")
    return out, added


def cb_blocks(args: argparse.Namespace) -> int:
    """KV blocks (of 256 tokens) for `transformers serve --continuous-batching`: twice what the
    widest level needs. On CPU it otherwise sizes its cache from the machine's total memory
    (14 GiB resident on a 24 GiB machine, over a minute to start), which says nothing about
    the server and can push a shared machine out of memory."""
    per_request = -(-(PROMPT_BUDGET + args.max_tokens) // 256)
    return 2 * max(args.concurrency) * per_request


def server_cmd(
    peer: str, model: str, hf_dir: Path | None, port: int, args: argparse.Namespace
) -> list[str]:
    if peer == "lmlab":
        served = str(args.lmlab_serves or model)
        cmd = ["lmlab", "serve", served, "--name", model, "--port", str(port)]
        return cmd + ["--max-concurrency", str(max(args.concurrency))] + args.lmlab_args
    cmd = ["transformers", "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    if peer == "transformers":
        cmd.append("--continuous-batching")
        if args.cb_num_blocks != 0:
            cmd += ["--cb-num-blocks", str(args.cb_num_blocks or cb_blocks(args))]
    return cmd + args.transformers_args


def run_peer(
    peer: str, model: str, hf_dir: Path | None, logs: Path, args: argparse.Namespace
) -> dict:
    """Start one server, warm it up, run every level, read its memory, stop it."""
    port = free_port()
    cmd = server_cmd(peer, model, hf_dir, port, args)
    env = dict(os.environ)
    if peer == "lmlab":
        env.pop("LMLAB_API_KEY", None)  # an open server: the client's key is a placeholder
    else:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log = logs / f"{re.sub(r'[^A-Za-z0-9]+', '_', model)}-{peer}.log"
    out: dict = {"peer": peer, "model": model, "command": shlex.join(cmd), "levels": []}
    print(f"\n{model} / {peer}: {out['command']}", flush=True)
    try:
        t0 = time.perf_counter()
        server = Server(cmd, env, "/health" if peer == "lmlab" else "/v1/models", port, log)
    except OSError as e:
        return {**out, "failed": f"could not start: {e}"}
    try:
        name = server.wait_ready(args.start_timeout)
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        out["model_id"] = name
        # warm-up: the first requests pay for lazy loading, allocators, thread pools
        warm = asyncio.run(level(server.base, name, 2, 2, 8, args.request_timeout))
        out["warmup_errors"] = warm["error_kinds"]
        for c in args.concurrency:
            n = max(args.requests_per_level or 2 * c, c, 4)  # every stream gets one at least
            r = asyncio.run(level(server.base, name, c, n, args.max_tokens, args.request_timeout))
            out["levels"].append(r)
            print(
                f"  {c:3d} streams, {n} requests: {r['tokens_per_s']:8.1f} tok/s, TTFT p50 "
                f"{r['ttft_p50_ms']} ms, ITL p50 {r['itl_p50_ms']} ms, {r['errors']} errors"
                + (f" {r['error_kinds']}" if r["errors"] else ""),
                flush=True,
            )
            if server.proc.poll() is not None:
                raise RuntimeError(f"exited with code {server.proc.returncode} during the run")
    except Exception as e:  # one failing peer must not end the whole run
        out["failed"] = f"{type(e).__name__}: {e}"
        print(f"  failed: {out['failed']}", flush=True)
    finally:
        if server.proc.poll() is None:
            out.update(memory_mib(server.proc.pid))
        server.stop()
        out["log_tail"] = tail(log)
    return out


def fmt(x: float | None, spec: str = ",.1f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(runs: list[dict]) -> str:
    lines = [
        "| model | server | streams | requests | output tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | tokens/request | errors | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        model, peer = Path(run["model"]).name or run["model"], run["peer"]
        if run.get("failed") and not run["levels"]:
            lines.append(f"| {model} | {peer} | — | — | failed: {run['failed'][:80]} |||||| ")
            continue
        for r in run["levels"]:
            lines.append(
                f"| {model} | {peer} | {r['streams']} | {r['requests']} | "
                f"{fmt(r['tokens_per_s'])} | {fmt(r['ttft_p50_ms'], ',.0f')} / "
                f"{fmt(r['ttft_p99_ms'], ',.0f')} | {fmt(r['itl_p50_ms'])} / "
                f"{fmt(r['itl_p99_ms'])} | {fmt(r['tokens_per_request'])} | {r['errors']} | "
                f"{fmt(run.get('peak_rss_mib'), ',.0f')} |"
            )
    ratios = []
    for run in runs:
        if run["peer"] != "lmlab":
            continue
        for other in runs:
            if other["model"] != run["model"] or not other["peer"].startswith("transformers"):
                continue
            theirs = {r["streams"]: r["tokens_per_s"] for r in other["levels"]}
            texts = {r["streams"]: r["texts"] for r in other["levels"]}
            for r in run["levels"]:
                t = theirs.get(r["streams"])
                ratio = f"{r['tokens_per_s'] / t:.2f}×" if t else "—"
                both = [k for k in r["texts"] if k in texts.get(r["streams"], {})]
                same = sum(r["texts"][k] == texts[r["streams"]][k] for k in both)
                ratios.append(
                    f"| {Path(run['model']).name or run['model']} | {other['peer']} | "
                    f"{r['streams']} | {fmt(r['tokens_per_s'])} | {fmt(t)} | {ratio} | "
                    f"{same}/{len(both)} |"
                )
    if ratios:
        lines += [
            "",
            "| model | against | streams | lmlab tok/s | transformers tok/s "
            "| lmlab ÷ transformers | same reply |",
            "|---|---|---:|---:|---:|---:|---:|",
            *ratios,
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="lmlab model: store name, run, checkpoint")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--requests-per-level",
        type=int,
        default=None,
        help="default 2×streams; never fewer than streams",
    )
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=["lmlab", "transformers"])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--export-dir", type=Path, help="keep (and reuse) the HF exports here")
    ap.add_argument("--logs", type=Path, help="keep the server logs here")
    ap.add_argument(
        "--cb-num-blocks",
        type=int,
        help="`transformers`'s KV blocks (default: see cb_blocks; 0: its own)",
    )
    ap.add_argument(
        "--lmlab-args",
        type=shlex.split,
        default=[],
        help="more `lmlab serve` flags, as --lmlab-args='--kv-cache-gb 2'",
    )
    ap.add_argument(
        "--transformers-args", type=shlex.split, default=[], help="more `transformers serve` flags"
    )
    ap.add_argument(
        "--lmlab-serves",
        type=Path,
        help="lmlab serves this checkpoint of MODEL instead (its w8a8 quantization, say); "
        "the other servers keep MODEL",
    )
    ap.add_argument("--out", type=Path, help="write every result here as JSON")
    args = ap.parse_args()
    models = args.model or ["smollm2-135m-instruct"]
    mach = machine()
    load0 = os.getloadavg()[0]
    print(
        f"{mach['cpu']}, {mach['cores']} cores ({', '.join(mach['flags']) or 'no AVX2'}), "
        f"torch {mach['torch']}, transformers {mach['transformers']}, load average {load0:.2f}"
    )
    print(
        f"levels {args.concurrency} streams, max_tokens {args.max_tokens}, greedy; "
        f"peers {args.peers}"
    )
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        exports = args.export_dir or Path(tmp) / "hf"
        logs = args.logs or Path(tmp) / "logs"
        exports.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        for model in models:
            hf_dir, added = None, []
            for peer in args.peers:
                if peer != "lmlab" and hf_dir is None:
                    try:
                        hf_dir, added = export_hf(model, exports)
                    except Exception as e:  # reported as this peer's failure
                        runs.append({"peer": peer, "model": model, "failed": str(e), "levels": []})
                        print(f"\n{model} / {peer}: {e}", flush=True)
                        continue
                runs.append(run_peer(peer, model, hf_dir, logs, args))
                if peer != "lmlab":
                    runs[-1]["eos_ids_added_to_export"] = added
    load1 = os.getloadavg()[0]
    print(f"\nload average {load0:.2f} at the start, {load1:.2f} at the end\n")
    print(markdown(runs))
    for run in runs:
        if run.get("failed"):
            print(f"\n{run['model']} / {run['peer']} failed: {run['failed']}")
            if run.get("log_tail"):
                print("server log, last lines:\n" + run["log_tail"])
    if args.out:
        doc = {"machine": mach, "load_average": [load0, load1], "args": vars(args), "runs": runs}
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())

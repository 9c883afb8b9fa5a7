"""Decode throughput of lmlab versus transformers and llama.cpp, in one process.

Why: lmlab's generation is meant to decode at least 3x as fast as Hugging Face's
`LlamaForCausalLM.generate` and at least 0.5x as fast as llama.cpp at the same precision,
for LLaMA-style models of ~10M and ~100M parameters at batch 1 and batch 8. All engines
run the same weights (lmlab's random initialization, seed 0: the model's quality does not
change the arithmetic of a decode step) on the same prompts (batch 8 is 8 random prompts
of equal length, so no engine pads), greedy, with no stop token, in fp32, on the same
number of threads:

- lmlab: `generate_batch` (the engine `lmlab generate` runs), and `lmlab runner`, the
  bare prefill/step loop of `lmlab.infer.bench.measure` (`lmlab bench infer`), which
  shows what the generation loop adds around the model.
- transformers: the checkpoint exported with `export_to_hf` and loaded with
  `LlamaForCausalLM.from_pretrained` (sdpa attention, its default dynamic KV cache),
  `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`.
- llama.cpp (llama-cpp-python): the checkpoint exported with `export_gguf` as f32, and as
  f16 and q8_0 for extra rows, loaded with `load_llama_cpp` (f32 KV cache); decoded with
  the low-level API: one `llama_batch` holding every sequence (its own sequence id each)
  and one `llama_decode` per step, the greedy token read from each row's logits.

Prefill is separated from decode: every engine reports the time at which each step's
tokens are chosen, so prefill = start to the first token, decode = the N - 1 steps after
it, and decode tokens/s = batch * (N - 1) / decode time. Each engine runs once to warm up,
then `--repeats` rounds in a rotating order (so that other load on the machine hits every
engine alike); the figures are the best over rounds. The tokenizer is a real lmlab
byte-level BPE (trained on the Python standard library's sources unless `--tokenizer`
names one), so the GGUF files carry complete tokenizer metadata.

On a machine with CUDA, a GPU section adds lmlab's (and transformers') decode tokens/s
next to the memory-bandwidth bound: batch * bandwidth / bytes read per step (every
weight once, plus the KV cache at the mean context length).

Run: `python benchmarks/infer_throughput.py` (10m and 100m, batch 1 and 8, 64 + 64 tokens,
2 threads); `--quick` is a smoke test of the script itself, not a measurement.
Needs `transformers`, `gguf` and `llama-cpp-python` (`pip install 'lmlab[gguf]'`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import UsageError
from lmlab.infer.bench import measure, tensor_bytes
from lmlab.infer.generate import generate_batch
from lmlab.infer.gguf import QTYPES, export_gguf, load_llama_cpp
from lmlab.infer.options import GenerationConfig
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.hf import export_to_hf
from lmlab.model.presets import parse_size, resolve_model
from lmlab.model.transformer import Transformer
from lmlab.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer
from lmlab.tokenizer.train import train_bpe
from lmlab.train.mfu import device_name
from lmlab.utils import write_json

TARGET_VS_TRANSFORMERS = 3.0  # the speed target: lmlab decode >= 3x transformers
TARGET_VS_LLAMA_CPP = 0.5  # the speed target: lmlab decode >= 0.5x llama.cpp, same precision
NOISY = 1.5  # a row whose fastest round is this much faster than its slowest is flagged

# Peak memory bandwidth (GB/s) by CUDA device name, first match wins; spec-sheet values.
BANDWIDTH_GBS: list[tuple[str, float]] = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (the name reads "H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("L4", 300.0),
]


# --- one timed generation ---------------------------------------------------------------


@dataclass
class Run:
    """One generation of `new` tokens for `batch` prompts of `prompt` tokens."""

    batch: int
    prompt: int
    new: int
    prefill_s: float  # start -> the first token of every row chosen
    decode_s: float  # the new - 1 steps after it
    step_ms_p50: float
    total_s: float
    tokens: list[list[int]] | None = None  # per row (None: the engine does not return them)

    @property
    def prefill_tps(self) -> float:
        return self.batch * self.prompt / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return self.batch * (self.new - 1) / self.decode_s

    @property
    def e2e_tps(self) -> float:
        return self.batch * self.new / self.total_s


def run_from_marks(
    start: float, marks: list[float], end: float, prompts: list[list[int]], tokens
) -> Run:
    """A Run from the times at which each step's tokens were chosen (marks[0]: after prefill)."""
    steps = np.diff(marks)
    return Run(
        batch=len(prompts),
        prompt=len(prompts[0]),
        new=len(marks),
        prefill_s=marks[0] - start,
        decode_s=marks[-1] - marks[0],
        step_ms_p50=1000 * float(np.median(steps)) if len(steps) else 0.0,
        total_s=end - start,
        tokens=tokens,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lmlab_generate(model, prompts: list[list[int]], new: int, compile: bool = False) -> Run:
    """`generate_batch`, greedy, no stop ids; a step's time is that of its first token.
    `compile`: through the torch.compile'd decode step (the first call compiles it)."""
    b, marks, count = len(prompts), [], [0]

    def on_token(i: int, t: int) -> None:
        if count[0] % b == 0:  # every row is live (no stop ids): b tokens per step
            marks.append(time.perf_counter())
        count[0] += 1

    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=new, compile=compile)
    out = generate_batch(model, prompts, cfg, on_token=on_token)
    end = time.perf_counter()
    if len(marks) != new:
        raise RuntimeError(f"lmlab generated {len(marks)} steps, expected {new}")
    return run_from_marks(start, marks, end, prompts, [c.tokens for c in out])


def lmlab_runner(model, batch: int, prompt: int, new: int, seed: int) -> Run:
    """`lmlab.infer.bench.measure`: the Runner's prefill and steps with an argmax, no more."""
    r = measure(model, batch, prompt, new, seed=seed)
    prefill_s = r["prefill_s"]
    decode_s = batch * (new - 1) / r["decode_tokens_per_s"]
    return Run(batch, prompt, new, prefill_s, decode_s, r["latency_ms_p50"], prefill_s + decode_s)


def build_hf(hf_dir: Path, device: torch.device, dtype: torch.dtype):
    """`LlamaForCausalLM` from the directory `export_to_hf` wrote; no EOS, so generate runs
    exactly as lmlab's with no stop ids (min_new_tokens then has nothing to suppress)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0  # never used: no row ends early, no padding
    return model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], new: int) -> Run:
    """`generate`, greedy; a streamer stamps each step (its first call is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    marks: list[float] = []
    calls = [0]

    class Clock(BaseStreamer):
        def put(self, value) -> None:
            if calls[0]:
                marks.append(time.perf_counter())
            calls[0] += 1

        def end(self) -> None:
            pass

    device = model.device
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            streamer=Clock(),
        )
    end = time.perf_counter()
    if len(marks) != new:
        raise RuntimeError(f"transformers generated {len(marks)} steps, expected {new}")
    return run_from_marks(start, marks, end, prompts, out[:, len(prompts[0]) :].tolist())


# --- llama.cpp, batched through the low-level API -----------------------------------------


@dataclass
class LlamaCppBatch:
    """A llama.cpp context for `n_seq` sequences of up to `per_seq` tokens, on the model a
    `Llama` from `load_llama_cpp` holds, with that Llama's context settings (threads, KV
    cache types, attention) and a `llama_batch` big enough for every prompt at once."""

    llm: object
    n_seq: int
    per_seq: int
    ctx: object = None
    batch: object = None
    n_vocab: int = 0

    def __post_init__(self) -> None:
        import llama_cpp

        p = llama_cpp.llama_context_default_params()
        for name, _ in p._fields_:
            setattr(p, name, getattr(self.llm.context_params, name))
        p.n_seq_max = self.n_seq
        # llama.cpp gives each sequence n_ctx / n_seq_max cells, in multiples of 256
        p.n_ctx = self.n_seq * 256 * -(-self.per_seq // 256)
        p.n_batch = p.n_ubatch = max(512, self.n_seq * self.per_seq)
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp: cannot create a context for {self.n_seq} sequences")
        if llama_cpp.llama_n_ctx_seq(self.ctx) < self.per_seq:
            raise RuntimeError("llama.cpp: the context holds fewer tokens per sequence than asked")
        self.batch = llama_cpp.llama_batch_init(p.n_batch, 0, self.n_seq)
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        import llama_cpp

        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, index: int) -> int:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ptr, (self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new: int) -> Run:
        """Greedy decode of `new` tokens after every prompt, all sequences in one batch."""
        import llama_cpp

        n, plen = len(prompts), len(prompts[0])
        if n > self.n_seq or plen + new > self.per_seq:
            raise RuntimeError("llama.cpp: more sequences or tokens than the context holds")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        marks: list[float] = []
        start = time.perf_counter()
        self._decode(
            [(t, j, s, j == plen - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        )
        out = [[self._argmax(s * plen + plen - 1)] for s in range(n)]
        marks.append(time.perf_counter())
        for step in range(new - 1):
            self._decode([(out[s][-1], plen + step, s, True) for s in range(n)])
            for s in range(n):
                out[s].append(self._argmax(s))
            marks.append(time.perf_counter())
        return run_from_marks(start, marks, time.perf_counter(), prompts, out)


def _llama_worker(conn, file: str, threads: int, n_seq: int, per_seq: int) -> None:
    from lmlab.infer.gguf import load_llama_cpp

    llm = load_llama_cpp(file, n_threads=threads, type_k=0, type_v=0, verbose=False)
    batch = LlamaCppBatch(llm, n_seq, per_seq)
    serve_jobs(conn, batch.generate)
    batch.close()


def serve_jobs(conn, generate) -> None:
    """A worker's side of `EngineProcess`: ready, then `generate(prompts, new)` per job."""
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(generate(*job))


class EngineProcess:
    """An engine in a process of its own (spawned, so nothing is inherited): `target(conn,
    *args)` builds it and answers jobs through `serve_jobs`; `generate` sends one job and
    waits. One model per process is how a user runs it. (It was built while the compiled
    w8a8 step, in a process holding many models, mapped and unmapped a chunk of CPython's
    frame stack per int8 product; `call_with_stack_room` fixed that: docs/benchmarks.md.)"""

    def __init__(self, target, *args, name: str = "engine") -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{name}: worker process did not start")

    def generate(self, prompts: list[list[int]], new: int) -> Run:
        self.conn.send((prompts, new))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def llama_cpp_process(file, threads: int, n_seq: int, per_seq: int) -> EngineProcess:
    """`LlamaCppBatch` in a process of its own. llama.cpp's CPU backend and the kernels
    torch.compile builds both run on the system's OpenMP runtime; in one process the
    compiled decode step was measured 20% slower than eager (31 against 38 tok/s, w8a8
    SmolLM2, batch 1) and 45% faster without llama.cpp loaded. That was before the w8a8
    kernel bypassed the `torch.ops` packet's scan, the likelier cause (docs/benchmarks.md);
    kept apart anyway, at no cost."""
    return EngineProcess(_llama_worker, str(file), threads, n_seq, per_seq, name=str(file))


# --- the models -------------------------------------------------------------------------


def stdlib_texts(limit_chars: int) -> list[str]:
    """Python's own standard-library sources: real text every machine has, for the BPE."""
    out, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return out


def make_tokenizer(args: argparse.Namespace, out_dir: Path) -> tuple[Path, str]:
    """The tokenizer directory every checkpoint carries, and where it came from."""
    if args.tokenizer:
        src = Path(args.tokenizer)
        tok = load_tokenizer(src)  # a clear error when there is none
        save_tokenizer(tok, out_dir)
        conf = src / "tokenizer_config.json"
        if conf.is_file():
            (out_dir / "tokenizer_config.json").write_text(conf.read_text())
        return out_dir, f"{src} ({tok.get_vocab_size()} tokens)"
    t0 = time.perf_counter()
    tok = train_bpe(stdlib_texts(3_000_000), args.vocab)
    save_tokenizer(tok, out_dir)
    return out_dir, (
        f"byte-level BPE of {tok.get_vocab_size()} tokens trained on Python's stdlib sources "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def model_config(size: str, vocab: int, max_seq_len: int) -> ModelConfig:
    return resolve_model(
        {"preset": "llama", "size": size, "vocab_size": vocab, "max_seq_len": max_seq_len}
    )


def describe(cfg: ModelConfig, model: torch.nn.Module) -> dict:
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "ffn_hidden": cfg.ffn_hidden,
        "vocab": cfg.vocab_size,
        "tie_embeddings": cfg.tie_embeddings,
        "params": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": cfg.num_params(embeddings=False),
        "weights_mib": round(tensor_bytes(model) / 2**20, 1),
    }


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random ordinary tokens (no special ids): equal lengths, so nobody pads."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab, (batch, length), generator=g).tolist()


# --- rounds -------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str  # as printed: "lmlab", "transformers", "llama.cpp q8_0", ...
    kind: str  # lmlab | lmlab runner | transformers | llama.cpp
    precision: str  # of the weights (every KV cache here is f32 / fp32)
    run: Callable[[], Run]
    runs: list[Run] = field(default_factory=list)
    warmup: Run | None = None


def play(engines: list[Engine], repeats: int, log: Callable[[str], None]) -> None:
    """One warm-up run each, then `repeats` rounds, the first engine rotating per round."""
    for e in engines:
        e.warmup = e.run()
    for r in range(repeats):
        shift = r % len(engines)
        for e in engines[shift:] + engines[:shift]:
            e.runs.append(e.run())
        rates = ", ".join(f"{e.name} {e.runs[-1].decode_tps:,.0f}" for e in engines)
        log(f"  round {r + 1}/{repeats}, decode tokens/s: {rates}")


def agreement(tokens: list[list[int]] | None, ref: list[list[int]]) -> dict | None:
    """Rows whose tokens equal lmlab's, and the first step where any row differs."""
    if tokens is None:
        return None
    same = sum(a == b for a, b in zip(tokens, ref, strict=True))
    first = min(
        (
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            for a, b in zip(tokens, ref, strict=True)
        ),
        default=0,
    )
    return {"rows_equal": same, "rows": len(ref), "first_difference": first}


def summarize(e: Engine, ref: list[list[int]] | None) -> dict:
    best = max(e.runs, key=lambda r: r.decode_tps)
    row = {
        "engine": e.name,
        "kind": e.kind,
        "precision": e.precision,
        "prefill_tokens_per_s": round(max(r.prefill_tps for r in e.runs), 1),
        "decode_tokens_per_s": round(best.decode_tps, 2),
        "step_ms_p50": round(best.step_ms_p50, 3),
        "e2e_tokens_per_s": round(max(r.e2e_tps for r in e.runs), 2),
        "round_decode_tokens_per_s": [round(r.decode_tps, 2) for r in e.runs],
        "round_prefill_tokens_per_s": [round(r.prefill_tps, 1) for r in e.runs],
        # fastest / slowest round: far above 1, other load hit this engine in some rounds
        "round_spread": round(best.decode_tps / min(r.decode_tps for r in e.runs), 2),
    }
    tokens = e.warmup.tokens if e.warmup else None
    if ref is not None and e.kind != "lmlab":
        row["agreement_with_lmlab"] = agreement(tokens, ref)
    return row


def add_ratios(rows: list[dict]) -> None:
    """lmlab's decode tokens/s divided by each other engine's (> 1: lmlab is faster)."""
    lm = next(r for r in rows if r["kind"] == "lmlab")
    for r in rows:
        if r is not lm:
            r["lmlab_ratio"] = round(lm["decode_tokens_per_s"] / r["decode_tokens_per_s"], 3)


def targets(rows: list[dict]) -> list[dict]:
    """The two speed targets for one (model, batch): against transformers, and against
    llama.cpp at lmlab's precision (f32 weights, f32 KV cache)."""
    out = []
    for kind, precision, target in (
        ("transformers", "fp32", TARGET_VS_TRANSFORMERS),
        ("llama.cpp", "f32", TARGET_VS_LLAMA_CPP),
    ):
        peer = next((r for r in rows if r["kind"] == kind and r["precision"] == precision), None)
        if peer is not None:
            ratio = peer["lmlab_ratio"]
            out.append(
                {"peer": peer["engine"], "ratio": ratio, "target": target, "met": ratio >= target}
            )
    return out


# --- GPU ----------------------------------------------------------------------------------


def bandwidth_gbs(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--bandwidth-gbs"
    for pattern, gbs in BANDWIDTH_GBS:
        if pattern in name:
            return gbs, f"spec sheet ({pattern})"
    return None, "unknown device: pass --bandwidth-gbs"


def bytes_per_step(
    cfg: ModelConfig, model: torch.nn.Module, batch: int, prompt: int, new: int
) -> dict:
    """Bytes one decode step must read at the least: every weight once (of the embedding
    table only the rows looked up, unless it is also the output head) and the KV cache of
    every layer at the mean context length of the decode steps."""
    elem = next(model.parameters()).element_size()
    weights = tensor_bytes(model)
    if not cfg.tie_embeddings:
        emb = model.embed_tokens.weight
        weights -= emb.numel() * elem - batch * cfg.d_model * elem
    mean_ctx = prompt + new / 2
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elem * batch * mean_ctx
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


def gpu_section(
    args: argparse.Namespace,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    hf_dir: Path,
    size: str,
    device: torch.device,
    log: Callable[[str], None],
) -> list[dict]:
    """lmlab (and transformers) on the GPU against the memory-bandwidth bound."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.gpu_dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device_name("cpu")
    gbs, source = bandwidth_gbs(name, args.bandwidth_gbs)
    model = Transformer(cfg)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    hf = build_hf(hf_dir, device, dtype) if "transformers" in args.engines else None
    out = []
    for b in args.batches:
        prompts = make_prompts(b, args.prompt_len, cfg.vocab_size, args.seed + b)
        engines = [
            Engine(
                "lmlab",
                "lmlab",
                args.gpu_dtype,
                lambda p=prompts: lmlab_generate(model, p, args.new_tokens),
            ),
            Engine(
                "lmlab runner",
                "lmlab runner",
                args.gpu_dtype,
                lambda b=b: lmlab_runner(model, b, args.prompt_len, args.new_tokens, args.seed),
            ),
        ]
        if hf is not None:
            engines.append(
                Engine(
                    "transformers",
                    "transformers",
                    args.gpu_dtype,
                    lambda p=prompts: hf_generate(hf, p, args.new_tokens),
                )
            )
        log(f"GPU {name}, {size}, batch {b}, {args.gpu_dtype}")
        play(engines, args.repeats, log)
        need = bytes_per_step(cfg, model, b, args.prompt_len, args.new_tokens)
        bound = b * gbs * 1e9 / need["total"] if gbs else None
        ref = engines[0].warmup.tokens
        rows = [summarize(e, ref) for e in engines]
        add_ratios(rows)
        for r in rows:
            r["bound_fraction"] = round(r["decode_tokens_per_s"] / bound, 4) if bound else None
        out.append(
            {
                "size": size,
                "batch": b,
                "device": name,
                "dtype": args.gpu_dtype,
                "bandwidth_gbs": gbs,
                "bandwidth_source": source,
                "bytes_per_step": need,
                "bound_decode_tokens_per_s": round(bound, 1) if bound else None,
                "results": rows,
            }
        )
    return out


# --- the benchmark ------------------------------------------------------------------------


def machine(threads: int) -> dict:
    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    info = {
        "cpu": device_name("cpu"),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "llama_cpp_python": ver("llama_cpp_python"),
        "gguf": ver("gguf"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import llama_cpp

        info["llama_cpp_system"] = llama_cpp.llama_print_system_info().decode().strip()
    except ImportError:
        pass
    return info


def bench_size(
    args: argparse.Namespace, size: str, tok_dir: Path, tmp: Path, log: Callable[[str], None]
) -> tuple[dict, list[dict], list[dict]]:
    """Every engine on one model size, every batch size: (config, CPU rows, GPU rows)."""
    cfg = model_config(size, args.vocab_size, max(256, args.prompt_len + args.new_tokens))
    torch.manual_seed(args.seed)
    model = Transformer(cfg).eval()
    info = describe(cfg, model)
    log(
        f"\n== {size}: {info['params'] / 1e6:.1f}M parameters ({cfg.n_layers} x {cfg.d_model}, "
        f"{cfg.n_heads} heads, ffn {cfg.ffn_hidden}, vocabulary {cfg.vocab_size}), "
        f"{info['weights_mib']} MiB fp32"
    )
    ckpt = save_checkpoint(model, tmp / size / "ckpt", tokenizer_dir=tok_dir)
    hf_dir = hf = None
    if "transformers" in args.engines:
        hf_dir = export_to_hf(ckpt, tmp / size / "hf")
        hf = build_hf(hf_dir, torch.device("cpu"), torch.float32)
    llms: dict[str, object] = {}
    if "llama.cpp" in args.engines:
        for q in args.qtypes:
            t0 = time.perf_counter()
            path = export_gguf(ckpt, tmp / size / f"model-{q}.gguf", q)
            llms[q] = load_llama_cpp(
                path,
                n_threads=args.threads,
                n_ctx=args.prompt_len + args.new_tokens,
                type_k=0,  # GGML_TYPE_F32: an f32 KV cache, as lmlab's and transformers'
                type_v=0,
            )
            mib, secs = path.stat().st_size / 2**20, time.perf_counter() - t0
            log(f"GGUF {q}: {mib:.1f} MiB, exported in {secs:.1f} s")

    rows_out: list[dict] = []
    new = args.new_tokens
    for b in args.batches:
        prompts = make_prompts(b, args.prompt_len, cfg.vocab_size, args.seed + b)
        engines = [
            Engine("lmlab", "lmlab", "fp32", lambda p=prompts: lmlab_generate(model, p, new))
        ]
        if "lmlab-runner" in args.engines:
            engines.append(
                Engine(
                    "lmlab runner",
                    "lmlab runner",
                    "fp32",
                    lambda b=b: lmlab_runner(model, b, args.prompt_len, new, args.seed),
                )
            )
        if hf is not None:
            engines.append(
                Engine(
                    "transformers",
                    "transformers",
                    "fp32",
                    lambda p=prompts: hf_generate(hf, p, new),
                )
            )
        contexts = []
        for q, llm in llms.items():
            c = LlamaCppBatch(llm, b, args.prompt_len + new)
            contexts.append(c)
            engines.append(
                Engine(f"llama.cpp {q}", "llama.cpp", q, lambda p=prompts, c=c: c.generate(p, new))
            )
        log(
            f"{size}, batch {b}: prompt {args.prompt_len}, {new} new tokens, {args.threads} threads"
        )
        try:
            play(engines, args.repeats, log)
        finally:
            for c in contexts:
                c.close()
        ref = engines[0].warmup.tokens
        rows = [summarize(e, ref) for e in engines]
        add_ratios(rows)
        rows_out.append({"size": size, "batch": b, "results": rows, "targets": targets(rows)})

    gpu_rows: list[dict] = []
    if torch.cuda.is_available() and args.gpu != "off":
        gpu_rows = gpu_section(
            args, cfg, model.state_dict(), hf_dir, size, torch.device("cuda"), log
        )
    for llm in llms.values():
        llm.close()
    return {"size": size, **info}, rows_out, gpu_rows


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    mach = machine(torch.get_num_threads())
    log(
        f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} on {mach['torch_threads']} "
        f"threads, transformers {mach['transformers']}, llama-cpp-python "
        f"{mach['llama_cpp_python']}; load average {load_start[0]:.2f}"
    )
    models, cpu_rows, gpu_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="lmlab-infer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tok_dir, tok_source = make_tokenizer(args, tmp / "tokenizer")
        args.vocab_size = load_tokenizer(tok_dir).get_vocab_size()
        log(f"tokenizer: {tok_source}")
        for size in args.sizes:
            info, rows, grows = bench_size(args, size, tok_dir, tmp, log)
            gc.collect()  # the previous size's three copies of the weights go first
            models.append(info)
            cpu_rows += rows
            gpu_rows += grows
    return {
        "command": " ".join(["python benchmarks/infer_throughput.py", *sys.argv[1:]]),
        "machine": {
            **mach,
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "weights": f"random (lmlab's initialization, seed {args.seed}): speed does not "
        "depend on them",
        "tokenizer": tok_source,
        "options": {
            "sizes": args.sizes,
            "batches": args.batches,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "repeats": args.repeats,
            "qtypes": args.qtypes,
            "engines": args.engines,
            "seed": args.seed,
        },
        "llama_cpp_batching": "one llama_batch with a sequence id per prompt, one "
        "llama_decode per step",
        "models": models,
        "cpu": cpu_rows,
        "gpu": gpu_rows,
    }


# --- output -------------------------------------------------------------------------------


def _agree(r: dict) -> str:
    a = r.get("agreement_with_lmlab")
    if a is None:
        return "—"
    s = f"{a['rows_equal']}/{a['rows']}"
    return s if a["rows_equal"] == a["rows"] else f"{s} (from step {a['first_difference']})"


def table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads (llama.cpp the "
        f"same); torch {m['torch']}, transformers {m['transformers']}, llama-cpp-python "
        f"{m['llama_cpp_python']}; load average {m['load_avg_start'][0]} at the start, "
        f"{m['load_avg_end'][0]} at the end",
        f"weights: {report['weights']}; tokenizer: {report['tokenizer']}",
        f"prompt {report['options']['prompt_len']} tokens, {report['options']['new_tokens']} "
        f"new tokens, greedy, best of {report['options']['repeats']} after a warm-up; llama.cpp "
        f"batching: {report['llama_cpp_batching']}",
        "",
    ]
    by_size = {x["size"]: x for x in report["models"]}
    lines += [
        "| model | batch | engine | weights/KV | prefill tok/s | decode tok/s | ms/step (p50) "
        "| end-to-end tok/s | lmlab ÷ engine (decode) | tokens = lmlab's |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for block in report["cpu"]:
        info = by_size[block["size"]]
        label = f"{block['size']} ({info['params'] / 1e6:.1f}M)"
        for r in block["results"]:
            ratio = f"{r['lmlab_ratio']:.2f}×" if "lmlab_ratio" in r else "—"
            kv = "f32" if r["kind"] == "llama.cpp" else r["precision"]
            lines.append(
                f"| {label} | {block['batch']} | {r['engine']} | {r['precision']}/{kv} | "
                f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} | "
                f"{r['step_ms_p50']:.2f} | {r['e2e_tokens_per_s']:,.1f} | {ratio} | {_agree(r)} |"
            )
    lines += ["", "Targets (decode tokens/s, lmlab ÷ peer):", ""]
    for block in report["cpu"]:
        for t in block["targets"]:
            verdict = "met" if t["met"] else "NOT met"
            lines.append(
                f"- {block['size']}, batch {block['batch']}: lmlab ÷ {t['peer']} = "
                f"{t['ratio']:.2f} (target >= {t['target']}): {verdict}"
            )
    noisy = [
        f"{block['size']} batch {block['batch']} {r['engine']} ({r['round_spread']:.1f}x)"
        for block in report["cpu"] + report["gpu"]
        for r in block["results"]
        if r["round_spread"] > NOISY
    ]
    if noisy:
        lines += [
            "",
            f"Unsteady (fastest round > {NOISY}x the slowest: other load on the machine; the "
            "best round is reported, the JSON has every round): " + ", ".join(noisy),
        ]
    if report["gpu"]:
        g0 = report["gpu"][0]
        lines += [
            "",
            f"GPU: {g0['device']}, {g0['dtype']}, bandwidth {g0['bandwidth_gbs']} GB/s "
            f"({g0['bandwidth_source']}); bound = batch x bandwidth / (weights + KV bytes "
            "per step)",
            "",
            "| model | batch | engine | prefill tok/s | decode tok/s | ms/step (p50) | MB/step | "
            "bound tok/s | of bound |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for block in report["gpu"]:
            bound = block["bound_decode_tokens_per_s"]
            for r in block["results"]:
                frac = f"{100 * r['bound_fraction']:.1f}%" if r["bound_fraction"] else "—"
                lines.append(
                    f"| {block['size']} | {block['batch']} | {r['engine']} | "
                    f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} | "
                    f"{r['step_ms_p50']:.2f} | {block['bytes_per_step']['total'] / 1e6:,.1f} | "
                    f"{bound if bound else '—'} | {frac} |"
                )
    elif not torch.cuda.is_available():
        lines += ["", "GPU: none here (torch.cuda.is_available() is False); no GPU section."]
    return "\n".join(lines)


# --- arguments ----------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in _csv(text)]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: expected comma-separated positive integers, like 1,8")
    return vals


ENGINES = ("lmlab-runner", "transformers", "llama.cpp")  # lmlab's generate always runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="parameter budgets (default 10m,100m)")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, few tokens: a smoke test")
    ap.add_argument("--qtypes", default="f32,f16,q8_0", help=f"GGUF types, of {','.join(QTYPES)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help="peers besides lmlab")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE size to train")
    ap.add_argument(
        "--tokenizer", default=None, help="a tokenizer dir to use instead (runs/X/tokenizer)"
    )
    ap.add_argument("--gpu", default="auto", choices=["auto", "off"], help="GPU section if CUDA")
    ap.add_argument("--gpu-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/bench/infer_throughput.json", help="report path")
    args = ap.parse_args(argv)
    quick = args.quick
    args.sizes = _csv(args.sizes or ("2m" if quick else "10m,100m"))
    for s in args.sizes:
        parse_size(s)  # a UsageError naming the bad size
    args.batches = _positive_ints(args.batches or ("1,2" if quick else "1,8"), "--batches")
    args.prompt_len = args.prompt_len or (16 if quick else 64)
    args.new_tokens = args.new_tokens or (8 if quick else 64)
    args.repeats = args.repeats or (1 if quick else 3)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        raise UsageError(
            "--prompt-len >= 1, --new-tokens >= 2, --repeats >= 1 and --threads >= 1 are needed"
        )
    args.qtypes = _csv(args.qtypes)
    if not args.qtypes or not set(args.qtypes) <= set(QTYPES):
        raise UsageError(f"--qtypes {','.join(args.qtypes)!r}: choose from {','.join(QTYPES)}")
    args.engines = _csv(args.engines)
    if not set(args.engines) <= set(ENGINES):
        raise UsageError(f"--engines {','.join(args.engines)!r}: a subset of {','.join(ENGINES)}")
    if args.vocab < 256 + len(SPECIAL_TOKENS):
        raise UsageError(f"--vocab {args.vocab}: a byte-level BPE needs at least 261 tokens")
    if args.bandwidth_gbs is not None and args.bandwidth_gbs <= 0:
        raise UsageError("--bandwidth-gbs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        report = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.json, report)
    print()
    print(table(report))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

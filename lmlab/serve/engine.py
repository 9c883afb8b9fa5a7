"""One served model: its continuous-batching scheduler, stepped by a thread of its own, and
the bridge that lets asyncio request handlers submit work and await its tokens.

Why a thread: a decode step is a blocking torch call; on the event loop it would stall
every connection (a slow client, a health check) for its duration. The scheduler is
touched by its thread only: handlers validate a request in their own thread (the checks
read nothing that changes), then hand it over through an inbox; the thread drains the
inbox between steps, so requests join and leave the batch between decode steps. Tokens
go back to the handlers' asyncio queues, one `call_soon_threadsafe` per step; a handler
whose client went away aborts, and its blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.infer.scheduler import Event, Scheduler
from lmlab.serve.metrics import Metrics

log = logging.getLogger("lmlab.serve")


class Busy(Exception):
    """Every running slot and waiting place is taken (HTTP 429)."""


@dataclass
class Handle:
    """A submitted request as its handler sees it: lists of events (or an exception) arrive
    on `queue`; `ids` are its samples' request ids, known once the engine took it."""

    loop: asyncio.AbstractEventLoop
    n: int
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    last: dict[int, float] = field(default_factory=dict)  # request id -> last token time
    left: int = 0  # samples not yet finished
    done: bool = False


@dataclass
class EngineLimits:
    max_concurrency: int = 32  # sequences decoded together (the scheduler's max_batch)
    max_waiting: int = 256  # sequences queued beyond those; more is refused with 429
    max_model_len: int | None = None  # prompt + output; None: the model's max_seq_len
    kv_cache_gb: float = 1.0  # the paged KV pool (less when every sequence fits in less)
    block_size: int = 16
    max_prefill_tokens: int = 512  # prompt tokens per step: a burst of arrivals is spread


class Engine:
    """A model, its tokenizer and its scheduler thread."""

    def __init__(
        self, name: str, model, tok, limits: EngineLimits, metrics: Metrics, path: str = ""
    ) -> None:
        from lmlab.infer.paged import PagedKVCache

        self.name, self.model, self.tok, self.path = name, model, tok, path
        self.created = time.time()
        self.limits, self.metrics = limits, metrics
        for counter in (
            "lmlab_requests_total",
            "lmlab_requests_aborted_total",
            "lmlab_prompt_tokens_total",
            "lmlab_generation_tokens_total",
        ):
            metrics.inc(counter, name, 0)  # shown from the start, as 0
        max_len = limits.max_model_len or model.cfg.max_seq_len
        if not 1 <= max_len <= model.cfg.max_seq_len:
            raise UsageError(
                f"--max-model-len {max_len}: must be in [1, {model.cfg.max_seq_len}] "
                f"(the context of {name})"
            )
        if (
            limits.max_concurrency < 1
            or limits.max_waiting < 0
            or limits.kv_cache_gb <= 0
            or limits.max_prefill_tokens < 1
        ):
            raise UsageError(
                "serve: needs --max-concurrency >= 1, --max-waiting >= 0, --kv-cache-gb > 0, "
                "--max-prefill-tokens >= 1"
            )
        p = next(model.parameters())
        per_block = PagedKVCache.block_bytes(model.cfg, limits.block_size, p.dtype)
        every = limits.max_concurrency * -(-max_len // limits.block_size)
        by_memory = int(limits.kv_cache_gb * 2**30 // per_block)
        n_blocks = min(every, by_memory)
        if n_blocks * limits.block_size < max_len:
            raise UsageError(
                f"serve: --kv-cache-gb {limits.kv_cache_gb} holds {n_blocks * limits.block_size}"
                f" tokens of {name}, less than one sequence of --max-model-len {max_len}"
            )
        self.sched = Scheduler(
            model,
            n_blocks=n_blocks,
            block_size=limits.block_size,
            max_batch=limits.max_concurrency,
            max_len=max_len,
            tokenizer=tok,
            prefill_chunk=limits.max_prefill_tokens,
            prefill_budget=limits.max_prefill_tokens,
        )
        self.max_len = max_len
        self.cond = threading.Condition()
        self.inbox: list[tuple[str, Handle, object]] = []
        self.handles: dict[int, Handle] = {}
        self.in_flight = 0  # sequences submitted and not finished
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"engine:{name}", daemon=True)

    # --- from the event loop -------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, prompt: list[int], cfg: GenerationConfig) -> Handle:
        """Validate and queue; raises UsageError (400) or Busy (429)."""
        req = self.sched.request(prompt, cfg)
        n = 1 + len(req.samples)
        handle = Handle(asyncio.get_running_loop(), n, len(prompt), left=n)
        with self.cond:
            capacity = self.limits.max_concurrency + self.limits.max_waiting
            if self.in_flight + n > capacity:
                raise Busy(
                    f"{self.name} is at capacity ({self.in_flight} sequences running or "
                    f"waiting, at most {capacity}); retry later"
                )
            self.in_flight += n
            self.inbox.append(("add", handle, req))
            self.cond.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """Drop a request (its client went away or timed out); a no-op once it finished."""
        with self.cond:
            if handle.done:
                return
            self.inbox.append(("abort", handle, None))
            self.cond.notify()

    @property
    def running(self) -> int:
        return len(self.sched.running)

    @property
    def waiting(self) -> int:
        with self.cond:
            queued = sum(h.n for op, h, _ in self.inbox if op == "add")
        return len(self.sched.waiting) + queued

    # --- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.inbox and not self.sched.has_work() and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                ops, self.inbox = self.inbox, []
            for op, handle, req in ops:
                if op == "add":
                    handle.ids = self.sched.enqueue(req)
                    for i in handle.ids:
                        self.handles[i] = handle
                    self.metrics.inc("lmlab_prompt_tokens_total", self.name, handle.prompt_tokens)
                elif not handle.done:
                    self._drop(handle, aborted=True)
            if not self.sched.has_work():
                continue
            try:
                events = self.sched.step()
            except Exception as e:  # a bug or out of memory: fail what is in flight, go on
                log.exception("engine %s: a step failed", self.name)
                for handle in {id(h): h for h in self.handles.values()}.values():
                    self._drop(handle, aborted=True, error=e)
                continue
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        now = time.perf_counter()
        by_handle: dict[int, tuple[Handle, list[Event]]] = {}
        for ev in events:
            handle = self.handles.get(ev.request_id)
            if handle is None:
                continue
            by_handle.setdefault(id(handle), (handle, []))[1].append(ev)
            last = handle.last.get(ev.request_id)
            if last is None:
                self.metrics.observe(
                    "lmlab_time_to_first_token_seconds", self.name, now - handle.arrival
                )
            else:
                self.metrics.observe("lmlab_inter_token_latency_seconds", self.name, now - last)
            handle.last[ev.request_id] = now
            self.metrics.inc("lmlab_generation_tokens_total", self.name)  # a stop id too
            if ev.finished:
                self.sched.finished.pop(ev.request_id, None)
                del self.handles[ev.request_id]
                handle.left -= 1
        # one wake-up of each event loop per step, not one per request (32 at 32 streams)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Event]]]] = {}
        for handle, evs in by_handle.values():
            by_loop.setdefault(handle.loop, []).append((handle.queue, evs))
            if handle.left == 0:
                self._close(handle)
                self.metrics.inc("lmlab_requests_total", self.name)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _drop(self, handle: Handle, aborted: bool, error: BaseException | None = None) -> None:
        self.sched.abort(handle.ids)
        for i in handle.ids:
            self.handles.pop(i, None)
        self._close(handle)
        if aborted:
            self.metrics.inc("lmlab_requests_aborted_total", self.name)
        if error is not None:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, error)

    def _close(self, handle: Handle) -> None:
        with self.cond:
            if not handle.done:
                handle.done = True
                self.in_flight -= handle.n


def _put_all(items: list[tuple[asyncio.Queue, list[Event]]]) -> None:
    for queue, evs in items:
        queue.put_nowait(evs)


def load_engine(
    name: str, path: str, limits: EngineLimits, metrics: Metrics, shared_base=None
) -> Engine:
    """Load a model (run or checkpoint directory, Hugging Face directory, GGUF file, a
    store name, an adapter directory) for serving. `shared_base`: (its path, the model
    loaded from it); an adapter of that base is put on it without a second copy of its
    weights."""
    from lmlab import load_model, load_tokenizer
    from lmlab.model.adapter_ops import adapter_on_loaded
    from lmlab.model.loading import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = adapter_on_loaded(ckpt, *shared_base) if shared_base is not None else None
    if model is None:
        model = load_model(ckpt)
    return Engine(name, model.eval(), load_tokenizer(ckpt), limits, metrics, path=str(ckpt))

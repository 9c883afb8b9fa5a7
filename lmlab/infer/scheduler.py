"""Continuous batching (Yu et al. 2022, "Orca": iteration-level scheduling) over the paged
KV cache.

A static batch runs until its longest member finishes, so a short answer holds its row
idle and a new request waits for the whole batch. Here the batch is re-formed every
iteration: `step()` admits waiting requests while blocks allow (prefilling each one), then
runs one batched decode forward over every running sequence; a sequence that finishes
leaves at once and frees its blocks, and a new one joins at the next step.

Memory: admission takes a request only when its whole prompt fits in the free blocks and
enough stay free for this step's decode; decoding takes one block per sequence per
`block_size` tokens. When a decode step still finds too few, the *youngest* running
sequence is preempted: its blocks are released and it goes back to the front of the queue
to be recomputed from its tokens (vLLM's recompute preemption; its full blocks usually
stay in the prefix cache, so the recompute is mostly a cache hit). The oldest sequence
always fits alone (`add` refuses a request that could not), so everything finishes.

Sampling is per request through `lmlab.infer.sampling` with one `torch.Generator` each,
so a seeded request draws the same tokens whatever else shares its batch.

What a server needs on top: `n > 1` samples of one prompt are prefilled once, then forked
(their full prompt blocks shared, the partial last one copied), sample i seeded with
seed + i; stop strings end a request as soon as its decoded text holds one (given the
tokenizer); `abort` frees a request's blocks at once (a client that went away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch

from lmlab.errors import UsageError
from lmlab.infer.engine import StopStrings
from lmlab.infer.options import GenerationConfig
from lmlab.infer.paged import PagedKVCache, Sequence, block_hash, check_model
from lmlab.infer.sampling import (
    History,
    apply_penalties,
    greedy_tokens,
    make_generator,
    pick,
    top_logprobs,
)
from lmlab.utils import call_with_stack_room


@dataclass
class Event:
    """One generated token of one request. The stop id that ends a request is reported in
    its last event (finish_reason "stop") but is not part of the output."""

    request_id: int
    token: int  # a stop string's last token is part of the output; a stop id is not
    logprob: float | None = None  # the model's log-probability of `token`, if asked
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"


@dataclass
class Stats:
    steps: int = 0
    forwards: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    generated_tokens: int = 0
    prefix_hit_tokens: int = 0  # tokens whose keys/values came from the prefix cache
    preemptions: int = 0
    peak_blocks_used: int = 0
    peak_batch: int = 0


@dataclass
class Request:
    id: int
    prompt: list[int]
    cfg: GenerationConfig
    limit: int  # most tokens it may generate (max_new_tokens, capped by max_seq_len)
    seq: Sequence
    gen: torch.Generator
    hist: History | None
    stops: StopStrings | None = None
    samples: list[Request] = field(default_factory=list)  # n > 1: forked after the prefill
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Scheduler:
    """Continuous batching of generation requests on one causal decoder.

    `n_blocks` sizes the cache (default: every one of `max_batch` sequences can reach
    `max_len` tokens, so nothing is ever preempted); `prefill_chunk` splits a long prompt over
    several steps so that one long prefill does not stall the others' decoding;
    `prefill_budget` caps the prompt tokens run per step over all requests (vLLM's
    max_num_batched_tokens), so a burst of arrivals is admitted over several steps, the
    first of them streaming early and the running ones still decoding. `max_len`
    (default: the model's `max_seq_len`) bounds prompt + output; `tokenizer` lets requests
    stop at strings."""

    def __init__(
        self,
        model: torch.nn.Module,
        n_blocks: int | None = None,
        block_size: int = 16,
        max_batch: int = 32,
        prefill_chunk: int | None = None,
        prefix_caching: bool = True,
        prefill_budget: int | None = None,
        max_len: int | None = None,
        tokenizer=None,
    ) -> None:
        self.model = check_model(model)
        self.cfg = self.model.cfg
        self.max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= self.max_len <= self.cfg.max_seq_len:
            raise UsageError(
                f"scheduler: max_len must be in [1, {self.cfg.max_seq_len}] (the model's "
                f"max_seq_len), got {self.max_len}"
            )
        self.tokenizer = tokenizer
        if max_batch < 1:
            raise UsageError(f"scheduler: max_batch must be >= 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise UsageError(f"scheduler: prefill_chunk must be >= 1, got {prefill_chunk}")
        if block_size < 1:
            raise UsageError(f"scheduler: block_size must be >= 1, got {block_size}")
        if n_blocks is None:
            n_blocks = max_batch * -(-self.max_len // block_size)
        self.cache = PagedKVCache.for_model(self.model, n_blocks, block_size)
        self.max_batch = max_batch
        if prefill_budget is not None and prefill_budget < 1:
            raise UsageError(f"scheduler: prefill_budget must be >= 1, got {prefill_budget}")
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self._spent = 0  # prompt tokens run in this step
        self.prefix_caching = prefix_caching
        self.device = next(self.model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last is the youngest
        self.finished: dict[int, Request] = {}  # until taken (`run` takes its own)
        self.stats = Stats()
        self._next_id = 0

    # --- requests ------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], cfg: GenerationConfig | None = None) -> int:
        """Queue a request; returns its id (its `n` samples take that id and the n - 1 after
        it). Refuses what this scheduler cannot serve."""
        return self._enqueue(self.request(prompt_ids, cfg))

    def _enqueue(self, req: Request) -> int:
        for r in (req, *req.samples):
            r.id = self._next_id
            self._next_id += 1
        self.waiting.append(req)
        return req.id

    def request(self, prompt_ids: list[int], cfg: GenerationConfig | None = None) -> Request:
        """A validated request, not yet queued (`enqueue` queues it): a server checks a
        request in its own thread and hands it to the thread that steps the scheduler."""
        cfg = (cfg or GenerationConfig()).validate()
        unsupported = [
            (cfg.num_beams != 1, "num_beams", "beam search needs lmlab.infer.generate"),
            (cfg.n > self.max_batch, "n", f"more samples than max_batch={self.max_batch}"),
            (bool(cfg.stop_strings) and self.tokenizer is None, "stop_strings", "no tokenizer"),
        ]
        for bad, key, hint in unsupported:
            if bad:
                raise UsageError(f"scheduler: generation.{key} is not supported ({hint})")
        prompt = [int(t) for t in prompt_ids]
        max_len, vocab = self.max_len, self.cfg.vocab_size
        if not prompt:
            raise UsageError("scheduler: empty prompt")
        if len(prompt) > max_len:
            raise UsageError(f"scheduler: prompt of {len(prompt)} tokens exceeds max_len={max_len}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UsageError(f"scheduler: prompt token ids must be in [0, {vocab})")
        if any(not 0 <= int(t) < vocab for t in cfg.logit_bias):
            raise UsageError(f"scheduler: logit_bias token ids must be in [0, {vocab})")
        # the model sees at most max_len positions; the last token is never fed back
        limit = min(cfg.max_new_tokens, max_len - len(prompt) + 1)
        need = self.cache.blocks_for(len(prompt) + limit - 1)
        if need > self.cache.n_blocks:
            raise UsageError(
                f"scheduler: a request of {len(prompt)} prompt + {limit} new tokens needs "
                f"{need} blocks of {self.cache.block_size}; the cache has {self.cache.n_blocks}"
            )
        reqs = []
        for i in range(cfg.n):
            seed = None if cfg.seed is None else cfg.seed + i
            c = replace(cfg, n=1, seed=seed)
            hist = History([prompt], vocab) if c.has_penalties else None
            stops = StopStrings(self.tokenizer, c.stop_strings) if c.stop_strings else None
            gen = make_generator(seed, "cpu")
            reqs.append(Request(-1, prompt, c, limit, Sequence(list(prompt)), gen, hist, stops))
        reqs[0].samples = reqs[1:]
        return reqs[0]

    def enqueue(self, req: Request) -> list[int]:
        """Queue a request made by `request`; the ids of its samples."""
        self._enqueue(req)
        return [r.id for r in (req, *req.samples)]

    def abort(self, ids: Iterable[int]) -> None:
        """Drop these requests wherever they are, freeing their blocks now. A sample not yet
        forked from an aborted request is queued on its own instead."""
        ids = set(ids)
        for req in [r for r in self.running if r.id in ids]:
            self.cache.release(req.seq)
            self.running.remove(req)
            self._orphan(req, ids, at=len(self.waiting))
        for i, req in reversed(list(enumerate(self.waiting))):
            if req.id in ids:
                del self.waiting[i]
                self._orphan(req, ids, at=i)
            else:
                req.samples = [r for r in req.samples if r.id not in ids]
        for i in ids & self.finished.keys():
            del self.finished[i]

    def _orphan(self, req: Request, ids: set[int], at: int) -> None:
        """Queue the samples still attached to a request that goes away."""
        for sample in reversed([r for r in req.samples if r.id not in ids]):
            self.waiting.insert(at, sample)
        req.samples = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one iteration -------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Continue chunked prefills, admit and prefill what fits, then decode one token for
        every running sequence (from a frame with room on CPython's frame stack: see
        `call_with_stack_room`)."""
        return call_with_stack_room(self._step)

    @torch.no_grad()
    def _step(self) -> list[Event]:
        self._spent = 0
        self._computing: set[bytes] = set()  # blocks this step's prefills will fill
        batch = [(r, self._take(r)) for r in self.running if self._prefilling(r) and self._room()]
        while self._room() > 0 and (req := self._admit()) is not None:
            if self._prefilling(req):
                batch.append((req, self._take(req)))
        events: list[Event] = []
        for group in self._groups(batch):
            events += self._prefill(group)
        decoding = [r for r in self.running if r.seq.pending == 1 and not r.samples]
        decoding = self._make_room(decoding)
        if decoding:
            events += self._decode(decoding)
        self.stats.steps += 1
        self.stats.peak_blocks_used = self.cache.peak_used
        return events

    def _room(self) -> float:
        """Prompt tokens this step may still run."""
        return float("inf") if self.prefill_budget is None else self.prefill_budget - self._spent

    @staticmethod
    def _prefilling(req: Request) -> bool:
        """More than the last token to run, or samples to fork after it (a decode step has
        no place to fork them, even for a one-token prompt)."""
        return req.seq.pending > 1 or bool(req.samples)

    def _admit(self) -> Request | None:
        """First come, first served: the head of the queue waits until it fits (a preempted
        request is back at the head, so it is not overtaken). Its prompt's blocks are
        reserved whole, and this step's decode must still find its blocks free."""
        if not self.waiting:
            return None
        req = self.waiting[0]
        if self.running and len(self.running) + 1 + len(req.samples) > self.max_batch:
            return None
        cache = self.cache
        seq = req.seq
        hit = cache.match_prefix(seq) if self.prefix_caching else 0
        growth = sum(cache.blocks_needed(r.seq, 1) for r in self.running if r.seq.pending == 1)
        copies = len(req.samples) if len(seq.tokens) % cache.block_size else 0
        fits = cache.blocks_needed(seq, seq.pending) + copies + growth <= cache.alloc.available
        upto = len(seq.tokens) - 1  # the blocks a prefix match could take
        shares = (  # named only when this step computes blocks (hashing costs a pass)
            self.prefix_caching
            and bool(self._computing)
            and not self._computing.isdisjoint(self._names(seq, upto))
        )
        if not fits or shares:  # shares: next step its prefix is cached
            cache.release(seq)
            return None
        self.stats.prefix_hit_tokens += hit
        cache.reserve(seq, seq.pending)
        self.waiting.popleft()
        self.running.append(req)
        self.running.sort(key=lambda r: r.id)
        return req

    def _take(self, req: Request) -> int:
        """How many of a sequence's pending tokens this step runs (its chunk, within the
        budget), noting the blocks they will fill so that a request sharing them waits a
        step and finds them cached instead of computing them again."""
        seq = req.seq
        t = seq.pending if self.prefill_chunk is None else min(seq.pending, self.prefill_chunk)
        t = int(min(t, self._room()))
        self._spent += t
        self._computing.update(self._names(seq, seq.n_cached + t)[len(seq.hashes) :])
        return t

    def _names(self, seq: Sequence, upto: int) -> list[bytes]:
        """The names of the sequence's full blocks within its first `upto` tokens."""
        bs = self.cache.block_size
        names = list(seq.hashes)
        for i in range(len(names), upto // bs):
            names.append(block_hash(names[-1] if names else b"", seq.tokens[i * bs : (i + 1) * bs]))
        return names

    @staticmethod
    def _groups(batch: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Prefills run together in one forward when padding to the longest costs little:
        sorted by length, a group grows while its padded tokens stay within 1.5 times its
        real ones (or 64 more)."""
        groups: list[list[tuple[Request, int]]] = []
        for item in sorted(batch, key=lambda x: x[1]):
            if groups:
                g = groups[-1]
                real = sum(t for _, t in g) + item[1]
                if (len(g) + 1) * item[1] <= max(1.5 * real, real + 64):
                    g.append(item)
                    continue
            groups.append([item])
        return groups

    def _prefill(self, group: list[tuple[Request, int]]) -> list[Event]:
        """Run (a chunk of) each sequence's pending tokens in one forward; a sequence whose
        prompt is done samples its next token (and forks its samples)."""
        seqs = [r.seq for r, _ in group]
        ts = [t for _, t in group]
        width = max(ts)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, (seq, t) in enumerate(zip(seqs, ts, strict=True)):
            ids[row, width - t :] = torch.tensor(seq.tokens[seq.n_cached : seq.n_cached + t])
        ids = ids.to(self.device)
        if len(group) == 1:
            view = self.cache.prefill_view(seqs[0], ts[0])
            logits = self.model(ids, cache=view, logits_to_keep=1)
        else:
            view = self.cache.batch_view(seqs, ts)
            logits = self.model(
                ids,
                cache=view,
                attention_mask=view.attention_mask,
                position_ids=view.position_ids,
                logits_to_keep=1,
            )
        self.stats.forwards += 1
        self.stats.prefill_tokens += sum(ts)
        reqs, rows = [], []
        for row, (req, _) in enumerate(group):
            if req.seq.pending:  # a chunk: the rest follows next step
                continue
            done = [req, *self._fork(req)]
            reqs += done
            rows += [row] * len(done)
        if not reqs:
            return []
        return self._sample(reqs, logits[rows, -1, :].float())

    def _fork(self, req: Request) -> list[Request]:
        """The samples of a prefilled prompt, now holding its cache (those for which no block
        is left go back to the queue and are prefilled on their own, mostly from the
        prefix cache)."""
        forked, left = [], []
        for sample in req.samples:
            (forked if self.cache.fork(req.seq, sample.seq) else left).append(sample)
        req.samples = []
        self.waiting.extendleft(reversed(left))
        self.running.extend(forked)
        self.running.sort(key=lambda r: r.id)
        return forked

    def _make_room(self, decoding: list[Request]) -> list[Request]:
        """Free blocks for this step's decode, preempting the youngest sequences if needed."""
        cache = self.cache
        while True:
            need = sum(cache.blocks_needed(r.seq, 1) for r in decoding)
            if need <= cache.alloc.available:
                break
            if len(self.running) == 1:  # cannot happen: `add` checks a request fits alone
                raise RuntimeError("scheduler: one sequence does not fit the cache")
            victim = self.running.pop()  # the youngest
            cache.release(victim.seq)
            self.waiting.appendleft(victim)
            self.stats.preemptions += 1
            decoding = [r for r in decoding if r is not victim]
        for r in decoding:
            cache.reserve(r.seq, 1)
        return decoding

    def _decode(self, reqs: list[Request]) -> list[Event]:
        view = self.cache.decode_view([r.seq for r in reqs])
        ids = torch.tensor([[r.seq.tokens[-1]] for r in reqs], device=self.device)
        logits = self.model(
            ids, cache=view, attention_mask=view.attention_mask, position_ids=view.position_ids
        )
        self.stats.forwards += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(reqs))
        return self._sample(reqs, logits[:, -1, :].float())

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[Event]:
        """Each row through its own request's penalties, warpers and generator."""
        greedy = greedy_tokens(logits).tolist()
        # sampling, penalties and logprobs run on the host with host generators, as
        # `generate` does, so a seed draws the same tokens in both engines on any device
        host = None
        if any(not r.cfg.greedy or r.hist is not None or r.cfg.logprobs is not None for r in reqs):
            host = logits.cpu()
        want_lp = any(r.cfg.logprobs is not None for r in reqs)
        logprobs = host.log_softmax(-1) if want_lp else None
        events = []
        for row, req in enumerate(reqs):
            cfg = req.cfg
            if cfg.greedy and req.hist is None:
                token = greedy[row]
            else:
                x = host[row : row + 1]
                if req.hist is not None:
                    x = apply_penalties(x, req.hist, cfg)
                token = int(pick(x, cfg, req.gen)[0])
            ev = Event(req.id, token)
            if cfg.logprobs is not None:
                lp, tops = top_logprobs(
                    logprobs[row : row + 1], torch.tensor([token]), cfg.logprobs
                )
                ev.logprob, ev.top_logprobs = lp[0], tops[0]
            if req.hist is not None:
                req.hist.push([token])
            req.seq.tokens.append(token)
            if token in cfg.stop_ids:
                ev.finish_reason = "stop"
            else:
                req.output.append(token)
                self.stats.generated_tokens += 1
                if req.stops is not None and req.stops.hit(req.output):
                    ev.finish_reason = "stop"
                elif len(req.output) >= req.limit:
                    ev.finish_reason = "length"
            if ev.finish_reason is not None:
                ev.finished = True
                self._finish(req, ev.finish_reason)
            events.append(ev)
        return events

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.cache.release(req.seq)
        self.running.remove(req)
        self.finished[req.id] = req

    # --- drivers -------------------------------------------------------------------------

    def stream(self) -> Iterator[Event]:
        """Events as they happen until every queued request is done (more may be added
        between events: they join at the next step)."""
        while self.has_work():
            yield from self.step()

    def run(
        self,
        prompts: list[list[int]],
        cfgs: GenerationConfig | list[GenerationConfig] | None = None,
    ) -> list[list[int]]:
        """Generate for every prompt; the outputs in prompt order, a prompt's `n` samples
        one after the other (stop ids left out)."""
        if cfgs is None or isinstance(cfgs, GenerationConfig):
            cfgs = [cfgs or GenerationConfig()] * len(prompts)
        if len(cfgs) != len(prompts):
            raise UsageError(f"scheduler: {len(prompts)} prompts but {len(cfgs)} configs")
        reqs = [self.request(p, c) for p, c in zip(prompts, cfgs, strict=True)]  # all valid
        ids = [i for r in reqs for i in self.enqueue(r)]
        for _ in self.stream():
            pass
        return [self.finished.pop(i).output for i in ids]

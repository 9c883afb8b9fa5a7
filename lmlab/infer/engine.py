"""The engine's core: one model with its KV cache stepped over a batch (`Runner`), the
`Completion` it produces, and stop handling. Every strategy builds on these: the batched
decode loop and contrastive decoding (`generate.py`), beam search (`beam.py`), speculative
decoding (`speculative.py`) and `lmlab bench infer` (`bench.py`).

A batch may hold prompts of different lengths: they are left-padded, a key mask hides the
padding and positions count real tokens only, so each row decodes exactly as it would
alone; `select` lets finished rows leave, beams reorder and samples repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.model.transformer import KVCache, SlotWriter, decode_step, decode_step_unsupported
from lmlab.utils import call_with_stack_room


@dataclass
class Completion:
    """One generated sequence. `tokens` excludes a stop id that ended it; with stop strings,
    `text` is cut before the stop string while `tokens` runs to the token completing it."""

    prompt_index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = "length"  # "stop" | "length"; None while still generating
    text: str | None = None
    logprobs: list[float] | None = None  # log p(chosen token) under the model
    top_logprobs: list[list[tuple[int, float]]] | None = None
    score: float | None = None  # beam search: length-penalised sum of log-probs


# --- one model stepped over a batch -------------------------------------------------------


def fit_prompts(model, prompts: list[list[int]], budget: int) -> tuple[list[list[int]], int]:
    """Keep each prompt's last tokens so prompt + budget fits the context; the budget is
    capped to leave at least one prompt token. Returns the prompts and the budget."""
    max_len = model.cfg.max_seq_len
    budget = min(budget, max_len - 1)
    room = max_len - budget
    out = []
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"generate: prompt {i} is empty")
        out.append(list(p[-room:]) if len(p) > room else list(p))
    return out, budget


_compiled_decode_step = None


def compiled_decode_step(model):
    """`decode_step` under `torch.compile` (one graph per model and shape; a second batch
    size or cache length recompiles once with those dimensions dynamic; inductor's disk
    cache makes a later process's compile quicker)."""
    global _compiled_decode_step
    why = decode_step_unsupported(model)
    if why is not None:
        raise UsageError(f"compiled decoding: {why}; run without --compile")
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True)
    return _compiled_decode_step


class Runner:
    """A model with its KV cache, padding mask and (encoder-decoder) memory, for a batch.

    `prefill(prompts)` returns the last-position logits [B, V]; `step(tokens [B])` feeds
    one token per row; `select(rows)` keeps, reorders or repeats rows (finished rows
    leaving, beams, n samples); `rollback(pos)` drops cached tokens (speculative)."""

    def __init__(self, model, slots_after_prompt: int, compile: bool = False) -> None:
        self.model = model
        # decode steps through one compiled graph over a static cache (`decode_step`)
        self.compiled = compiled_decode_step(model) if compile else None
        self._slots: SlotWriter | None = None
        self.cfg = model.cfg
        self.family = model.cfg.family
        self.extra = slots_after_prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # [B, slots] 1 = real token (None: no padding)
        self.memory: torch.Tensor | None = None
        self.memory_mask: torch.Tensor | None = None
        self.prefix = 0

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        if self.family == "encoder_decoder":  # encode once; the decoder starts from scratch
            self.memory_mask = mask if padded else None
            self.memory = self.model.encode(ids, self.memory_mask)
            self.cache = self._empty_cache(b, 1 + self.extra)
            start = torch.full((b, 1), self.cfg.decoder_start_id, device=self.device)
            return self._forward(start)[:, -1].float()
        virtual = self.model._modules.get("virtual_prompt")  # prefix or prompt tuning
        n = virtual.n if virtual is not None else 0
        slots = n + width + self.extra
        self.cache = self._empty_cache(b, slots)
        slots = self.cache.capacity  # rounded up for a compiled step
        if virtual is not None:  # the virtual tokens take the first slots, once
            virtual.fill(self.model, self.cache)
        if padded:
            self.mask = torch.ones(b, slots, dtype=torch.long, device=self.device)
            self.mask[:, n : n + width] = mask
        self.prefix = width
        return self._forward(ids, keep=1)[:, -1].float()

    def _empty_cache(self, b: int, slots: int) -> KVCache:
        if self.compiled is not None:  # capacities in steps of 256: fewer graphs to compile
            slots = -(-slots // 256) * 256
        return KVCache.empty(
            self.cfg, b, slots, self.device, self.dtype, per_layer=self.compiled is not None
        )

    def _forward(self, x: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Logits [B, t, V] (the last `keep` positions if > 0) for x [B, t] after the cache."""
        if self.family == "encoder_decoder":
            return call_with_stack_room(
                self.model.decode, x, self.memory, self.memory_mask, cache=self.cache
            )
        mask = None if self.mask is None else self.mask[:, : self.cache.pos + x.shape[1]]
        prefix = self.prefix if self.family == "prefix" else None
        return call_with_stack_room(
            self.model, x, self.cache, attention_mask=mask, prefix_len=prefix, logits_to_keep=keep
        )

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x.to(self.device)).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self._forward(tokens.to(self.device)[:, None])[:, -1].float()
        cache = self.cache
        if cache.pos >= cache.capacity:
            raise ValueError(f"decode step past the KV cache ({cache.capacity} slots)")
        if self._slots is None or self._slots.k is not cache.k:  # new, or rows selected
            at = torch.zeros(1, dtype=torch.long, device=self.device)
            self._slots = SlotWriter(cache.k, cache.v, at)
        self._slots.at.fill_(cache.pos)
        try:
            logits = call_with_stack_room(
                self.compiled, self.model, tokens.to(self.device)[:, None], self._slots, self.mask
            )
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler, for one
            raise UsageError(
                f"compiled decoding: torch.compile failed ({e}); run without --compile"
            ) from e
        cache.advance(1)
        return logits.float()

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.cache.select(rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, rows)
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, rows)

    def rollback(self, pos: int) -> None:
        self.cache.pos = pos


# --- stopping ---------------------------------------------------------------------------


class StopStrings:
    """Finds the earliest stop string in a row's decoded output, decoding only the tail
    that could hold a newly completed one."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        if stops and tokenizer is None:
            raise UsageError("generate: stop strings need the tokenizer")
        self.tok, self.stops = tokenizer, stops
        # a byte-level token is >= 1 byte and a character <= 4 bytes
        self.window = 4 * max((len(s) for s in stops), default=0) + 2

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tok.decode(tokens[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def cut(self, text: str) -> str:
        ends = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(ends)] if ends else text


def finish_text(comps: list[Completion], tokenizer, cfg: GenerationConfig) -> None:
    """Fill each completion's `text`: its tokens decoded, cut before a stop string."""
    stop_strings = StopStrings(tokenizer, cfg.stop_strings)
    for c in comps:
        c.text = stop_strings.cut(tokenizer.decode(c.tokens, skip_special_tokens=True))

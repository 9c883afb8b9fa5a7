"""The generation engine: one prefill pass over the (left-padded) prompts, then one token
per row per step against a preallocated KV cache (Zhao et al. §4.2.4).

A batch may hold prompts of different lengths: they are left-padded, a key mask hides the
padding and positions count real tokens only, so each row decodes exactly as it would
alone. Rows that finish leave the batch (the cache keeps only the live rows), so a long
answer does not make the short ones pay. Beam search (`beam.py`), speculative decoding
(`speculative.py`) and the continuous-batching scheduler (`scheduler.py`) build on the
same pieces; contrastive decoding runs here, an amateur model stepped beside the expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmlab.errors import UsageError
from lmlab.infer.sampling import (
    GenerationConfig,
    History,
    apply_penalties,
    filter_logits,
    make_generator,
    pick,
    top_logprobs,
)
from lmlab.model.transformer import KVCache

__all__ = [
    "Completion",
    "GenerationConfig",
    "Runner",
    "TextStreamer",
    "filter_logits",
    "generate",
    "generate_batch",
    "stream",
]


@dataclass
class Completion:
    """One generated sequence. `tokens` excludes a stop id that ended it; with stop strings,
    `text` is cut before the stop string while `tokens` runs to the token completing it."""

    prompt_index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" | "length"
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


class Runner:
    """A model with its KV cache, padding mask and (encoder-decoder) memory, for a batch.

    `prefill(prompts)` returns the last-position logits [B, V]; `step(tokens [B])` feeds
    one token per row; `select(rows)` keeps, reorders or repeats rows (finished rows
    leaving, beams, n samples); `rollback(pos)` drops cached tokens (speculative)."""

    def __init__(self, model, slots_after_prompt: int) -> None:
        self.model = model
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
        slots = width + self.extra
        self.cache = self._empty_cache(b, slots)
        if padded:
            self.mask = torch.ones(b, slots, dtype=torch.long, device=self.device)
            self.mask[:, :width] = mask
        self.prefix = width
        return self._forward(ids, keep=1)[:, -1].float()

    def _empty_cache(self, b: int, slots: int) -> KVCache:
        return KVCache.empty(self.cfg, b, slots, device=self.device, dtype=self.dtype)

    def _forward(self, x: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Logits [B, t, V] (the last `keep` positions if > 0) for x [B, t] after the cache."""
        if self.family == "encoder_decoder":
            return self.model.decode(x, self.memory, self.memory_mask, cache=self.cache)
        mask = None if self.mask is None else self.mask[:, : self.cache.pos + x.shape[1]]
        prefix = self.prefix if self.family == "prefix" else None
        return self.model(
            x, self.cache, attention_mask=mask, prefix_len=prefix, logits_to_keep=keep
        )

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x.to(self.device)).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.to(self.device)[:, None])[:, -1].float()

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


# --- contrastive decoding -----------------------------------------------------------------


def contrastive_scores(
    expert: torch.Tensor, amateur: torch.Tensor, alpha: float, amateur_temperature: float = 1.0
) -> torch.Tensor:
    """Li et al. (2022): log p_expert - log p_amateur over the plausible tokens, those with
    p_expert >= alpha * max p_expert (the rest -inf): the amateur's mistakes, which
    the expert shares, are discounted, while the constraint keeps implausible tokens out."""
    lp_e = expert.float().log_softmax(-1)
    lp_a = (amateur.float() / amateur_temperature).log_softmax(-1)
    plausible = lp_e >= lp_e.max(-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return (lp_e - lp_a).masked_fill(~plausible, float("-inf"))


@dataclass
class Contrast:
    """An amateur model for contrastive decoding, with the plausibility threshold."""

    amateur: torch.nn.Module
    alpha: float = 0.1
    amateur_temperature: float = 1.0

    def check(self, expert) -> None:
        if not 0 < self.alpha <= 1:
            raise UsageError("contrastive decoding: alpha must be in (0, 1]")
        if self.amateur_temperature <= 0:
            raise UsageError("contrastive decoding: amateur temperature must be > 0")
        if self.amateur.cfg.vocab_size != expert.cfg.vocab_size:
            raise UsageError(
                f"contrastive decoding: the amateur's vocabulary ({self.amateur.cfg.vocab_size})"
                f" differs from the expert's ({expert.cfg.vocab_size})"
            )


# --- the decode loop ------------------------------------------------------------------------


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


def _events(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    tokenizer=None,
    contrast: Contrast | None = None,
    out: list[Completion] | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield (completion index, token) as tokens are chosen; fills `out` with Completions
    (n per prompt, in prompt order)."""
    cfg.validate()
    prompts, budget = fit_prompts(model, prompts, cfg.max_new_tokens)
    runner = Runner(model, budget)
    logits = runner.prefill(prompts)
    amateur = None
    if contrast is not None:
        contrast.check(model)
        amateur = Runner(contrast.amateur, budget)
        a_logits = amateur.prefill(prompts)
    rows = torch.arange(len(prompts)).repeat_interleave(cfg.n)
    if cfg.n > 1:  # the prompts were encoded once; each sample gets its own copy
        runner.select(rows)
        logits = logits.index_select(0, rows.to(logits.device))
        if amateur is not None:
            amateur.select(rows)
            a_logits = a_logits.index_select(0, rows.to(a_logits.device))
    comps = out if out is not None else []
    comps.extend(Completion(prompt_index=int(r)) for r in rows)
    if cfg.logprobs is not None:
        for c in comps:
            c.logprobs, c.top_logprobs = [], []
    live = list(range(len(comps)))
    hist = None
    if cfg.has_penalties:
        hist = History([prompts[i] for i in rows.tolist()], logits.shape[-1])
    stops = set(cfg.stop_ids)
    stop_strings = StopStrings(tokenizer, cfg.stop_strings)
    gen = make_generator(cfg.seed, "cpu")
    for step in range(budget):
        scores = logits
        if amateur is not None:
            scores = contrastive_scores(
                logits, a_logits, contrast.alpha, contrast.amateur_temperature
            )
        scores = apply_penalties(scores.cpu(), hist, cfg) if hist is not None else scores.cpu()
        chosen = pick(scores, cfg, gen)
        if cfg.logprobs is not None:
            lp, tops = top_logprobs(logits.cpu().log_softmax(-1), chosen, cfg.logprobs)
        keep = []
        for j, (i, t) in enumerate(zip(live, chosen.tolist(), strict=True)):
            c = comps[i]
            if t in stops:
                c.finish_reason = "stop"
                continue
            c.tokens.append(t)
            if cfg.logprobs is not None:
                c.logprobs.append(lp[j])
                c.top_logprobs.append(tops[j])
            yield i, t
            if stop_strings.hit(c.tokens):
                c.finish_reason = "stop"
                continue
            keep.append(j)
        if not keep or step == budget - 1:
            break
        if hist is not None:
            hist.push(chosen.tolist())
        if len(keep) < len(live):  # finished rows leave the batch
            idx = torch.tensor(keep)
            live = [live[j] for j in keep]
            chosen = chosen.index_select(0, idx)
            runner.select(idx)
            if amateur is not None:
                amateur.select(idx)
            if hist is not None:
                hist.select(keep)
        logits = runner.step(chosen)
        if amateur is not None:
            a_logits = amateur.step(chosen)
    if tokenizer is not None:
        finish_text(comps, tokenizer, cfg)


def finish_text(comps: list[Completion], tokenizer, cfg: GenerationConfig) -> None:
    """Fill each completion's `text`: its tokens decoded, cut before a stop string."""
    stop_strings = StopStrings(tokenizer, cfg.stop_strings)
    for c in comps:
        c.text = stop_strings.cut(tokenizer.decode(c.tokens, skip_special_tokens=True))


def generate_batch(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
    contrast: Contrast | None = None,
    out: list[Completion] | None = None,
) -> list[Completion]:
    """Generate for every prompt (n completions each, or the n-best beams) in one batch.

    `on_token(completion_index, token)` streams tokens as they are chosen; `tokenizer`
    enables stop strings and fills `Completion.text`; `contrast` switches the scores to
    contrastive decoding against an amateur model. `out` receives the completions as they
    grow, so a caller interrupted mid-batch still has those that finished."""
    comps: list[Completion] = out if out is not None else []
    if cfg.num_beams > 1:
        from lmlab.infer.beam import beam_search

        if contrast is not None:
            raise UsageError("generate: beam search and contrastive decoding do not combine")
        for i, p in enumerate(prompts):
            for c in beam_search(model, p, cfg, tokenizer):
                c.prompt_index = i
                comps.append(c)
        return comps
    for i, t in _events(model, prompts, cfg, tokenizer, contrast, comps):
        if on_token is not None:
            on_token(i, t)
    return comps


def stream(
    model, prompt_ids: list[int], cfg: GenerationConfig, tokenizer=None, contrast=None
) -> Iterator[int]:
    """Yield one prompt's generated token ids as they come (a stop id is not yielded).

    A prefix decoder reads the prompt as its bidirectional prefix; an encoder-decoder
    encodes the prompt and decodes from `decoder_start_id`."""
    if cfg.n != 1 or cfg.num_beams != 1:
        raise UsageError("stream: one sequence at a time (n = 1, no beams)")
    for _, t in _events(model, [prompt_ids], cfg, tokenizer, contrast):
        yield t


def generate(
    model,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """One prompt's generated ids (greedy by default)."""
    out = []
    for t in stream(model, prompt_ids, cfg):
        out.append(t)
        if on_token is not None:
            on_token(t)
    return out


class TextStreamer:
    """Turns a stream of byte-level token ids into text pieces, never splitting a character."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece = text[self.printed :]
        self.printed = len(text)
        return piece

"""The decoding strategies' entry points (Zhao et al. §4.2.4): the batched decode loop
(greedy, sampling, penalties, n samples, log-probs), contrastive decoding, `stream`,
`generate` and `generate_batch`, which hands beam search to `beam.py`.

The loop runs one prefill pass over the (left-padded) prompts, then one token per row per
step on the engine's `Runner` (`engine.py`). Rows that finish leave the batch (the cache
keeps only the live rows), so a long answer does not make the short ones pay.
Contrastive decoding steps an amateur model's `Runner` beside the expert's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmlab.errors import UsageError
from lmlab.infer.beam import beam_search
from lmlab.infer.engine import Completion, Runner, StopStrings, finish_text, fit_prompts
from lmlab.infer.options import GenerationConfig
from lmlab.infer.sampling import History, apply_penalties, make_generator, pick, top_logprobs

__all__ = [
    "Contrast",
    "TextStreamer",
    "contrastive_scores",
    "generate",
    "generate_batch",
    "stream",
]


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
    runner = Runner(model, budget, compile=cfg.compile)
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
    # None until a row ends: a caller interrupted mid-batch tells finished rows apart
    comps.extend(Completion(prompt_index=int(r), finish_reason=None) for r in rows)
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
    for c in comps:  # the budget ran out for every row that did not stop
        if c.finish_reason is None:
            c.finish_reason = "length"
    if tokenizer is not None:
        finish_text(comps, tokenizer, cfg)


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
    """Turns a stream of byte-level token ids into text pieces, never splitting a character.

    Each push decodes a short window, not the whole reply: the tokens since the last piece
    plus those of the piece before (vLLM's incremental detokenisation), and the new text is
    what the window adds to the text of its first part. Both decodes start at the same
    token, so a decoder that treats a first token specially treats both alike; a long
    reply costs linear time, not quadratic."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here
        self.read = 0  # tokens up to here are already in the text given out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(done) or text.endswith("\ufffd"):  # wait for more bytes
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

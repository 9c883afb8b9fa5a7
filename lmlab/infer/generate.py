"""Autoregressive generation: one prefill pass over the prompt, then one token per step
against a preallocated KV cache. Greedy, or sampling with temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmlab.model.transformer import KVCache, Transformer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_ids: list[int] = field(default_factory=list)
    seed: int | None = None


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus (top-p) sampling exclude; logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1)
        remove = probs.cumsum(-1) - probs >= top_p
        remove = remove.scatter(-1, idx, remove)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@torch.no_grad()
def stream(model: Transformer, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield generated token ids one at a time (stops at a stop id, which is not yielded).

    A prefix decoder reads the prompt as its bidirectional prefix; an encoder-decoder
    encodes the prompt and decodes from `decoder_start_id`."""
    max_len = model.cfg.max_seq_len
    budget = min(cfg.max_new_tokens, max_len - 1)
    ids = prompt_ids[-(max_len - budget) :] if len(prompt_ids) > max_len - budget else prompt_ids
    if not ids:
        raise ValueError("generate: empty prompt")
    param = next(model.parameters())
    family = model.cfg.family
    x = torch.tensor([ids], device=param.device)
    if family == "encoder_decoder":  # the prompt is encoded once; the decoder generates
        memory = model.encode(x)
        x = torch.tensor([[model.cfg.decoder_start_id]], device=param.device)
        slots = 1 + budget
    else:
        slots = len(ids) + budget
    cache = KVCache.empty(model.cfg, 1, slots, device=param.device, dtype=param.dtype)

    def next_logits(x: torch.Tensor) -> torch.Tensor:
        if family == "encoder_decoder":
            return model.decode(x, memory, cache=cache)
        if family == "prefix":  # the prompt is the prefix: it attends both ways
            return model(x, cache, prefix_len=len(ids))
        return model(x, cache)

    gen = torch.Generator(device=param.device)
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:  # a fresh Generator always starts from the same fixed seed: draw a random one
        gen.seed()
    for _ in range(budget):
        logits = next_logits(x)[:, -1, :].float()
        if cfg.temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if nxt in cfg.stop_ids:
            return
        yield nxt
        x = torch.tensor([[nxt]], device=param.device)


def generate(
    model: Transformer,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
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

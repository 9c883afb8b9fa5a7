"""Prompts in, completions out: a prompting method asks for `cfg.n` generations of each
prompt (plain text, or chat messages rendered through the chat template) and does not care
what produces them, so tests can pass canned outputs where a model would run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmlab.infer import GenerationConfig

# prompts (text, or chat messages), the decoding config -> the n generations of each prompt
GenerateFn = Callable[[list, "GenerationConfig"], list[list[str]]]


def model_generate_fn(model, tokenizer, chat: bool, batch_size: int = 16) -> GenerateFn:
    """Generation through `lmlab.infer.generate_batch`, `batch_size` prompts at a time;
    chat messages in the model's own chat template, stopping at its own end tokens."""
    from lmlab.infer import generate_batch
    from lmlab.tokenizer.chat import encode_chat, stop_ids_of

    stop = stop_ids_of(tokenizer, chat)

    def gen(prompts: list, cfg) -> list[list[str]]:
        cfg = dataclasses.replace(cfg, stop_ids=stop)
        out: list[list[str]] = [[] for _ in prompts]
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [encode_chat(tokenizer, p) if chat else tokenizer.encode(p).ids for p in chunk]
            for c in generate_batch(model, ids, cfg, tokenizer=tokenizer):
                out[start + c.prompt_index].append(c.text or "")
        return out

    return gen

"""Instruction tuning (Zhao et al. §5.1) on question/answer pairs in chat form.

The pairs are `train.jsonl`/`heldout.jsonl` as `lmlab.adapt.docstring_qa` mines them from
the corpus; the held-out modules' pairs give the validation loss. Each pair is one chat
turn; the loss is on answer tokens only, through the training loop's loss seam.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.adapt.docstring_qa import PairsConfig
from lmlab.config import STRICT, PosInt
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig
from lmlab.model.loading import load_model
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.tokenizer.chat import encode_exchange
from lmlab.train.batch import Batch, LossFn, token_cross_entropy
from lmlab.train.loop import TrainConfig, train


@dataclass
class SFTConfig(PairsConfig):
    """The mining settings plus the passes over the training pairs."""

    __pydantic_config__ = STRICT

    epochs: PosInt = 3


def encode_example(tok: Tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels in the model's own chat template: the prompt is masked (-100),
    the answer and the end of its turn (lmlab's `<|end|>`, ChatML's `<|im_end|>`) learned."""
    prompt, reply = encode_exchange(tok, [{"role": "user", "content": question}], answer)
    return prompt + reply, [-100] * len(prompt) + reply


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> Batch:
    """Right-pad to the longest example (truncated to `max_len`); targets shift by one."""
    length = min(max(len(ids) for ids, _ in examples), max_len + 1)
    x = torch.full((len(examples), length - 1), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length - 1), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        ids, labels = ids[:length], labels[:length]
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(labels) - 1] = torch.tensor(labels[1:])
    return x, y


def _read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def sft(
    base_dir: Path,
    cfg: TrainConfig,
    *,
    tokenizer_dir: Path,
    pairs_dir: Path,
    epochs: int,
    out_dir: Path,
    seed: int,
    key: str,
    objective: LossFn = token_cross_entropy,
    peft: PeftConfig | None = None,
) -> dict:
    """Fine-tune the base checkpoint on `pairs_dir/train.jsonl`.

    The validation loss is measured (never trained on) on held-out-module pairs, so the
    curve shows generalisation to modules the model was not tuned on. `objective` is the
    loss (default: cross-entropy on the answer tokens, the prompt's targets being -100).
    With `peft`, only a fresh adapter trains and `out_dir/model` is the adapter.
    """
    tok = load_tokenizer(tokenizer_dir)  # with its chat template and special tokens
    rows = _read_pairs(pairs_dir / "train.jsonl")
    if not rows:
        raise UsageError(
            f"sft: {pairs_dir / 'train.jsonl'} has no question/answer pairs (corpus too small?)"
        )
    examples = [encode_example(tok, r["question"], r["answer"]) for r in rows]
    held = [
        encode_example(tok, r["question"], r["answer"])
        for r in _read_pairs(pairs_dir / "heldout.jsonl")
    ]
    pad = pad_id(tok)
    model = with_adapter(load_model(base_dir), peft, base_dir, tok)
    n = len(examples)
    bs = cfg.batch_size
    steps_per_epoch = max(1, n // bs)
    if cfg.max_steps is None:
        cfg.max_steps = epochs * steps_per_epoch

    def get_batch(_index: int, start: int, rows: int) -> Batch:
        """Rows start…start+rows of the data order: each epoch a new seeded permutation."""
        picked = []
        for r in range(start, start + rows):
            epoch, k = divmod(r, n)
            picked.append(examples[_epoch_order(seed, epoch, n)[k]])
        return collate(picked, pad, cfg.seq_len)

    held = held[: bs * cfg.eval_batches]
    vals = [collate(held[i : i + bs], pad, cfg.seq_len) for i in range(0, len(held), bs)]
    log(f"sft: {n} examples, {steps_per_epoch} steps per epoch, {cfg.budget}")
    summary = train(
        model, get_batch, vals, cfg, out_dir, tokenizer_dir, key, name="sft", objective=objective
    )
    summary["examples"] = n
    return summary

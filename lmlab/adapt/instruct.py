"""Instruction tuning on the user's own data (Zhao et al. §5.1): chat conversations,
prompt/completion pairs and Alpaca records, several sets mixed by weight, packed into
full rows without attention or loss crossing from one example into the next.

Every example is rendered in the model's own chat template and learned on its assistant
turns only (the prompt and the user's turns are masked). A multi-turn conversation is
built turn by turn: each assistant reply is split from what precedes it exactly as a
single exchange is (`encode_exchange`), so the tokens match what the model sees when it
is asked to continue that conversation.

Packing puts several examples in one row: `doc_ids` keep attention inside an example and
restart positions at its first token (the loop's packed-document path), and the target
at an example's last token, which would be the next example's first, is masked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.adapt.dpo import _messages, _reply
from lmlab.adapt.records import iter_records
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.tokenizer.chat import encode_exchange
from lmlab.train.batch import Batch
from lmlab.train.loop import TrainConfig, train
from lmlab.utils import claim_output_dir, mark_output

FORMATS = "chat `messages`, `prompt`/`completion`, or Alpaca `instruction`/`input`/`output`"


@dataclass
class Source:
    """One instruction set and its weight in the mixture."""

    path: Path
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """`FILE` or `FILE:WEIGHT` (a positive number)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(f"--data {spec}: the weight after ':' must be a number") from None
        if w <= 0:
            raise UsageError(f"--data {spec}: the weight must be > 0")
        return Source(Path(path), w)
    return Source(Path(spec))


def record_messages(rec: dict, where: str) -> list[dict[str, str]]:
    """Any of the three formats as one conversation that ends with an assistant turn."""
    if "messages" in rec:
        turns = _messages(rec["messages"], where, "messages")
    elif "prompt" in rec and "completion" in rec:
        turns = _messages(rec["prompt"], where, "prompt")
        turns.append(
            {"role": "assistant", "content": _reply(rec["completion"], where, "completion")}
        )
    elif "instruction" in rec and "output" in rec:
        for field in ("instruction", "input", "output"):
            if field in rec and not isinstance(rec[field], str):
                raise UsageError(f"{where}: field {field!r} must be a string")
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    else:
        raise UsageError(f"{where}: a record needs {FORMATS}")
    if not any(t["role"] == "assistant" for t in turns):
        raise UsageError(f"{where}: the conversation has no assistant turn to learn")
    return turns


def read_examples(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of an instruction set: JSONL (any of the three formats), or
    Parquet, CSV and `hf:NAME` with string fields (prompt/completion or Alpaca)."""
    for first in ("prompt", "instruction"):  # JSONL is read whole on the first pass
        out = [record_messages(rec, w) for w, rec in iter_records(path, first, "instruction")]
        if out:
            return out
    raise UsageError(f"{path}: no examples")


def encode_conversation(tok: Tokenizer, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels): every assistant turn learned (with its end of turn), the rest masked."""
    ids: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt, reply = encode_exchange(tok, turns[:i], turn["content"])
        if prompt[: len(ids)] != ids:
            raise UsageError(
                "chat template: an earlier turn renders differently once the conversation "
                "goes on, so its tokens cannot be reused; use single exchanges"
            )
        labels += [IGNORE] * (len(prompt) - len(ids)) + reply
        ids = prompt + reply
    return ids, labels


def pack(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `seq_len` inputs filled with whole examples (one longer than a row is cut):
    (inputs, targets, doc_ids). Targets never cross into the next example; padding is
    its own document and learns nothing."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ids, labels in examples:
        ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
        n = len(ids) - 1  # inputs this example takes
        if n < 1:
            continue
        if used + n > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += n
    x = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    docs = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, labels) in enumerate(row):
            n = len(ids) - 1
            x[r, at : at + n] = torch.tensor(ids[:-1])
            y[r, at : at + n] = torch.tensor(labels[1:])
            docs[r, at : at + n] = d
            at += n
        docs[r, at:] = len(row)  # the padding: one more document of its own
    return x, y, docs


def collate_padded(examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> Batch:
    """One example per row, right-padded (no packing)."""
    width = min(max(len(ids) for ids, _ in examples), seq_len + 1) - 1
    x = torch.full((len(examples), width), pad, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        ids, labels = ids[: width + 1], labels[: width + 1]
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor(labels[1:])
    return Batch(x, y)


def mixture_index(sizes: list[int], weights: list[float], seed: int, row: int) -> tuple[int, int]:
    """(set, example) of the `row`-th example drawn: the set by weight, the example by a
    seeded permutation of its set per pass; a pure function of `row` (exact resume)."""
    rng = np.random.default_rng([seed, row])
    k = int(rng.choice(len(sizes), p=np.asarray(weights) / sum(weights)))
    draw = np.random.default_rng([seed, row, 1]).integers(sizes[k])
    return k, int(draw)


def instruct(
    model_ref: str | Path,
    sources: list[Source],
    out_dir: str | Path,
    cfg: TrainConfig,
    packing: bool = True,
    heldout: float = 0.05,
    seed: int = 0,
    one_pass: bool = False,
    epochs: int | None = None,
    peft: PeftConfig | None = None,
) -> dict:
    """Supervised fine-tuning of `model_ref` on the user's instruction sets, mixed by
    weight; an ordinary checkpoint results under `out_dir/model`. `one_pass` replaces
    `cfg.max_steps` with one pass over the examples; `epochs` bounds an unset one."""
    out_dir = claim_output_dir(out_dir, "sft-data", resume=True)  # before any work
    sets = [read_examples(s.path) for s in sources]
    with as_checkpoint(model_ref, scratch=out_dir.parent) as ckpt:
        tok = load_tokenizer(ckpt)
        model = with_adapter(load_model(ckpt), peft, model_ref, tok)
        pad = pad_id(tok)
        train_sets, held = [], []
        for examples in sets:
            enc = [encode_conversation(tok, t) for t in examples]
            order = np.random.default_rng(seed).permutation(len(enc))
            n_held = int(round(heldout * len(enc))) if len(enc) > 1 else 0
            held += [enc[i] for i in order[:n_held]]
            train_sets.append([enc[i] for i in order[n_held:]])
        if any(not s for s in train_sets):
            raise UsageError("sft: a data set has no examples left to train on (lower --heldout)")
        sizes = [len(s) for s in train_sets]
        weights = [s.weight for s in sources]
        total = sum(sizes)
        if one_pass:
            cfg.max_steps = max(1, total // cfg.batch_size)
        elif epochs and cfg.max_steps is None:
            cfg.max_steps = epochs * max(1, total // cfg.batch_size)

        def get_batch(_index: int, start: int, count: int) -> Batch:
            picked = []
            for r in range(start, start + count):
                k, i = mixture_index(sizes, weights, seed, r)
                picked.append(train_sets[k][i])
            if not packing:
                return collate_padded(picked, cfg.seq_len, pad)
            x, y, docs = pack(picked, cfg.seq_len, pad)
            return Batch(x, y, doc_ids=docs)

        bs = cfg.batch_size
        vals = [
            collate_padded(held[i : i + bs], cfg.seq_len, pad)
            for i in range(0, min(len(held), bs * cfg.eval_batches), bs)
        ]
        key = json.dumps(
            {"sft": [[str(s.path), s.weight] for s in sources], "packing": packing, "seed": seed}
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        mark_output(out_dir, "sft-data")
        log(
            f"sft: {total} examples in {len(sources)} set(s), {len(held)} held out, "
            f"{'packed' if packing else 'one per row'}, {cfg.budget}"
        )
        summary = train(model, get_batch, vals, cfg, out_dir, ckpt, key, name="sft")
    summary["examples"] = total
    return summary

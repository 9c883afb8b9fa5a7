"""Instruction tuning on question/answer pairs mined from the corpus (Zhao et al. §5.1).

For every public function, class and method with a docstring: "What does
`package.module.name` do?" → the docstring's first sentence. Whole modules are held out
(chosen by a hash of the module name) and never appear in SFT data; their questions are
the evaluation set. Loss is on answer tokens only.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.console import log
from lmlab.data.pipeline import iter_documents
from lmlab.errors import UsageError
from lmlab.model.loading import load_model
from lmlab.tokenizer import END, PAD, format_chat, special_id
from lmlab.train.loop import Batch, TrainConfig, train
from lmlab.utils import write_jsonl

MAIN_TEMPLATE = "What does `{name}` do?"
TEMPLATES = [
    MAIN_TEMPLATE,
    "Explain what `{name}` does.",
    "What is `{name}` for?",
    "Describe `{name}` in one sentence.",
]
_ABBREVIATIONS = {"eg", "ie", "etc", "vs", "cf", "approx", "resp"}
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"])[.!?](?=\s|$)")


@dataclass
class SFTConfig:
    __pydantic_config__ = STRICT

    held_out_fraction: Fraction = 0.1
    epochs: PosInt = 3
    max_answer_chars: PosInt = 200


def first_sentence(doc: str, max_chars: int) -> str | None:
    """The first sentence of a docstring's first paragraph, or None if there is no prose."""
    para = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    if not text or not text[0].isalpha() or "(" in text.split(" ")[0]:
        return None  # empty, or a C-style signature line such as "f(a, b) -> c"
    end = len(text)
    for m in _SENTENCE_END.finditer(text):
        last_word = text[: m.start()].rsplit(" ", 1)[-1].lstrip("(").lower()
        if last_word.replace(".", "") not in _ABBREVIATIONS:
            end = m.end()
            break
    sentence = text[:end]
    if not 12 <= len(sentence) <= max_chars or len(sentence.split()) < 3:
        return None
    return sentence


def qa_pairs(module: str, source: str, max_chars: int) -> Iterator[dict]:
    """Questions about the public functions, classes and methods of one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    def visit(nodes: Iterable[ast.stmt], prefix: str) -> Iterator[dict]:
        for node in nodes:
            if not isinstance(node, defs) or node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            answer = first_sentence(doc, max_chars) if doc else None
            if answer:
                yield {"module": module, "name": name, "answer": answer}
            if isinstance(node, ast.ClassDef):
                yield from visit(node.body, name)

    yield from visit(tree.body, module)


def is_held_out(module: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(module.encode()).digest()[:8], "big") / 2**64
    return h < fraction


def build_pairs(doc_files: list[Path], cfg: SFTConfig, out_dir: Path) -> dict[str, int]:
    """Write `train.jsonl` and `heldout.jsonl` of QA pairs; returns their sizes."""
    train_rows, held_rows = [], []
    for f in doc_files:
        for doc in iter_documents(f):
            module = doc.metadata.get("module")
            if not module or any(p.startswith("_") for p in module.split(".")):
                continue
            for pair in qa_pairs(module, doc.text, cfg.max_answer_chars):
                h = int(hashlib.sha1(pair["name"].encode()).hexdigest()[:8], 16)
                template = TEMPLATES[h % len(TEMPLATES)] if h % 2 else MAIN_TEMPLATE
                if is_held_out(module, cfg.held_out_fraction):
                    held_rows.append({**pair, "question": MAIN_TEMPLATE.format(name=pair["name"])})
                else:
                    train_rows.append({**pair, "question": template.format(name=pair["name"])})
    n_train = write_jsonl(out_dir / "train.jsonl", train_rows)
    n_held = write_jsonl(out_dir / "heldout.jsonl", held_rows)
    return {
        "train_pairs": n_train,
        "heldout_pairs": n_held,
        "heldout_modules": len({r["module"] for r in held_rows}),
    }


def encode_example(tok: Tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt is masked (-100), the answer and `<|end|>` are learned."""
    prompt = tok.encode(format_chat([{"role": "user", "content": question}])).ids
    reply = tok.encode(answer).ids + [special_id(tok, END)]
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
    tokenizer_dir: Path,
    pairs_dir: Path,
    cfg: TrainConfig,
    epochs: int,
    out_dir: Path,
    seed: int,
    key: str,
) -> dict:
    """Fine-tune the base checkpoint on `pairs_dir/train.jsonl`.

    The validation loss is measured (never trained on) on held-out-module pairs, so the
    curve shows generalisation to modules the model was not tuned on.
    """
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
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
    pad = special_id(tok, PAD)
    model = load_model(base_dir)
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
    log(f"sft: {n} examples, {steps_per_epoch} steps per epoch, up to {cfg.step_limit} steps")
    summary = train(model, get_batch, vals, cfg, out_dir, tokenizer_dir, key, name="sft")
    summary["examples"] = n
    return summary

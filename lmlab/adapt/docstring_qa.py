"""Question/answer pairs mined from the corpus's docstrings: the instruction-tuning data.

For every public function, class and method with a docstring: "What does
`package.module.name` do?" → the docstring's first sentence. Whole modules are held out
(chosen by a hash of the module name) and never appear in the training pairs; their
questions are the evaluation set. `lmlab.adapt.sft` tunes a model on the pairs.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.data.pipeline import iter_documents
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
class PairsConfig:
    """Which modules are held out, and how long an answer may be."""

    __pydantic_config__ = STRICT

    held_out_fraction: Fraction = 0.1
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


def build_pairs(doc_files: list[Path], cfg: PairsConfig, out_dir: Path) -> dict[str, int]:
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

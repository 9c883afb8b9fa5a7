"""One loader for every on-disk form of a model: the loader registry (DESIGN.md's seam).

Each form (an lmlab checkpoint, a quantized checkpoint, a Hugging Face directory, a GGUF
file, ...) is one small module in `lmlab.model.formats` that calls `register_format` (from
`lmlab.model.formats.registry`) with a `detect` and a `load_model`, and a `load_tokenizer`
when the form keeps its tokenizer outside a `tokenizer.json`. `load_model` asks every
registered form whether it reads the path (or a run directory's newest model) and hands
the path to the one that does; adding a form is adding a file to that package, never an
edit here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import lmlab.model.formats  # noqa: F401  (its modules register every form on import)
from lmlab.errors import UsageError
from lmlab.model.formats.registry import FORMATS, Format, TokenizerFiles, register_format
from lmlab.model.store import resolve_model

__all__ = [
    "Format",
    "TokenizerFiles",
    "as_checkpoint",
    "find_format",
    "formats",
    "load_form_tokenizer",
    "load_model",
    "register_format",
    "resolve_checkpoint",
]

# a run directory's models, newest stage first
RUN_MODELS = ("sft/model", "pretrain/model")


def formats() -> list[Format]:
    """Every registered form (the `formats` package registered them all on import)."""
    return list(FORMATS.values())


def find_format(path: str | Path) -> tuple[Format, Path]:
    """The form `path` is in, and where its model is: `path` itself, or in a run
    directory, the SFT model if there is one, else the pre-trained one. A store name
    (`lmlab models list`) stands for its converted checkpoint or installed GGUF file."""
    p = resolve_model(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    known = formats()
    for cand in (p, *(p / run_model for run_model in RUN_MODELS)):
        for fmt in known:
            if fmt.detect(cand):
                return fmt, cand
    raise UsageError(f"{p}: not a checkpoint (no config.json) nor a run with a trained model")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model path as given, or a run directory's newest model (SFT if present, else base)."""
    return find_format(path)[1]


@contextmanager
def as_checkpoint(path: str | Path, scratch: str | Path | None = None) -> Iterator[Path]:
    """`path` as a checkpoint directory (lmlab's or Hugging Face's) for the verbs that read
    its files: a directory as `resolve_checkpoint` finds it; a form that has none (a GGUF
    file, a store name's installed GGUF) converted with its tokenizer files into a
    temporary directory under `scratch` (default: the system's), removed afterwards."""
    fmt, where = find_format(path)
    if fmt.convert is None:
        yield where
        return
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lmlab-convert-", dir=scratch) as tmp:
        yield fmt.convert(where, Path(tmp) / where.stem)


def load_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load a model in any registered form (an lmlab checkpoint, a quantized checkpoint, a
    Hugging Face model directory, a GGUF file) or a run directory's newest model, in eval
    mode."""
    fmt, where = find_format(path)
    return fmt.load_model(where, device)


def load_form_tokenizer(path: str | Path) -> TokenizerFiles | None:
    """The tokenizer of `path` when it is in a form that supplies its own (a GGUF file), or
    None: then the tokenizer is the `tokenizer.json` that `lmlab.tokenizer` finds."""
    p = resolve_model(path)
    if not p.exists():
        return None
    readers = [f for f in formats() if f.load_tokenizer is not None]
    for cand in (p, *(p / run_model for run_model in RUN_MODELS)):
        for fmt in readers:
            if fmt.detect(cand):
                return fmt.load_tokenizer(cand)
    return None

"""The registry the on-disk forms add themselves to (read by `lmlab.model.loading`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer as a form supplies it, in the shape of a Hugging Face directory's files:
    `tokenizer.json` (the `tokenizers` object), `tokenizer_config.json` (`config`: special
    tokens, `chat_template`) and `generation_config.json` (`generation`: `eos_token_id`, an
    id or a list). The tokenizer layer reads the chat template and stop ids from the two
    dicts whichever form they came from."""

    tokenizer: Tokenizer
    config: dict[str, Any]
    generation: dict[str, Any]


@dataclass(frozen=True)
class Format:
    """One on-disk form: `detect(path)` says whether `path` is in this form (without reading
    the weights); `load_model(path, device)` returns it as a `torch.nn.Module`. A form that
    keeps its tokenizer somewhere other than a `tokenizer.json` beside the weights (a GGUF
    file's metadata) also has `load_tokenizer(path)`; `lmlab.tokenizer.load_tokenizer`
    asks for it before looking for `tokenizer.json`. A form that is not a checkpoint
    directory has `convert(path, out_dir)`, which writes it as one with its tokenizer
    files, so the verbs that read checkpoint files (quantize, export) take it too."""

    name: str
    detect: Callable[[Path], bool]
    load_model: Callable[[Path, str], torch.nn.Module]
    load_tokenizer: Callable[[Path], TokenizerFiles] | None = None
    convert: Callable[[Path, Path], Path] | None = None


FORMATS: dict[str, Format] = {}


def register_format(
    name: str,
    detect: Callable[[Path], bool],
    load_model: Callable[[Path, str], torch.nn.Module],
    load_tokenizer: Callable[[Path], TokenizerFiles] | None = None,
    convert: Callable[[Path, Path], Path] | None = None,
) -> Format:
    """Add (or, under the same name, replace) the reader of one on-disk form. Detectors
    must not overlap: each path is in one form, so the order of registration is moot."""
    fmt = Format(name, detect, load_model, load_tokenizer, convert)
    FORMATS[name] = fmt
    return fmt

"""The loader's reader of GGUF files (`lmlab.model.gguf` reads the weights,
`lmlab.model.gguf_vocab` the tokenizer from the file's metadata)."""

from __future__ import annotations

from pathlib import Path

from lmlab.model.formats.registry import TokenizerFiles, register_format
from lmlab.model.gguf import convert_from_gguf, is_gguf, load_gguf_model, open_gguf
from lmlab.model.gguf_vocab import read_gguf_tokenizer


def detect(path: Path) -> bool:
    """A file named `*.gguf`, or one that starts with GGUF's magic bytes (a corrupt
    `.gguf` file is claimed too, so its reader can say what is wrong with it)."""
    return path.is_file() and (path.suffix.lower() == ".gguf" or is_gguf(path))


def load_tokenizer(path: Path) -> TokenizerFiles:
    return TokenizerFiles(*read_gguf_tokenizer(open_gguf(path), path))


register_format("gguf", detect, load_gguf_model, load_tokenizer, convert_from_gguf)

"""The loader's reader of full-precision lmlab checkpoints (`lmlab.model.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from lmlab.model.checkpoint import FORMAT, load_checkpoint, read_config
from lmlab.model.formats.registry import register_format


def detect(path: Path) -> bool:
    """A directory whose `config.json` names lmlab's format and no quantization."""
    if not (path / "config.json").is_file():
        return False
    raw = read_config(path)
    return raw.get("format") == FORMAT and raw.get("quantization") is None


register_format("lmlab", detect, load_checkpoint)

"""The loader's reader of quantized lmlab checkpoints (`lmlab.model.quant`)."""

from __future__ import annotations

from pathlib import Path

from lmlab.model.checkpoint import FORMAT, read_config
from lmlab.model.formats.registry import register_format
from lmlab.model.quant import load_quantized


def detect(path: Path) -> bool:
    """A directory whose `config.json` names lmlab's format and has a `quantization` block."""
    if not (path / "config.json").is_file():
        return False
    raw = read_config(path)
    return raw.get("format") == FORMAT and raw.get("quantization") is not None


register_format("quantized", detect, load_quantized)

"""The loader's reader of Hugging Face model directories (`lmlab.model.hf` converts them)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.console import warn
from lmlab.errors import CheckpointError, UsageError
from lmlab.model import hf
from lmlab.model.checkpoint import FORMAT, read_config
from lmlab.model.formats.registry import register_format


def detect(path: Path) -> bool:
    """A directory with a `config.json` that is not lmlab's (transformers' own)."""
    return (path / "config.json").is_file() and read_config(path).get("format") != FORMAT


def load_model(path: Path, device: str = "cpu") -> torch.nn.Module:
    """Families lmlab implements (`lmlab.model.hf.FAMILIES`) are converted in memory, so
    lmlab's KV cache and decoding work on them; any other model, or one using a feature
    lmlab lacks (say a RoPE scaling type), loads with transformers' AutoModelForCausalLM.
    Corrupt files are an error either way."""
    if hf.is_supported(path):
        try:
            return hf.load_hf_model(path, device)
        except CheckpointError:
            raise
        except UsageError as e:
            warn(f"{e}; loading it with transformers instead")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError(
            f"{path}: a Hugging Face model directory; install transformers to load it"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval()


register_format("huggingface", detect, load_model)

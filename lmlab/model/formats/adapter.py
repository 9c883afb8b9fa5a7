"""The loader's reader of adapter directories (`lmlab.model.adapters`): PEFT's layout,
`adapter_config.json` + `adapter_model.safetensors`, whether lmlab or PEFT wrote it.

Loading one loads the base model its config names (any form lmlab loads: a checkpoint, a
store name, a Hugging Face directory, a GGUF file), adds the adapter and loads its
tensors; so every verb that takes a model takes BASE + ADAPTER as the adapter directory.
Its tokenizer is the directory's own `tokenizer.json`, else the base model's."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from lmlab.errors import CheckpointError
from lmlab.model.adapters import (
    ADAPTER_CONFIG,
    add_adapters,
    load_adapter_weights,
    merge_adapters,
    read_adapter_config,
)
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.formats.registry import TokenizerFiles, register_format
from lmlab.model.transformer import with_score_head


def detect(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _base(path: Path) -> str:
    _, base = read_adapter_config(path)
    if not base:
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: base_model_name_or_path is empty; the adapter does "
            "not say which model it adapts"
        )
    return base


def load(path: Path, device: str = "cpu"):
    from lmlab.model.loading import load_model  # the loader imports this package

    cfg, _ = read_adapter_config(path)
    base = _base(path)
    model = load_model(base, device)
    if cfg.task_type == "SEQ_CLS" and not hasattr(model, "score"):
        model = with_score_head(model)  # trained with the adapter: its tensors load below
    add_adapters(model, cfg, base=base)
    load_adapter_weights(model, path)
    return model.eval()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_tokenizer(path: Path) -> TokenizerFiles:
    from lmlab.model.loading import find_format, load_form_tokenizer

    src = path if (path / "tokenizer.json").is_file() else None
    if src is None:
        base = _base(path)
        files = load_form_tokenizer(base)
        if files is not None:
            return files
        src = find_format(base)[1]
    return TokenizerFiles(
        Tokenizer.from_file(str(src / "tokenizer.json")),
        _read_json(src / "tokenizer_config.json"),
        _read_json(src / "generation_config.json"),
    )


def convert(path: Path, out_dir: Path) -> Path:
    """The base with the adapter merged in, as an lmlab checkpoint with the tokenizer
    files (for the verbs that read checkpoint files: quantize, export)."""
    model = merge_adapters(load(path))
    tok = load_tokenizer(path)

    def write_tokenizer(d: Path) -> None:
        tok.tokenizer.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(tok.config))
        (d / "generation_config.json").write_text(json.dumps(tok.generation))

    return save_checkpoint(model, out_dir, write_extra=write_tokenizer)


register_format("adapter", detect, load, load_tokenizer, convert)

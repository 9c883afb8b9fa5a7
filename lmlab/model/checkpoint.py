"""The lmlab checkpoint format: `config.json` + `model.safetensors` + `tokenizer.json`
(DESIGN.md), written and read.

A checkpoint is written into a temporary sibling directory and renamed into place, so
a crash never leaves a half-written checkpoint under the final name. Reading any on-disk
form (this one, a quantized checkpoint, a Hugging Face directory) goes through one
loader, `lmlab.model.loading`; `load_checkpoint` here is its reader for this format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model
from lmlab.model.transformer import Transformer
from lmlab.utils import atomic_dir, write_json

FORMAT = "lmlab-checkpoint/1"
# the tokenizer and the conventions that travel with it (chat template, stop ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    extra: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    kind: str | None = None,
) -> Path:
    """Write the model (and the tokenizer beside it) atomically to `out_dir`.

    `state` replaces `model.state_dict()` when the caller already gathered full tensors
    (a sharded FSDP model holds only its slice of each parameter). `kind` marks the
    directory as that command's output (see `lmlab.utils.claim_output_dir`). A model with
    an adapter (`lmlab.model.adapters.add_adapters` gives it `save_adapter_files`) is saved
    as the adapter alone, in PEFT's layout: its config names the base model, which
    loading it loads first."""
    out = Path(out_dir)
    with atomic_dir(out, kind=kind) as tmp:
        # a model that is not a Transformer (a classifier) knows its own files; adapters
        # on a Transformer save only themselves
        save_own = getattr(model, "save_model_files", None) or getattr(
            model, "save_adapter_files", None
        )
        if save_own is not None:
            save_own(tmp, state, extra)
            _copy_tokenizer_files(tokenizer_dir, tmp)
            if write_extra is not None:
                write_extra(tmp)
            return out
        state = state if state is not None else model.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # one tensor, stored once
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        write_json(
            tmp / "config.json", {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})}
        )
        _copy_tokenizer_files(tokenizer_dir, tmp)
        if write_extra is not None:
            write_extra(tmp)
    return out


def _copy_tokenizer_files(tokenizer_dir: str | Path | None, to: Path) -> None:
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, to / name)


def read_config(ckpt: Path) -> dict:
    """`config.json` of a checkpoint directory (lmlab's or a Hugging Face one)."""
    try:
        return json.loads((ckpt / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: invalid JSON ({e})") from None


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors`; an unreadable file is a CheckpointError."""
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e})") from None


def load_checkpoint(ckpt: Path, device: str = "cpu") -> torch.nn.Module:
    """The full-precision model of the lmlab checkpoint directory `ckpt` (the loader's
    `lmlab` reader; `lmlab.model.loading.load_model` is the entry point for any form)."""
    cfg = ModelConfig.from_dict(read_config(ckpt)["model"])
    model = build_model(cfg)
    weights = ckpt / "model.safetensors"
    state = read_weights(weights)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    problem = state_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{weights}: weights do not match config.json: {problem}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The first way `state` does not fit `model` (a missing, unexpected or wrongly shaped
    tensor, with both shapes), or None. Said directly, where torch's load error buries it
    under a header line and lists every tensor."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in want.items():
        if name not in state:
            return f"tensor {name!r} is missing"
        got = tuple(state[name].shape)
        if got != shape:
            return f"tensor {name!r} has shape {list(got)}, the config implies {list(shape)}"
    extra = sorted(set(state) - set(want))
    return f"tensor {extra[0]!r} has no place in the model" if extra else None

"""Checkpoint directories: `config.json` + `model.safetensors` + `tokenizer.json` (DESIGN.md).

A checkpoint is written into a temporary sibling directory and renamed into place, so
a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.console import warn
from lmlab.errors import CheckpointError, UsageError
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model
from lmlab.model.transformer import Transformer
from lmlab.utils import atomic_dir, write_json

FORMAT = "lmlab-checkpoint/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
    directory as that command's output (see `lmlab.utils.claim_output_dir`)."""
    out = Path(out_dir)
    with atomic_dir(out, kind=kind) as tmp:
        state = state if state is not None else model.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # one tensor, stored once
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        write_json(
            tmp / "config.json", {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})}
        )
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if write_extra is not None:
            write_extra(tmp)
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or a run dir's newest model (SFT if present, else base)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    if (p / "config.json").is_file():
        return p
    for cand in (p / "sft" / "model", p / "pretrain" / "model"):
        if (cand / "config.json").is_file():
            return cand
    raise UsageError(f"{p}: not a checkpoint (no config.json) nor a run with a trained model")


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: invalid JSON ({e})") from None


def load_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load an lmlab checkpoint, a run directory, or a Hugging Face model directory."""
    ckpt = resolve_checkpoint(path)
    cfg_json = read_config(ckpt)
    if cfg_json.get("format") != FORMAT:
        return _load_hf(ckpt, device)
    cfg = ModelConfig.from_dict(cfg_json["model"])
    model = build_model(cfg)
    quantization = cfg_json.get("quantization")
    if quantization is not None:
        from lmlab.infer.quant import prepare_quantized

        prepare_quantized(model, quantization, ckpt / "config.json")
    weights = ckpt / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e})") from None
    if quantization is not None:
        _load_quantized(model, state, weights)
        return model.to(device).eval()
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


def _load_quantized(model: torch.nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Load a quantized state dict (`lmlab.infer.quant`): a tied `lm_head` that stayed in
    full precision shares the embedding; every tensor is checked for shape and dtype."""
    from lmlab.infer.quant import check_quantized_state

    tied = model.cfg.tie_embeddings and isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
    if tied and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    check_quantized_state(model, state, weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{weights}: weights do not match config.json ({detail})") from None


def _load_hf(ckpt: Path, device: str) -> torch.nn.Module:
    """A Hugging Face directory. Families lmlab implements (`lmlab.model.hf.FAMILIES`) are
    converted in memory, so lmlab's KV cache and decoding work on them; any other model, or
    one using a feature lmlab lacks (say a RoPE scaling type), loads with transformers'
    AutoModelForCausalLM. Corrupt files are an error either way."""
    from lmlab.model import hf

    if hf.is_supported(ckpt):
        try:
            return hf.load_hf_model(ckpt, device)
        except CheckpointError:
            raise
        except UsageError as e:
            warn(f"{e}; loading it with transformers instead")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError(
            f"{ckpt}: a Hugging Face model directory; install transformers to load it"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), local_files_only=True)
    return model.to(device).eval()

"""Adapter operations that need the loader: naming an adapter's base, adding a fresh
adapter to a model being trained, and merging an adapter into its base for good."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.model.adapters import (
    ADAPTED,
    ADAPTER_CONFIG,
    PeftConfig,
    add_adapters,
    load_adapter_weights,
    merge_adapters,
    read_adapter_config,
    trainable_counts,
)
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.quant import quantize_model, save_quantized, weight_error
from lmlab.model.store import resolve_model
from lmlab.utils import claim_output_dir


def base_reference(ref: str | Path) -> str:
    """How an adapter file names its base: a store name as given, a path made absolute."""
    if Path(ref).exists():
        return str(Path(ref).resolve())
    return str(ref) if resolve_model(ref) != Path(ref) else str(Path(ref).resolve())


def with_adapter(
    model: nn.Module, cfg: PeftConfig | None, base: str | Path, tokenizer=None
) -> nn.Module:
    """`model` (loaded from `base`) with a fresh adapter when `cfg` asks for one: the
    training functions' one line for parameter-efficient training. `tokenizer` (the
    model's) encodes prompt tuning's `init_text`."""
    if cfg is None:
        return model
    ids = None
    if cfg.init_text is not None and tokenizer is not None:  # its tokens' embeddings
        ids = tokenizer.encode(cfg.init_text, add_special_tokens=False).ids
    add_adapters(model, cfg, base=base_reference(base), init_ids=ids)
    trainable, total = trainable_counts(model)
    log(f"peft: {cfg.method}, {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%)")  # fmt: skip
    return model


def merge_into(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    quantize: str | None = None,
    group_size: int = 64,
) -> dict:
    """`lmlab adapt merge`: BASE with ADAPTER's tensors merged in, saved as a plain
    checkpoint (with BASE's tokenizer files) into `out`, which must be new or empty. A
    quantized BASE is dequantized to merge; `quantize` ("int8", "int4") quantizes the
    merged model again and reports the relative weight error ‖W − Ŵ‖/‖W‖."""
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{adapter}: not an adapter directory (no {ADAPTER_CONFIG})")
    out = claim_output_dir(out, "adapt-merge")
    cfg, _ = read_adapter_config(adapter)
    with as_checkpoint(base, scratch=out.parent) as ckpt:
        model = load_model(ckpt)
        add_adapters(model, cfg, base=str(base))
        load_adapter_weights(model, adapter)
        layers = sum(isinstance(m, ADAPTED) for m in model.modules())
        merge_adapters(model)
        extra = {"merged_adapter": str(adapter.resolve())}
        if quantize is None:
            save_checkpoint(model, out, tokenizer_dir=ckpt, extra=extra, kind="adapt-merge")
            return {"method": cfg.method, "layers": layers}
        full = copy.deepcopy(model)
        quantize_model(model, quantize, group_size)
        error = weight_error(full, model, model.quantization["modules"])
        save_quantized(model, out, ckpt, extra=extra, kind="adapt-merge")
    return {"method": cfg.method, "layers": layers, "quantized": quantize, "weight_error": error}


def adapter_on_loaded(adapter: str | Path, base: str | Path, model: nn.Module) -> nn.Module | None:
    """The adapter directory `adapter` on `model`, already loaded from `base`, sharing its
    weights (the modules are copied, the parameters not); None when `adapter` is not an
    adapter of that base (then it is loaded as usual)."""
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file() or getattr(model, "peft_config", None):
        return None
    cfg, named = read_adapter_config(adapter)
    if named is None or base_reference(named) != base_reference(base):
        return None
    shared = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    add_adapters(shared, cfg, base=named)
    load_adapter_weights(shared, adapter)
    return shared

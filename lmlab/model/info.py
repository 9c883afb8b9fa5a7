"""`lmlab model info` / `lmlab model presets`: an architecture and what it costs, in one table.

A target is a preset name (sized with `--size` or `--layers/--width`), an lmlab checkpoint
or run directory, or a Hugging Face model directory (read through `lmlab.model.hf`).
"""

from __future__ import annotations

import json
from typing import Any

from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig
from lmlab.model.presets import CARDS, PRESETS, resolve_model


def config_of(
    target: str,
    size: str | None = None,
    layers: int | None = None,
    width: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelConfig:
    """The `ModelConfig` a preset name describes, or a model's: a checkpoint or Hugging Face
    directory, a run, a store name, a GGUF file or an adapter (the last two loaded)."""
    spec = {
        k: v for k, v in {"size": size, "layers": layers, "width": width}.items() if v is not None
    }
    if target in PRESETS:
        return resolve_model({"preset": target, **spec, **(overrides or {})})
    from lmlab.model.store import resolve_model as store_path

    path = store_path(target)  # a store name stands for its files
    if not path.exists():
        raise UsageError(
            f"{target}: neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    if spec or overrides:
        raise UsageError("--size/--layers/--width/--set apply to a preset, not a checkpoint")
    from lmlab.model.checkpoint import FORMAT, read_config
    from lmlab.model.loading import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    if not (ckpt / "config.json").is_file():  # a GGUF file, an adapter: read by loading it
        from lmlab.model.loading import load_model

        return load_model(ckpt).cfg
    raw = read_config(ckpt)
    if raw.get("format") == FORMAT:
        return ModelConfig.from_dict(raw["model"])
    from lmlab.model.hf import config_from_hf

    return config_from_hf(ckpt)


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def accounting(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Numbers for `model info` (and `--json`): parameters, FLOPs, KV cache, weights."""
    t = seq_len or cfg.max_seq_len
    out = {
        "parameters": cfg.num_params(),
        "non_embedding_parameters": cfg.num_params(embeddings=False),
        "forward_flops_per_token": cfg.flops_per_token(t, training=False),
        "training_flops_per_token": cfg.flops_per_token(t, training=True),
        "context": t,
        "kv_cache_bytes_per_token_16bit": cfg.kv_cache_bytes_per_token(2),
        "kv_cache_bytes_full_context_16bit": cfg.kv_cache_bytes_per_token(2) * t,
        "weights_bytes_16bit": cfg.num_params() * 2,
    }
    if cfg.n_experts:
        out["active_parameters"] = cfg.num_params(active=True)
    return out


def info_rows(cfg: ModelConfig, seq_len: int | None = None) -> list[tuple[str, str]]:
    acc = accounting(cfg, seq_len)
    rows = list(cfg.describe().items())
    rows.append(
        (
            "parameters",
            f"{_count(acc['parameters'])} ({acc['parameters']:,}); "
            f"non-embedding {_count(acc['non_embedding_parameters'])}",
        )
    )
    if "active_parameters" in acc:
        rows.append(("active per token", _count(acc["active_parameters"])))
    t = acc["context"]
    rows += [
        (
            f"FLOPs per token (context {t})",
            f"forward {_count(acc['forward_flops_per_token'])}, "
            f"training {_count(acc['training_flops_per_token'])}",
        ),
        (
            "KV cache (16-bit)",
            f"{_bytes(acc['kv_cache_bytes_per_token_16bit'])} per token, "
            f"{_bytes(acc['kv_cache_bytes_full_context_16bit'])} at {t} tokens",
        ),
        ("weights (16-bit)", _bytes(acc["weights_bytes_16bit"])),
    ]
    return rows


def info_json(cfg: ModelConfig, seq_len: int | None = None) -> str:
    return json.dumps({"config": cfg.to_dict(), **accounting(cfg, seq_len)}, indent=2)


PRESET_COLUMNS = ("preset", "model card", "family", "norm", "positions", "activation", "bias",
                  "attention")  # fmt: skip


def preset_rows() -> list[tuple[str, ...]]:
    """One row per preset: the choices of Zhao et al. Table 3, read off the configs."""
    rows = []
    for name in PRESETS:
        d = resolve_model({"preset": name, "layers": 2, "width": 1024}).describe()
        attn = d["attention"].split(" (")[0].split(",")[0]
        if "sliding window" in d["attention"]:
            attn += ", local"
        rows.append(
            (
                name,
                CARDS[name],
                d["family"],
                d["normalization"],
                d["positions"].split(" (")[0],
                d["feed-forward"].split(",")[0],
                d["biases"],
                attn,
            )
        )
    return rows

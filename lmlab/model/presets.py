"""Presets named after the model cards of Zhao et al. Table 3, with size set separately.

A preset fixes the architecture choices of a model (family, normalization and its
placement, position encoding, activation, biases, attention); `layers`/`width`/`heads` or
a parameter budget (`size: 10M`) sets the scale. So `preset: llama, size: 10M` is a
10M-parameter model with LLaMA's choices, and two presets at one size differ only in the
choices — the controlled comparison the survey's §4.2.4 asks for.
"""

from __future__ import annotations

import re
from typing import Any

from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig

# Choices per model card. `kv_heads_ratio` (n_heads / n_kv_heads) and `context` are
# resolved against the size; everything else is a `ModelConfig` field.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        norm="layernorm",
        position="learned",
        activation="gelu_tanh",
        bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
    ),
    "opt": dict(
        norm="layernorm",
        position="learned",
        learned_pos_offset=2,
        activation="relu",
        bias=True,
        tie_embeddings=True,
    ),
    # Galactica: GPT-3's layout without any biases (dense layers or norms), GeLU, learned.
    "galactica": dict(
        norm="layernorm",
        position="learned",
        activation="gelu",
        bias=False,
        tie_embeddings=True,
    ),
    "neox": dict(
        norm="layernorm",
        position="rope",
        rotary_fraction=0.25,
        activation="gelu",
        bias=True,
        parallel_residual=True,
        tie_embeddings=False,
    ),
    "palm": dict(
        norm="layernorm",
        norm_bias=False,
        position="rope",
        activation="swiglu",
        bias=False,
        kv_heads_ratio=0,  # multi-query: one K/V head
        parallel_residual=True,
        parallel_norms=1,
        tie_embeddings=True,
    ),
    "bloom": dict(
        norm="layernorm",
        position="alibi",
        activation="gelu_tanh",
        bias=True,
        embed_norm=True,
        tie_embeddings=True,
    ),
    "llama": dict(
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    "mistral": dict(
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        bias=False,
        kv_heads_ratio=4,
        sliding_window=4096,
        tie_embeddings=False,
    ),
    "qwen2": dict(
        norm="rmsnorm",
        position="rope",
        rope_theta=1_000_000.0,
        activation="swiglu",
        bias=False,
        qkv_bias=True,
        kv_heads_ratio=4,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
    # GLM-130B: prefix decoder, post-LN with DeepNorm, RoPE, GeGLU, biases.
    "glm": dict(
        family="prefix",
        norm="layernorm",
        norm_position="post",
        deepnorm=True,
        position="rope",
        activation="geglu",
        bias=True,
        tie_embeddings=False,
    ),
    "t5": dict(
        family="encoder_decoder",
        norm="rmsnorm",
        norm_eps=1e-6,
        position="t5",
        activation="relu",
        bias=False,
        attn_scale=1.0,
        tie_embeddings=True,
        scaled_residual_init=False,
    ),
}

# GPT-3 is GPT-2's architecture with alternating dense and locally banded attention (the
# band width is not published); Switch is T5 with a top-1 mixture-of-experts FFN.
PRESETS["gpt3"] = {**PRESETS["gpt2"], "sliding_window": 128, "sliding_window_every": 2}
PRESETS["switch"] = {**PRESETS["t5"], "n_experts": 8, "experts_top_k": 1, "capacity_factor": 1.25}
ORDER = ("gpt2", "gpt3", "opt", "galactica", "neox", "palm", "bloom", "llama", "mistral",
         "qwen2", "glm", "t5", "switch")  # fmt: skip
PRESETS = {name: PRESETS[name] for name in ORDER}

# What each preset reproduces, for docs and `lmlab model presets`.
CARDS = {
    "gpt2": "GPT-2 (2019)",
    "gpt3": "GPT-3 (2020)",
    "opt": "OPT (2022)",
    "galactica": "Galactica (2022)",
    "neox": "GPT-NeoX (2022)",
    "palm": "PaLM (2022)",
    "bloom": "BLOOM (2022)",
    "llama": "LLaMA (2023)",
    "mistral": "Mistral (2023)",
    "qwen2": "Qwen2 (2024)",
    "glm": "GLM-130B (2022)",
    "t5": "T5 (2020)",
    "switch": "Switch (2021)",
}

SIZE_KEYS = {"layers": "n_layers", "width": "d_model", "heads": "n_heads"}


def parse_size(text: str | int | float) -> int:
    """'10M' -> 10_000_000; accepts k, M, B (any case) and plain numbers."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text))
        if not m:
            raise UsageError(f"model.size: {text!r} is not a parameter count like 10M, 350k, 1.3B")
        mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise UsageError(f"model.size: {text!r} must be positive")
    return n


def default_heads(width: int) -> int:
    """Heads of 64 dims (GPT-2 to LLaMA), or the largest divisor that keeps heads even."""
    want = max(1, width // 64)
    for h in range(want, 0, -1):
        if width % h == 0 and (width // h) % 2 == 0:
            return h
    return 1


def _kv_heads(heads: int, ratio: int) -> int:
    if ratio == 0:
        return 1  # multi-query
    kv = max(1, heads // ratio)
    while heads % kv:
        kv -= 1
    return kv


def _fields(fields: dict[str, Any], layers: int, width: int, heads: int | None) -> dict:
    f = dict(fields)
    ratio = f.pop("kv_heads_ratio", None)
    h = heads or default_heads(width)
    f.update(n_layers=layers, d_model=width, n_heads=h)
    if ratio is not None and "n_kv_heads" not in f:
        f["n_kv_heads"] = _kv_heads(h, ratio)
    if f.get("family") == "encoder_decoder" and "n_decoder_layers" not in f:
        f["n_decoder_layers"] = layers
    return f


def _build(fields: dict[str, Any], layers: int, width: int, heads: int | None) -> ModelConfig:
    return ModelConfig.from_dict(_fields(fields, layers, width, heads))


def _fit_size(
    fields: dict[str, Any], target: int, layers: int | None, width: int | None, heads: int | None
) -> tuple[int, int]:
    """(layers, width) whose non-embedding parameter count is nearest the target.

    Without either given, width = 64·layers (GPT-2 small and nanochat keep this aspect);
    with one given, the other is searched (widths in steps of 64)."""
    if layers and width:
        return layers, width
    cands = []
    if layers:
        cands = [(layers, w) for w in range(64, 64 * 257, 64)]
    elif width:
        cands = [(n, width) for n in range(1, 257)]
    else:
        cands = [(n, 64 * n) for n in range(1, 161)]
    best, best_err = None, None
    for n, w in cands:
        try:
            got = _build(fields, n, w, heads).num_params(embeddings=False)
        except UsageError:
            continue
        err = abs(got - target)
        if best_err is None or err < best_err:
            best, best_err = (n, w), err
    if best is None:
        raise UsageError(f"model.size: no layers × width gives about {target:,} parameters")
    return best


def resolve_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe's `model:` mapping -> plain `ModelConfig` fields.

    Keys: `preset` (a name in PRESETS), `size` (non-embedding parameters, so it does not
    depend on the tokenizer), `layers`/`width`/`heads`, and any `ModelConfig` field, which
    overrides the preset. Without preset, size or layers/width/heads it is returned as is."""
    d = dict(raw)
    name = d.pop("preset", None)
    size = d.pop("size", None)
    sizes = {k: d.pop(k) for k in list(d) if k in SIZE_KEYS}
    if name is None and size is None and not sizes:
        return d
    for k, v in sizes.items():  # `layers` wins over an `n_layers` from a base recipe
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UsageError(f"model.{k}: expected a positive integer, got {v!r}")
    if name is not None and name not in PRESETS:
        raise UsageError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields: dict[str, Any] = dict(PRESETS[name]) if name else {}
    fields["preset"] = name
    fields.update({k: v for k, v in d.items() if k not in ("n_layers", "d_model", "n_heads")})
    defaults = ModelConfig()
    layers = sizes.get("layers", d.get("n_layers"))
    width = sizes.get("width", d.get("d_model"))
    heads = sizes.get("heads", d.get("n_heads") if "width" not in sizes else None)
    if size is not None:  # a budget refits the fields; only layers/width/heads pin one
        layers, width, heads = sizes.get("layers"), sizes.get("width"), sizes.get("heads")
        try:  # let the recipe validator report a bad field, not the size search
            _build(fields, defaults.n_layers, defaults.d_model, heads)
        except UsageError:
            raise
        except ValueError:
            return _fields(fields, defaults.n_layers, defaults.d_model, heads)
        layers, width = _fit_size(fields, parse_size(size), layers, width, heads)
    return _fields(fields, layers or defaults.n_layers, width or defaults.d_model, heads)


def resolve_model(raw: dict[str, Any] | ModelConfig | None) -> ModelConfig:
    """`resolve_fields`, validated: the `ModelConfig` a mapping with a preset describes."""
    if raw is None:
        return ModelConfig()
    if isinstance(raw, ModelConfig):
        return raw
    if not isinstance(raw, dict):
        raise UsageError(f"model: expected a mapping of keys, got {type(raw).__name__}")
    return ModelConfig.from_dict(resolve_fields(raw))

"""Hugging Face interoperability: HF model directories <-> lmlab checkpoints.

An lmlab `ModelConfig` describes an architecture with flags, so every supported HF family
is two small pieces: a config mapping (HF `config.json` keys <-> `ModelConfig` fields) and
a weight table (HF tensor names <-> lmlab names, with the few layout changes: GPT-2's
Conv1D stores `[in, out]`; GPT-2 fuses q,k,v side by side; GPT-NeoX and BLOOM fuse them
per head). The same tables drive both directions, so import and export cannot drift.

Anything the target cannot express exactly raises `UsageError` naming the file and the
key: a conversion that silently changes the function a model computes is worse than none.
This is the conversion library; `lmlab.model.formats.huggingface` is the loader's reader
of HF directories built on it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import FORMAT, read_config, save_checkpoint, state_mismatch
from lmlab.model.config import GATED, ModelConfig
from lmlab.model.encdec import build_model
from lmlab.utils import atomic_dir, claim_output_dir

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "bloom", "t5")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "t5": "T5ForConditionalGeneration",
}

# Where the base model lives inside the *ForCausalLM module; checkpoints written by the
# original authors (gpt2, bigscience/bloom, facebook/opt) often omit this prefix.
BASE_PREFIX = {
    "llama": "model.",
    "mistral": "model.",
    "qwen2": "model.",
    "gpt2": "transformer.",
    "gpt_neox": "gpt_neox.",
    "opt": "model.decoder.",
    "bloom": "transformer.",
    "t5": "",
}

# Non-parameter buffers that older transformers versions saved; they carry no weights.
IGNORED = re.compile(
    r"(\.attn\.(masked_)?bias|\.attention\.(masked_)?bias|\.rotary_emb\.inv_freq)$"
)
# T5 files may repeat the shared embedding per stack, and an unused cross-attention bias.
T5_IGNORED = re.compile(
    r"^(encoder|decoder)\.embed_tokens\.weight$|EncDecAttention\.relative_attention_bias\.weight$"
)

# HF activation names -> the function they compute. gelu_new/gelu_fast/gelu_pytorch_tanh are
# all the tanh approximation (equal to float32 rounding); gelu/gelu_python are the exact erf.
GELU_EXACT = ("gelu", "gelu_python")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")
PLAIN_ACT = {
    **{a: "gelu" for a in GELU_EXACT},
    **{a: "gelu_tanh" for a in GELU_TANH},
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# Gated FFNs: the HF activation of the gate -> lmlab's gated activation.
GATED_ACT = {
    "silu": "swiglu",
    "swish": "swiglu",
    **{a: "geglu" for a in GELU_EXACT},
    **{a: "geglu_tanh" for a in GELU_TANH},
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# lmlab's chat template ends each turn with this token (lmlab.tokenizer.END, a layer above)
LMLAB_END_OF_TURN = "<|end|>"


# --- reading an HF directory ----------------------------------------------------------


def read_hf_config(src: str | Path) -> dict[str, Any]:
    """`config.json` of an HF model directory, as a dict (errors name the file)."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (not a Hugging Face model directory)")
    return _read_json_file(path)


def is_supported(src: str | Path) -> bool:
    """Whether `src` is an HF directory of a family lmlab converts (else: AutoModel)."""
    try:
        return read_hf_config(src).get("model_type") in FAMILIES
    except CheckpointError:
        return False


def read_hf_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: single or sharded safetensors, else pytorch_model.bin
    (read with `weights_only=True`: no pickle code runs)."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return _read_index(index, _read_safetensors)
    if (src / "model.safetensors").is_file():
        return _read_safetensors(src / "model.safetensors")
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        out: dict[str, torch.Tensor] = {}
        for f in shards:
            out.update(_read_safetensors(f))
        return out
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        return _read_index(index, _read_bin)
    if (src / "pytorch_model.bin").is_file():
        return _read_bin(src / "pytorch_model.bin")
    raise CheckpointError(
        f"{src}: no weights found (looked for model.safetensors, *.safetensors with "
        "model.safetensors.index.json, pytorch_model.bin)"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; the message says what
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _read_index(index: Path, read: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e!r})") from None
    out: dict[str, torch.Tensor] = {}
    for name in files:
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard named in {index.name} is missing")
        out.update(read(shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index}: tensor {missing[0]!r} listed but not in its shard")
    return out


# --- config: HF -> lmlab --------------------------------------------------------------


def config_from_hf(src: str | Path | dict[str, Any], path: str | Path | None = None) -> ModelConfig:
    """The `ModelConfig` of an HF model directory (or of its parsed `config.json`, which
    `path` then names in errors), refusing features lmlab lacks."""
    if isinstance(src, dict):
        hf, path = src, path or "config.json"
    else:
        hf, path = read_hf_config(src), Path(src) / "config.json"
    mt = hf.get("model_type")
    if mt is None:
        raise UsageError(f"{path}: no 'model_type' key (not a transformers config)")
    if mt not in FAMILIES:
        raise UsageError(
            f"{path}: model_type {mt!r} is not supported for conversion; "
            f"supported: {', '.join(FAMILIES)}"
        )
    kw = _CONFIG_FROM_HF[mt](_Reader(hf, path))
    try:  # validated as a checkpoint's config is on load
        return ModelConfig.from_dict(kw)
    except (UsageError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: cannot be expressed as an lmlab ModelConfig ({e})") from None


class _Reader:
    """Read keys of an HF config; `unsupported` raises with the file and key named."""

    def __init__(self, hf: dict[str, Any], path: str | Path) -> None:
        self.hf, self.path = hf, path

    def get(self, key: str, default: Any = None) -> Any:
        v = self.hf.get(key)
        return default if v is None else v

    def need(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise UsageError(f"{self.path}: key {key!r} is missing")
        return self.hf[key]

    def unsupported(self, key: str, why: str) -> UsageError:
        return UsageError(f"{self.path}: key {key!r} = {self.hf.get(key)!r}: {why}")

    def act(self, key: str, default: str, allowed: dict[str, str]) -> str:
        name = self.get(key, default)
        if name not in allowed:
            raise self.unsupported(key, f"activation not supported; supported: {sorted(allowed)}")
        return allowed[name]

    def rope(self, default_fraction: float = 1.0) -> dict[str, Any]:
        """RoPE settings from `rope_parameters` (transformers 5) or the older top-level keys."""
        key = "rope_scaling" if self.hf.get("rope_scaling") else "rope_parameters"
        params = dict(self.hf.get(key) or {})
        if any(isinstance(v, dict) for v in params.values()):
            raise self.unsupported(key, "per-layer-type RoPE parameters are not supported")
        theta = params.get("rope_theta") or self.hf.get("rope_theta")
        theta = theta or self.hf.get("rotary_emb_base") or 10000.0
        frac = params.get("partial_rotary_factor") or self.hf.get("partial_rotary_factor")
        frac = frac or self.hf.get("rotary_pct") or default_fraction
        rope_type = params.get("rope_type") or params.get("type") or "default"
        out = {"rope_theta": float(theta), "rotary_fraction": float(frac)}
        if rope_type == "default":
            out.update(rope_scaling="none")
        elif rope_type == "linear" and params.get("factor"):
            out.update(rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
        else:
            raise self.unsupported(
                key, f"rope_type {rope_type!r} is not supported (lmlab has default and linear)"
            )
        return out


def _common(r: _Reader, **kw: Any) -> dict[str, Any]:
    return {"preset": None, "family": "decoder", "pad_vocab_multiple": 64, **kw}


def _llama_like(r: _Reader) -> dict[str, Any]:
    mt = r.hf["model_type"]
    heads = r.need("num_attention_heads")
    activation = r.act("hidden_act", "silu", GATED_ACT)
    if mt == "llama":
        attn_bias, mlp_bias = bool(r.get("attention_bias", False)), bool(r.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise r.unsupported("mlp_bias", "lmlab biases attention and FFN together")
        bias, qkv_bias = attn_bias, attn_bias
    elif mt == "qwen2":
        bias, qkv_bias = False, True  # Qwen2: q/k/v biased, o_proj and the MLP not
    else:
        bias, qkv_bias = False, False
    window = None
    if mt == "mistral":
        window = r.get("sliding_window")
        if r.hf.get("layer_types"):
            raise r.unsupported("layer_types", "per-layer attention types are not supported")
    elif mt == "qwen2" and r.get("use_sliding_window", False):
        n = r.need("num_hidden_layers")
        types = r.get("layer_types") or [
            "sliding_attention" if i >= r.get("max_window_layers", 28) else "full_attention"
            for i in range(n)
        ]
        if all(t == "sliding_attention" for t in types):
            window = r.get("sliding_window")
        elif any(t == "sliding_attention" for t in types):
            raise r.unsupported(
                "max_window_layers", "a mix of full and sliding-window layers is not supported"
            )
    return _common(
        r,
        vocab_size=r.need("vocab_size"),
        n_layers=r.need("num_hidden_layers"),
        d_model=r.need("hidden_size"),
        n_heads=heads,
        n_kv_heads=r.get("num_key_value_heads", heads),
        head_dim=r.get("head_dim", r.need("hidden_size") // heads),
        ffn_hidden=r.need("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_bias=False,
        norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        norm_position="pre",
        position="rope",
        **{**r.rope(), "rotary_fraction": 1.0},  # these families rotate the whole head
        activation=activation,
        bias=bias,
        qkv_bias=qkv_bias,
        sliding_window=window,
        sliding_window_every=1,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
    )


def _gpt2(r: _Reader) -> dict[str, Any]:
    if r.get("add_cross_attention", False):
        raise r.unsupported("add_cross_attention", "GPT-2 with cross-attention is not supported")
    if r.get("scale_attn_by_inverse_layer_idx", False):
        raise r.unsupported("scale_attn_by_inverse_layer_idx", "per-layer attention scaling")
    if not r.get("scale_attn_weights", True):
        raise r.unsupported("scale_attn_weights", "unscaled attention is not supported")
    d = r.need("n_embd")
    return _common(
        r,
        vocab_size=r.need("vocab_size"),
        n_layers=r.need("n_layer"),
        d_model=d,
        n_heads=r.need("n_head"),
        n_kv_heads=r.need("n_head"),
        head_dim=d // r.need("n_head"),
        ffn_hidden=r.get("n_inner", 4 * d),
        max_seq_len=r.need("n_positions"),
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(r.get("layer_norm_epsilon", 1e-5)),
        norm_position="pre",
        position="learned",
        learned_pos_offset=0,
        activation=r.act("activation_function", "gelu_new", PLAIN_ACT),
        bias=True,
        qkv_bias=True,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)),
    )


def _gpt_neox(r: _Reader) -> dict[str, Any]:
    if not r.get("attention_bias", True):
        raise r.unsupported("attention_bias", "GPT-NeoX's MLP keeps its biases; lmlab ties both")
    d, heads = r.need("hidden_size"), r.need("num_attention_heads")
    parallel = bool(r.get("use_parallel_residual", True))
    return _common(
        r,
        vocab_size=r.need("vocab_size"),
        n_layers=r.need("num_hidden_layers"),
        d_model=d,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        ffn_hidden=r.need("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings", 2048),
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(r.get("layer_norm_eps", 1e-5)),
        norm_position="pre",
        parallel_residual=parallel,
        parallel_norms=2,
        position="rope",
        **r.rope(default_fraction=0.25),  # GPTNeoXConfig's default rotary_pct
        activation=r.act("hidden_act", "gelu", PLAIN_ACT),
        bias=True,
        qkv_bias=True,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
    )


def _opt(r: _Reader) -> dict[str, Any]:
    d, heads = r.need("hidden_size"), r.need("num_attention_heads")
    if r.get("word_embed_proj_dim", d) != d:
        raise r.unsupported("word_embed_proj_dim", f"must equal hidden_size={d} (no projection)")
    post = not r.get("do_layer_norm_before", True)  # post-LN: no final norm, as lmlab's
    if r.get("_remove_final_layer_norm", False) and not post:
        raise r.unsupported("_remove_final_layer_norm", "a pre-LN OPT without a final norm")
    if not r.get("layer_norm_elementwise_affine", True):
        raise r.unsupported("layer_norm_elementwise_affine", "norms without gains")
    bias = bool(r.get("enable_bias", True))
    return _common(
        r,
        vocab_size=r.need("vocab_size"),
        n_layers=r.need("num_hidden_layers"),
        d_model=d,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        ffn_hidden=r.need("ffn_dim"),
        max_seq_len=r.need("max_position_embeddings"),
        norm="layernorm",
        norm_bias=True,
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT has no key for it
        norm_position="post" if post else "pre",
        position="learned",
        learned_pos_offset=2,  # OPT's position table has 2 extra leading rows
        activation=r.act("activation_function", "relu", PLAIN_ACT),
        bias=bias,
        qkv_bias=bias,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)),
    )


def _bloom(r: _Reader) -> dict[str, Any]:
    if r.get("apply_residual_connection_post_layernorm", False):
        raise r.unsupported(
            "apply_residual_connection_post_layernorm", "a normed residual is not supported"
        )
    d = r.get("n_embed") or r.need("hidden_size")  # BloomConfig lets n_embed win
    heads = r.need("n_head")
    return _common(
        r,
        vocab_size=r.need("vocab_size"),
        n_layers=r.need("n_layer"),
        d_model=d,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        ffn_hidden=4 * d,
        max_seq_len=r.get("seq_length", 2048),  # ALiBi has no table; a nominal length
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(r.get("layer_norm_epsilon", 1e-5)),
        norm_position="pre",
        embed_norm=True,
        position="alibi",
        activation="gelu_tanh",
        bias=True,
        qkv_bias=True,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)),
    )


def _t5(r: _Reader) -> dict[str, Any]:
    ff = r.get("feed_forward_proj", "relu")
    parts = ff.split("-")
    if len(parts) == 2 and parts[0] == "gated":
        act = "gelu_new" if ff == "gated-gelu" else parts[1]  # as T5Config decides
        if act not in GATED_ACT:
            raise r.unsupported("feed_forward_proj", f"gate activation {act!r} not supported")
        activation = GATED_ACT[act]
    elif len(parts) == 1 and ff in PLAIN_ACT:
        activation = PLAIN_ACT[ff]
    else:
        raise r.unsupported("feed_forward_proj", "not a supported T5 feed-forward")
    layers = r.need("num_layers")
    return _common(
        r,
        family="encoder_decoder",
        decoder_start_id=r.get("decoder_start_token_id", r.get("pad_token_id", 0)),
        vocab_size=r.need("vocab_size"),
        n_layers=layers,
        n_decoder_layers=r.get("num_decoder_layers", layers),
        d_model=r.need("d_model"),
        n_heads=r.need("num_heads"),
        n_kv_heads=r.need("num_heads"),
        head_dim=r.need("d_kv"),
        ffn_hidden=r.need("d_ff"),
        max_seq_len=r.get("n_positions", 512),  # relative positions: a nominal length
        norm="rmsnorm",
        norm_bias=False,
        norm_eps=float(r.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre",
        position="t5",
        rel_buckets=r.get("relative_attention_num_buckets", 32),
        rel_max_distance=r.get("relative_attention_max_distance", 128),
        activation=activation,
        bias=False,
        qkv_bias=False,
        attn_scale=1.0,  # T5 folds 1/sqrt(d) into its initialisation
        tie_embeddings=_t5_scales_output(r.hf),
    )


def _t5_scales_output(hf: dict[str, Any]) -> bool:
    """T5 scales the decoder output by d_model**-0.5 exactly when the head is tied (v1.0);
    transformers 5 records it as `scale_decoder_outputs`, older files as the tie flag."""
    if hf.get("scale_decoder_outputs") is not None:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings") is not False


_CONFIG_FROM_HF: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "bloom": _bloom,
    "t5": _t5,
}


# --- config: lmlab -> HF --------------------------------------------------------------


ROPE_FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox")
LLAMA_LIKE = ("llama", "mistral", "qwen2")
LAYERNORM_FAMILIES = ("gpt2", "gpt_neox", "opt", "bloom")
POSITION = {**{f: "rope" for f in ROPE_FAMILIES}, "gpt2": "learned", "opt": "learned"}
POSITION.update(bloom="alibi", t5="t5")
# lmlab activation -> the HF name (plain FFNs, and the gate of gated ones).
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
HF_GATE_ACT = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}
T5_FF = {**HF_ACT, "swiglu": "gated-silu", "geglu_tanh": "gated-gelu"}
T5_FF["geglu"] = "gated-gelu_python"  # exact erf GELU; "gated-gelu" means the tanh form
ACTIVATIONS = {
    **{f: tuple(HF_GATE_ACT) for f in LLAMA_LIKE},
    **{f: tuple(HF_ACT) for f in ("gpt2", "gpt_neox", "opt")},
    "bloom": ("gelu_tanh",),
    "t5": tuple(T5_FF),
}
# (bias, qkv_bias) a family holds; None = either, as long as the two agree.
BIASES = {"llama": None, "mistral": (False, False), "qwen2": (False, True), "opt": None}
BIASES.update(gpt2=(True, True), gpt_neox=(True, True), bloom=(True, True), t5=(False, False))


def fit_reasons(family: str, cfg: ModelConfig) -> list[str]:
    """Why `cfg` cannot be exported as HF `family` exactly (empty list: it can)."""
    t5 = family == "t5"
    layernorm = family in LAYERNORM_FAMILIES
    positions = ("pre", "post") if family == "opt" else ("pre",)
    default_scale = cfg.attn_scale is None or abs(cfg.attn_scale * cfg.head_dim**0.5 - 1) < 1e-9
    checks: list[tuple[str, bool, str]] = [
        (
            "family",
            cfg.family == ("encoder_decoder" if t5 else "decoder"),
            "encoder_decoder" if t5 else "decoder",
        ),
        ("n_experts", cfg.n_experts == 0, "0 (a dense FFN)"),
        ("deepnorm", not cfg.deepnorm, "False"),
        ("norm_position", cfg.norm_position in positions, " or ".join(positions)),
        (
            "norm",
            cfg.norm == ("layernorm" if layernorm else "rmsnorm"),
            "layernorm" if layernorm else "rmsnorm",
        ),
        ("embed_norm", cfg.embed_norm == (family == "bloom"), str(family == "bloom")),
        ("position", cfg.position == POSITION[family], POSITION[family]),
        ("activation", cfg.activation in ACTIVATIONS[family], " or ".join(ACTIVATIONS[family])),
        (
            "attn_scale",
            cfg.attn_scale == 1.0 if t5 else default_scale,
            "1.0" if t5 else "None (1/sqrt(head_dim))",
        ),
        (
            "parallel_residual",
            not cfg.parallel_residual or (family == "gpt_neox" and cfg.parallel_norms == 2),
            "True with parallel_norms=2, or False" if family == "gpt_neox" else "False",
        ),
    ]
    if layernorm:
        checks.append(("norm_bias", cfg.uses_norm_bias, "True (LayerNorm with bias)"))
        d_h = cfg.d_model // cfg.n_heads
        checks.append(("head_dim", cfg.head_dim == d_h, f"d_model // n_heads = {d_h}"))
    bias = BIASES[family]
    if bias is None:
        checks.append(("qkv_bias", cfg.uses_qkv_bias == cfg.bias, f"the same as bias={cfg.bias}"))
    else:
        checks.append(("bias", cfg.bias == bias[0], str(bias[0])))
        checks.append(("qkv_bias", cfg.uses_qkv_bias == bias[1], str(bias[1])))
    if family not in LLAMA_LIKE:
        checks.append(("n_kv_heads", cfg.n_kv_heads == cfg.n_heads, f"n_heads={cfg.n_heads}"))
    if family in LLAMA_LIKE:
        checks.append(("rotary_fraction", cfg.rotary_fraction == 1.0, "1.0"))
    if family == "gpt_neox":
        exact = cfg.rotary_dim == int(cfg.head_dim * cfg.rotary_fraction)
        checks.append(("rotary_fraction", exact, "head_dim * fraction to be an even integer"))
    window = cfg.sliding_window
    if family == "mistral":
        checks.append(("sliding_window", window is not None, "a window (else: llama)"))
    elif family != "qwen2":
        checks.append(("sliding_window", window is None, "None"))
    if family in ("mistral", "qwen2") and window is not None:
        checks.append(("sliding_window_every", cfg.sliding_window_every == 1, "1 (all layers)"))
    if family in ("gpt2", "opt"):
        offset = 2 if family == "opt" else 0
        checks.append(("learned_pos_offset", cfg.learned_pos_offset == offset, str(offset)))
    if family == "bloom":
        checks.append(("ffn_hidden", cfg.ffn_hidden == 4 * cfg.d_model, "4 * d_model"))
    return [f"{k}={getattr(cfg, k)!r} (needs {want})" for k, ok, want in checks if not ok]


def choose_family(cfg: ModelConfig, family: str | None = None) -> str:
    """The HF family named, or the first one `cfg` fits; UsageError says what blocks each."""
    if family is not None:
        if family not in FAMILIES:
            raise UsageError(
                f"family {family!r} is not supported; choose from {', '.join(FAMILIES)}"
            )
        reasons = fit_reasons(family, cfg)
        if reasons:
            raise UsageError(f"this model cannot be exported as {family}: {'; '.join(reasons)}")
        return family
    blocked = {}
    for fam in ("mistral", "qwen2", "llama", "gpt2", "gpt_neox", "opt", "bloom", "t5"):
        reasons = fit_reasons(fam, cfg)
        if not reasons:
            return fam
        blocked[fam] = reasons
    detail = "; ".join(f"{fam}: {', '.join(r)}" for fam, r in blocked.items())
    raise UsageError(f"no Hugging Face family fits this model config ({detail})")


def _rope_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """RoPE keys, in transformers 5's `rope_parameters` and 4.x's top-level names. lmlab's
    static NTK-aware scaling is a larger base, so it exports as plain RoPE with that base."""
    theta = float(cfg.rope_theta)
    if cfg.rope_scaling == "ntk":
        rd = cfg.rotary_dim
        theta = theta * cfg.rope_scaling_factor ** (rd / (rd - 2))  # as rope_inv_freq
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=float(cfg.rope_scaling_factor))
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = float(cfg.rotary_fraction)
    out: dict[str, Any] = {"rope_parameters": rope, "rope_theta": theta}
    if rope["rope_type"] != "default":
        out["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    return out


def config_to_hf(family: str, cfg: ModelConfig, dtype: str, special: dict[str, Any]) -> dict:
    """The HF `config.json` for `cfg` exported as `family` (checked by `fit_reasons`)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4.x reads
        **{k: special.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    if family in ROPE_FAMILIES:
        out.update(_rope_to_hf(cfg, family))
    if family in LLAMA_LIKE:
        out.update(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act=HF_GATE_ACT[cfg.activation],
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
        )
        if family == "llama":
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        elif family == "mistral":
            out.update(sliding_window=cfg.sliding_window)
        else:  # Qwen2 makes layers >= max_window_layers local: all of them, or none
            local = cfg.sliding_window is not None
            out.update(
                use_sliding_window=local,
                sliding_window=cfg.sliding_window,
                max_window_layers=0 if local else cfg.n_layers,
            )
    elif family == "gpt2":
        out.update(
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.ffn_hidden,
            n_positions=cfg.max_seq_len,
            activation_function=HF_ACT[cfg.activation],
            layer_norm_epsilon=cfg.norm_eps,
        )
    elif family == "gpt_neox":
        out.update(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            hidden_act=HF_ACT[cfg.activation],
            max_position_embeddings=cfg.max_seq_len,
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=True,
            rotary_pct=cfg.rotary_fraction,  # transformers 4.x names
            rotary_emb_base=out["rope_theta"],
        )
    elif family == "opt":
        out.update(
            hidden_size=cfg.d_model,
            word_embed_proj_dim=cfg.d_model,
            ffn_dim=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            max_position_embeddings=cfg.max_seq_len,
            activation_function=HF_ACT[cfg.activation],
            do_layer_norm_before=cfg.norm_position == "pre",
            enable_bias=cfg.bias,
        )
    elif family == "bloom":
        out.update(
            hidden_size=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            layer_norm_epsilon=cfg.norm_eps,
            seq_length=cfg.max_seq_len,
        )
    elif family == "t5":
        out.update(
            d_model=cfg.d_model,
            d_kv=cfg.head_dim,
            d_ff=cfg.ffn_hidden,
            num_layers=cfg.n_layers,
            num_decoder_layers=cfg.n_decoder_layers,
            num_heads=cfg.n_heads,
            relative_attention_num_buckets=cfg.rel_buckets,
            relative_attention_max_distance=cfg.rel_max_distance,
            layer_norm_epsilon=cfg.norm_eps,
            feed_forward_proj=T5_FF[cfg.activation],
            is_encoder_decoder=True,
            # the tied head comes with T5's d_model**-0.5 output scale (lmlab ties them too)
            scale_decoder_outputs=cfg.tie_embeddings,
            n_positions=cfg.max_seq_len,
            decoder_start_token_id=cfg.decoder_start_id,
        )
    return out


# --- weights --------------------------------------------------------------------------

# A weight table row: (lmlab name, HF name, how). `how` is "" (same layout), "T" (GPT-2
# Conv1D, [in, out]), "cat" (HF fuses q,k,v side by side; GPT-2, so also transposed) or
# "heads" (HF fuses q,k,v per head as [heads, 3, head_dim]; GPT-NeoX, BLOOM). Fused rows name
# three lmlab tensors joined by ",".


def weight_table(family: str, cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """Every tensor of `cfg` as (lmlab name, HF name, layout change), in HF naming."""
    bias = cfg.bias
    qkv_b = cfg.uses_qkv_bias
    rows: list[tuple[str, str, str]] = []

    def add(lm: str, hf: str, how: str = "", with_bias: bool | None = None) -> None:
        rows.append((f"{lm}.weight", f"{hf}.weight", how))
        if with_bias:
            rows.append((f"{lm}.bias", f"{hf}.bias", "" if how == "T" else how))

    def qkv_names(prefix: str, suffix: str) -> str:
        return ",".join(f"{prefix}.self_attn.{p}_proj.{suffix}" for p in "qkv")

    if family in ("llama", "mistral", "qwen2"):
        add("embed_tokens", "model.embed_tokens")
        for i in range(cfg.n_layers):
            lm, hf = f"layers.{i}", f"model.layers.{i}"
            add(f"{lm}.input_layernorm", f"{hf}.input_layernorm")
            for p in "qkv":
                add(f"{lm}.self_attn.{p}_proj", f"{hf}.self_attn.{p}_proj", with_bias=qkv_b)
            add(f"{lm}.self_attn.o_proj", f"{hf}.self_attn.o_proj", with_bias=bias)
            add(f"{lm}.post_attention_layernorm", f"{hf}.post_attention_layernorm")
            gated = ("gate_proj", "up_proj", "down_proj")
            for p in gated:
                add(f"{lm}.mlp.{p}", f"{hf}.mlp.{p}", with_bias=bias)
        add("norm", "model.norm")
    elif family == "gpt2":
        add("embed_tokens", "transformer.wte")
        add("embed_positions", "transformer.wpe")
        for i in range(cfg.n_layers):
            lm, hf = f"layers.{i}", f"transformer.h.{i}"
            add(f"{lm}.input_layernorm", f"{hf}.ln_1", with_bias=True)
            rows.append((qkv_names(lm, "weight"), f"{hf}.attn.c_attn.weight", "cat"))
            rows.append((qkv_names(lm, "bias"), f"{hf}.attn.c_attn.bias", "cat"))
            add(f"{lm}.self_attn.o_proj", f"{hf}.attn.c_proj", "T", with_bias=True)
            add(f"{lm}.post_attention_layernorm", f"{hf}.ln_2", with_bias=True)
            add(f"{lm}.mlp.up_proj", f"{hf}.mlp.c_fc", "T", with_bias=True)
            add(f"{lm}.mlp.down_proj", f"{hf}.mlp.c_proj", "T", with_bias=True)
        add("norm", "transformer.ln_f", with_bias=True)
    elif family in ("gpt_neox", "bloom"):
        neox = family == "gpt_neox"
        base = "gpt_neox" if neox else "transformer"
        add("embed_tokens", f"{base}.embed_in" if neox else f"{base}.word_embeddings")
        if not neox:
            add("embed_norm", f"{base}.word_embeddings_layernorm", with_bias=True)
        for i in range(cfg.n_layers):
            lm, hf = f"layers.{i}", f"{base}.layers.{i}" if neox else f"{base}.h.{i}"
            attn = f"{hf}.attention" if neox else f"{hf}.self_attention"
            add(f"{lm}.input_layernorm", f"{hf}.input_layernorm", with_bias=True)
            rows.append((qkv_names(lm, "weight"), f"{attn}.query_key_value.weight", "heads"))
            rows.append((qkv_names(lm, "bias"), f"{attn}.query_key_value.bias", "heads"))
            add(f"{lm}.self_attn.o_proj", f"{attn}.dense", with_bias=True)
            add(f"{lm}.post_attention_layernorm", f"{hf}.post_attention_layernorm", with_bias=True)
            add(f"{lm}.mlp.up_proj", f"{hf}.mlp.dense_h_to_4h", with_bias=True)
            add(f"{lm}.mlp.down_proj", f"{hf}.mlp.dense_4h_to_h", with_bias=True)
        add("norm", f"{base}.final_layer_norm" if neox else f"{base}.ln_f", with_bias=True)
    elif family == "opt":
        add("embed_tokens", "model.decoder.embed_tokens")
        add("embed_positions", "model.decoder.embed_positions")
        for i in range(cfg.n_layers):
            lm, hf = f"layers.{i}", f"model.decoder.layers.{i}"
            add(f"{lm}.input_layernorm", f"{hf}.self_attn_layer_norm", with_bias=True)
            for p in "qkv":
                add(f"{lm}.self_attn.{p}_proj", f"{hf}.self_attn.{p}_proj", with_bias=qkv_b)
            add(f"{lm}.self_attn.o_proj", f"{hf}.self_attn.out_proj", with_bias=bias)
            add(f"{lm}.post_attention_layernorm", f"{hf}.final_layer_norm", with_bias=True)
            add(f"{lm}.mlp.up_proj", f"{hf}.fc1", with_bias=bias)
            add(f"{lm}.mlp.down_proj", f"{hf}.fc2", with_bias=bias)
        if cfg.has_final_norm:  # post-LN OPT (do_layer_norm_before=False) has none
            add("norm", "model.decoder.final_layer_norm", with_bias=True)
    elif family == "t5":
        add("embed_tokens", "shared")
        gated = cfg.activation in GATED
        n_dec = cfg.n_decoder_layers
        for side, n in (("encoder", cfg.n_layers), ("decoder", n_dec)):
            for i in range(n):
                lm, hf = f"{side}.layers.{i}", f"{side}.block.{i}.layer"
                for p in "qkvo":
                    add(f"{lm}.self_attn.{p}_proj", f"{hf}.0.SelfAttention.{p}")
                add(f"{lm}.input_layernorm", f"{hf}.0.layer_norm")
                ff = 1
                if side == "decoder":
                    ff = 2
                    for p in "qkvo":
                        add(f"{lm}.cross_attn.{p}_proj", f"{hf}.1.EncDecAttention.{p}")
                    add(f"{lm}.cross_attn_layernorm", f"{hf}.1.layer_norm")
                dense = f"{hf}.{ff}.DenseReluDense"
                if gated:
                    add(f"{lm}.mlp.gate_proj", f"{dense}.wi_0")
                    add(f"{lm}.mlp.up_proj", f"{dense}.wi_1")
                else:
                    add(f"{lm}.mlp.up_proj", f"{dense}.wi")
                add(f"{lm}.mlp.down_proj", f"{dense}.wo")
                add(f"{lm}.post_attention_layernorm", f"{hf}.{ff}.layer_norm")
            add(
                f"{side}.rel_pos_bias",
                f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias",
            )
            add(f"{side}.norm", f"{side}.final_layer_norm")
    else:
        raise UsageError(f"family {family!r} is not supported; choose from {', '.join(FAMILIES)}")
    if not cfg.tie_embeddings:
        add("lm_head", HEAD_KEY.get(family, "lm_head.weight").removesuffix(".weight"))
    return rows


def _normalize_hf_keys(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names as transformers 5 writes them: add a missing base prefix, rename
    legacy names (GPT-NeoX `embed_out`), drop buffers older versions saved."""
    prefix = BASE_PREFIX[family]
    out = {}
    for key, t in state.items():
        if IGNORED.search(key) or (family == "t5" and T5_IGNORED.search(key)):
            continue
        if family == "gpt_neox" and key == "lm_head.weight":
            key = "embed_out.weight"
        elif key.startswith(("lm_head.", "embed_out.")) or (prefix and key.startswith(prefix)):
            pass
        elif family == "opt" and key.startswith("decoder."):
            key = f"model.{key}"
        elif family == "t5" and key.startswith("transformer."):
            key = key[len("transformer.") :]
        else:
            key = prefix + key
        out[key] = t
    return out


def state_from_hf(
    family: str, cfg: ModelConfig, hf_state: dict[str, torch.Tensor], where: str | Path
) -> dict[str, torch.Tensor]:
    """HF tensors -> the lmlab state dict of `cfg` (vocabulary rows padded with zeros)."""
    hf_state = _normalize_hf_keys(family, hf_state)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for lm, hf, how in weight_table(family, cfg):
        if hf not in hf_state:
            raise CheckpointError(f"{where}: tensor {hf!r} is missing from the weights")
        used.add(hf)
        t = hf_state[hf]
        if how == "T":
            t = t.t()
        if "," in lm:
            out.update(zip(lm.split(","), _split_qkv(t, how, cfg), strict=True))
        else:
            out[lm] = t
    if cfg.tie_embeddings:
        used.add(HEAD_KEY.get(family, "lm_head.weight"))
    extra = sorted(set(hf_state) - used)
    if extra:
        raise CheckpointError(
            f"{where}: tensor {extra[0]!r} has no place in an lmlab {family} model "
            f"({len(extra)} unmapped)"
        )
    pv = cfg.padded_vocab_size
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in out and out[name].shape[0] < pv:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros(pv - t.shape[0], *t.shape[1:])])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def state_to_hf(
    family: str, cfg: ModelConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """lmlab state dict -> HF tensors (padded vocabulary rows cut off; each tensor owns its
    storage, as safetensors requires)."""
    out: dict[str, torch.Tensor] = {}
    for lm, hf, how in weight_table(family, cfg):
        names = lm.split(",")
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"checkpoint has no tensor {missing[0]!r}")
        if len(names) == 3:
            t = _merge_qkv([state[n] for n in names], how, cfg)
        else:
            t = state[lm]
            if lm in ("embed_tokens.weight", "lm_head.weight"):
                t = t[: cfg.vocab_size]
            if how == "T":
                t = t.t()
        out[hf] = t.contiguous().clone()
    return out


def _split_qkv(t: torch.Tensor, how: str, cfg: ModelConfig) -> list[torch.Tensor]:
    if how == "cat":  # GPT-2 Conv1D: weight [in, 3d] (columns q|k|v), bias [3d]
        if t.dim() == 2:
            return [w.t() for w in t.chunk(3, dim=1)]
        return list(t.chunk(3))
    heads, hd = cfg.n_heads, cfg.head_dim  # per head [q, k, v] rows: [heads, 3, hd, ...]
    v = t.reshape(heads, 3, hd, *t.shape[1:])
    return [v[:, j].reshape(heads * hd, *t.shape[1:]) for j in range(3)]


def _merge_qkv(parts: list[torch.Tensor], how: str, cfg: ModelConfig) -> torch.Tensor:
    if how == "cat":
        return torch.cat([p.t() if p.dim() == 2 else p for p in parts], dim=-1)
    heads, hd = cfg.n_heads, cfg.head_dim
    rest = parts[0].shape[1:]
    return torch.stack([p.reshape(heads, hd, *rest) for p in parts], dim=1).reshape(
        3 * heads * hd, *rest
    )


# --- the three entry points -----------------------------------------------------------


def convert_from_hf(src_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert an HF model directory to an lmlab checkpoint (written atomically). An
    existing `out_dir` is replaced only when it is an earlier conversion and `overwrite`."""
    src = Path(src_dir)
    claim_output_dir(out_dir, "convert", overwrite=overwrite)
    model, hf = _load_lmlab_from_hf(src, keep_dtype=True)
    extra = {"converted_from": {"model_type": hf["model_type"], "path": str(src)}}
    save_checkpoint(
        model,
        out_dir,
        extra=extra,
        write_extra=lambda d: _copy_tokenizer(src, d),
        kind="convert",
    )
    return Path(out_dir)


def load_hf_model(src_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """An HF directory of a supported family as an lmlab model, converted in memory (so
    lmlab's KV cache and decoding work on it)."""
    model, _ = _load_lmlab_from_hf(Path(src_dir), keep_dtype=False)
    return model.to(device).eval()


def _load_lmlab_from_hf(src: Path, keep_dtype: bool) -> tuple[torch.nn.Module, dict]:
    if not src.is_dir():
        raise UsageError(f"{src}: no such directory")
    hf = read_hf_config(src)
    cfg = config_from_hf(hf, src / "config.json")
    hf_state = read_hf_weights(src)
    family = hf["model_type"]
    hf_state = _resolve_head(family, cfg, hf, hf_state, src)
    state = state_from_hf(family, cfg, hf_state, src)
    # float32 in memory, as load_model gives for lmlab checkpoints; convert keeps the dtype
    dtype = state["embed_tokens.weight"].dtype if keep_dtype else torch.float32
    state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):  # no second copy of the weights, no random init to discard
        model = build_model(cfg)
    problem = state_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{src}: weights do not match config.json: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gave the head its own Parameter; share it again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), hf


# The output head, where it is not `lm_head.weight`: transformers (5 included) writes
# GPT-NeoX's as `embed_out`, the name 4.x modules have, so exports use it too.
HEAD_KEY = {"gpt_neox": "embed_out.weight"}
EMBED_KEY = {
    "llama": "model.embed_tokens.weight",
    "mistral": "model.embed_tokens.weight",
    "qwen2": "model.embed_tokens.weight",
    "gpt2": "transformer.wte.weight",
    "gpt_neox": "gpt_neox.embed_in.weight",
    "opt": "model.decoder.embed_tokens.weight",
    "bloom": "transformer.word_embeddings.weight",
    "t5": "shared.weight",
}


def _resolve_head(
    family: str, cfg: ModelConfig, hf: dict, state: dict[str, torch.Tensor], src: Path
) -> dict[str, torch.Tensor]:
    """Decide tied or untied as transformers 5 does: a tied config whose checkpoint holds a
    different `lm_head` is loaded untied; an untied head missing from a checkpoint whose
    config ties is the embedding. T5 is the exception: its tie flag is the d_model**-0.5
    output scale, so a tied T5 with its own head cannot be expressed."""
    state = _normalize_hf_keys(family, state)
    head_key = HEAD_KEY.get(family, "lm_head.weight")
    emb, head = state.get(EMBED_KEY[family]), state.get(head_key)
    if emb is None:
        return state
    same = head is None or (head.shape == emb.shape and torch.equal(head, emb))
    if cfg.tie_embeddings and not same:
        if family == "t5":
            raise UsageError(
                f"{src / 'config.json'}: a T5 with scale_decoder_outputs (tied head) whose "
                "lm_head differs from the shared embedding is not supported"
            )
        cfg.tie_embeddings = False
    elif not cfg.tie_embeddings and head is None and hf.get("tie_word_embeddings") is not False:
        state[head_key] = emb.clone()  # tied in HF; an lmlab T5 tie would also scale
    return state


def export_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    family: str | None = None,
    overwrite: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Write an lmlab checkpoint as an HF model directory (atomically): config.json,
    model.safetensors with HF names, tokenizer files and generation_config.json.

    A checkpoint without tokenizer.json is refused (transformers could not use the
    export) unless `tokenizer=False`; an existing `out_dir` is replaced only when it is an
    earlier export and `overwrite`. `ckpt_dir` is a checkpoint directory; `lmlab export`
    also takes a run directory, which it resolves to its newest model first. A form with
    no checkpoint directory (a GGUF file, a store name) is converted into a temporary one
    beside `out_dir` first, so its own tokenizer files are what is exported."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file():
        from lmlab.model.loading import as_checkpoint, find_format  # it imports this module

        if find_format(ckpt)[0].convert is None:
            raise UsageError(f"{ckpt}: not a checkpoint directory (no config.json)")
        out = claim_output_dir(out_dir, "export-hf", overwrite=overwrite)
        with as_checkpoint(ckpt, scratch=out.parent) as tmp:
            return export_to_hf(tmp, out_dir, family, overwrite, tokenizer)
    claim_output_dir(out_dir, "export-hf", overwrite=overwrite)
    if tokenizer and not (ckpt / "tokenizer.json").is_file():
        raise UsageError(
            f"{ckpt}: no tokenizer.json, so transformers could not use the export; "
            "pass --no-tokenizer to export the weights alone"
        )
    cfg_json = read_config(ckpt)
    if cfg_json.get("format") != FORMAT:
        raise UsageError(f"{ckpt / 'config.json'}: not an lmlab checkpoint (format != {FORMAT})")
    try:
        cfg = ModelConfig.from_dict(cfg_json["model"])
    except KeyError:
        raise CheckpointError(f"{ckpt / 'config.json'}: no 'model' key") from None
    fam = choose_family(cfg, family)
    weights = ckpt / "model.safetensors"
    state = _read_safetensors(weights)
    if cfg.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        hf_state = state_to_hf(fam, cfg, state)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    dtype = str(state["embed_tokens.weight"].dtype).removeprefix("torch.")
    special = _special_token_ids(ckpt)
    hf_cfg = config_to_hf(fam, cfg, dtype, special)
    if cfg.reward_head:  # a reward model: transformers' sequence classification, one label
        if fam not in LLAMA_LIKE:
            raise UsageError(f"a reward model exports as llama, mistral or qwen2, not {fam}")
        hf_state.pop("lm_head.weight", None)
        hf_state["score.weight"] = state["score.weight"].contiguous().clone()
        causal = ARCHITECTURES[fam]
        hf_cfg["architectures"] = [causal.replace("ForCausalLM", "ForSequenceClassification")]
        hf_cfg["num_labels"] = 1
    with atomic_dir(out_dir, kind="export-hf") as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_cfg)
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if fam == "t5":
            gen["decoder_start_token_id"] = hf_cfg["decoder_start_token_id"]
        own = ckpt / "generation_config.json"  # a model's own stop ids (say EOS and EOT)
        end_of_turn = special.pop("end_of_turn_id", None)
        if end_of_turn is not None and end_of_turn != gen["eos_token_id"]:
            # lmlab's chat template ends a turn with <|end|>: transformers must stop there too
            gen["eos_token_id"] = [i for i in (gen["eos_token_id"], end_of_turn) if i is not None]
        if own.is_file():
            stops = _read_json_file(own).get("eos_token_id")
            if isinstance(stops, int) or (
                isinstance(stops, list) and stops and all(isinstance(i, int) for i in stops)
            ):
                gen["eos_token_id"] = stops
        _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        if tokenizer:
            _export_tokenizer(ckpt, tmp)
    return Path(out_dir)


# --- tokenizer files ------------------------------------------------------------------


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files; if there is no tokenizer.json but transformers can build a
    fast tokenizer from what is there (e.g. sentencepiece), save that."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (dst / "tokenizer.json").is_file():
        return
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)
    except Exception:  # no tokenizer at all, or one transformers cannot read: weights only
        return
    if not getattr(tok, "is_fast", False):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, dst / name)


def _export_tokenizer(ckpt: Path, dst: Path) -> None:
    """tokenizer.json as is, and a tokenizer_config.json that AutoTokenizer loads without
    custom code (no auto_map; the generic fast-tokenizer class)."""
    if not (ckpt / "tokenizer.json").is_file():
        return
    shutil.copy2(ckpt / "tokenizer.json", dst / "tokenizer.json")
    conf: dict[str, Any] = {}
    src = ckpt / "tokenizer_config.json"
    if src.is_file():
        try:
            conf = json.loads(src.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{src}: invalid JSON ({e})") from None
    conf.pop("auto_map", None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(dst / "tokenizer_config.json", conf)
    if (ckpt / "special_tokens_map.json").is_file():
        shutil.copy2(ckpt / "special_tokens_map.json", dst / "special_tokens_map.json")


def _special_token_ids(ckpt: Path) -> dict[str, int | None]:
    """bos/eos/pad ids for the HF config, from the tokenizer saved with the checkpoint."""
    out: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if not (ckpt / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    except Exception as e:  # the Rust error text names what is wrong
        raise CheckpointError(f"{ckpt / 'tokenizer.json'}: not a valid tokenizer ({e})") from None
    conf = {}
    if (ckpt / "tokenizer_config.json").is_file():
        try:
            conf = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            path = ckpt / "tokenizer_config.json"
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    for role in ("bos", "eos", "pad"):
        tok_str = conf.get(f"{role}_token")
        if isinstance(tok_str, dict):  # AddedToken serialised as a dict
            tok_str = tok_str.get("content")
        if isinstance(tok_str, str):
            out[f"{role}_token_id"] = tok.token_to_id(tok_str)
    template = conf.get("chat_template")
    if isinstance(template, str) and LMLAB_END_OF_TURN in template:
        out["end_of_turn_id"] = tok.token_to_id(LMLAB_END_OF_TURN)
    return out


# --- small helpers --------------------------------------------------------------------


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

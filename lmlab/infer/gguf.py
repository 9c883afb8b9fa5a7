"""GGUF export for llama.cpp: an lmlab checkpoint of the LLaMA family as one file.

llama.cpp's `llama` architecture is pre-RMSNorm, RoPE over whole heads, SwiGLU, no biases,
multi-head or grouped-query attention, tied or untied embeddings, optionally Mixtral-style
experts (softmax router, top-k, renormalised weights). Any other `ModelConfig` is refused
with the field that llama.cpp cannot express: a file that loads but computes a different
function is worse than no file.

Three conventions differ from lmlab's (which are Hugging Face's):
- RoPE: lmlab rotates the two halves of each head (`rotate_half`); llama.cpp's `llama`
  graph rotates adjacent pairs. The rows of q_proj/k_proj are permuted per head so that
  pair i is (row i, row i + head_dim/2) -> (row 2i, row 2i+1); the function is unchanged.
  The permutation and llama.cpp's tensor names live in `lmlab.model.gguf`, which reads
  GGUF files back (`load_model(file.gguf)`) with the same table.
- Vocabulary: GGUF holds one token per embedding row. lmlab pads the embedding to a
  multiple of 64 rows that no token uses; the export slices them off (vocab_size rows),
  and fills any id the tokenizer lacks below vocab_size with an UNUSED `[PADi]` token.
- Tokenizer: a byte-level BPE is llama.cpp's `gpt2` model with the pre-tokenizer name
  of its split: lmlab's own (GPT-2 regex, no prefix space) is `gpt-2`; an imported
  model's is the name its GGUF file had (`smollm`, `llama-bpe`, `qwen2`, ...), with its
  own special tokens, BOS/EOS/UNK/PAD ids and chat template. Special tokens are CONTROL
  tokens, matched in text when llama.cpp tokenizes with `special=True`, as `tokenizers`
  always does.

Weights are read and written one tensor at a time (bounded memory); the file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.config import ModelConfig

# unpermute_qk, the inverse, is imported from here by the export's tests
from lmlab.model.gguf import is_gguf, permute_qk, tensor_map, unpermute_qk  # noqa: F401
from lmlab.model.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_name
from lmlab.tokenizer import END
from lmlab.utils import atomic_path, claim_output_file

# qtype -> (ggml tensor type name, llama file type, bits per weight incl. block scales)
QTYPES: dict[str, tuple[str, int, float]] = {
    "f32": ("F32", 0, 32.0),
    "f16": ("F16", 1, 16.0),
    "q8_0": ("Q8_0", 7, 8.5),  # blocks of 32: one f16 scale + 32 int8
    "q4_0": ("Q4_0", 2, 4.5),  # blocks of 32: one f16 scale + 32 4-bit values
}
BLOCK = 32  # q8_0 / q4_0 block length along a row; other row lengths fall back to f16


# --- what llama.cpp's llama architecture can express ------------------------------------


def gguf_fit_reasons(cfg: ModelConfig) -> list[str]:
    """Why `cfg` cannot be written as llama.cpp's `llama` architecture (empty: it can)."""
    default_scale = cfg.attn_scale is None or abs(cfg.attn_scale * cfg.head_dim**0.5 - 1) < 1e-9
    checks: list[tuple[str, bool, str]] = [
        ("family", cfg.family == "decoder", "decoder (a causal decoder-only model)"),
        ("norm", cfg.norm == "rmsnorm", "rmsnorm"),
        ("norm_position", cfg.norm_position == "pre", "pre"),
        ("deepnorm", not cfg.deepnorm, "False"),
        ("embed_norm", not cfg.embed_norm, "False"),
        ("parallel_residual", not cfg.parallel_residual, "False"),
        ("position", cfg.position == "rope", "rope"),
        ("rotary_fraction", cfg.rotary_fraction == 1.0, "1.0 (llama rotates whole heads)"),
        ("activation", cfg.activation == "swiglu", "swiglu"),
        ("bias", not cfg.bias, "False"),
        ("qkv_bias", not cfg.uses_qkv_bias, "False or None"),
        ("sliding_window", cfg.sliding_window is None, "None (llama has no local attention)"),
        ("attn_scale", default_scale, "None (1/sqrt(head_dim))"),
    ]
    if cfg.n_experts:
        checks.append(
            (
                "capacity_factor",
                cfg.capacity_factor is None,
                "None (llama.cpp never drops an expert assignment)",
            )
        )
    return [f"{k}={getattr(cfg, k)!r} (needs {want})" for k, ok, want in checks if not ok]


def check_gguf_fit(cfg: ModelConfig) -> None:
    reasons = gguf_fit_reasons(cfg)
    if reasons:
        raise UsageError(
            "this model cannot be exported to GGUF (llama.cpp architecture 'llama'): "
            + "; ".join(reasons)
        )


# --- tensors ------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # row-major, as torch (GGUF stores the reverse)
    load: Callable[[], torch.Tensor]
    quantize: bool  # weight matrices follow qtype; norms and the router stay f32


def lmlab_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor an lmlab checkpoint of `cfg` holds (a tied head: none)."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.ffn_hidden
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.padded_vocab_size, d)}
    for i in range(cfg.n_layers):
        lm = f"layers.{i}"
        out[f"{lm}.input_layernorm.weight"] = (d,)
        out[f"{lm}.self_attn.q_proj.weight"] = (cfg.n_heads * hd, d)
        out[f"{lm}.self_attn.k_proj.weight"] = (cfg.n_kv_heads * hd, d)
        out[f"{lm}.self_attn.v_proj.weight"] = (cfg.n_kv_heads * hd, d)
        out[f"{lm}.self_attn.o_proj.weight"] = (d, cfg.n_heads * hd)
        out[f"{lm}.post_attention_layernorm.weight"] = (d,)
        mlps = [f"{lm}.mlp"]
        if cfg.n_experts:
            out[f"{lm}.mlp.router.weight"] = (cfg.n_experts, d)
            mlps = [f"{lm}.mlp.experts.{e}" for e in range(cfg.n_experts)]
        for m in mlps:
            out[f"{m}.gate_proj.weight"] = (ff, d)
            out[f"{m}.up_proj.weight"] = (ff, d)
            out[f"{m}.down_proj.weight"] = (d, ff)
    out["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.padded_vocab_size, d)
    return out


def tensor_plan(cfg: ModelConfig, read: Callable[[str], torch.Tensor]) -> list[_Tensor]:
    """Every GGUF tensor of `cfg`, in llama.cpp's names and order (`tensor_map`, which the
    reader shares), each loaded (by `read(lmlab name)`) only when it is written."""
    shapes = lmlab_shapes(cfg)
    out: list[_Tensor] = []
    for m in tensor_map(cfg):
        shape = shapes[m.lmlab[0]]
        if m.vocab:  # padded rows no token uses are cut
            shape = (cfg.vocab_size, *shape[1:])
        if len(m.lmlab) > 1:  # experts stacked: [n_experts, out, in]
            shape = (len(m.lmlab), *shape)

        def load(m=m) -> torch.Tensor:
            if len(m.lmlab) > 1:
                return torch.stack([read(n) for n in m.lmlab])
            t = read(m.lmlab[0])
            if m.vocab:
                t = t[: cfg.vocab_size]
            return permute_qk(t, m.rope_heads) if m.rope_heads else t

        out.append(_Tensor(m.gguf, shape, load, m.matrix))
    return out


def ggml_type_for(t: _Tensor, qtype: str) -> str:
    """The GGML type of one tensor under `qtype`: 1-D tensors and the router stay F32;
    a block format needs the row length to be a multiple of 32, else F16."""
    if not t.quantize or len(t.shape) < 2:
        return "F32"
    name = QTYPES[qtype][0]
    if name in ("Q8_0", "Q4_0") and t.shape[-1] % BLOCK:
        return "F16"
    return name


def encode_tensor(x: np.ndarray, type_name: str) -> np.ndarray:
    """float32 array -> the bytes (or f32/f16 array) GGUF stores for `type_name`."""
    if type_name == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(x, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), _qt(type_name))


def _qt(type_name: str):
    return gguf.GGMLQuantizationType[type_name]


def _nbytes(shape: tuple[int, ...], type_name: str) -> int:
    if type_name == "F32":
        return 4 * int(np.prod(shape))
    if type_name == "F16":
        return 2 * int(np.prod(shape))
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, _qt(type_name))))


# --- tokenizer ----------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos, eos, unk, pad, eot -> id (present ones only)
    chat_template: str | None
    pre: str  # tokenizer.ggml.pre: llama.cpp's name for the split


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _check_byte_level_bpe(tok: dict, path: Path, prefer: str | None = None) -> str:
    """The `tokenizer.ggml.pre` name of a tokenizer.json that llama.cpp's gpt2 tokenizer
    reproduces; any other is refused. `prefer`: the name the model's GGUF file had."""
    model = tok.get("model") or {}
    pre = tok.get("pre_tokenizer") or {}
    name = pre_tokenizer_name(pre, prefer)
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model.type={model.get('type')!r} (needs BPE)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            problems.append(f"model.{key}={model[key]!r} (needs null)")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        problems.append("model.byte_fallback/ignore_merges (needs false)")
    if name is None:
        problems.append(
            f"pre_tokenizer={pre!r} (needs the split of one of llama.cpp's pre-tokenizers: "
            f"{', '.join(PRE_TOKENIZERS)}; ByteLevel without a prefix space)"
        )
    if tok.get("normalizer") is not None:
        problems.append(f"normalizer={tok['normalizer'].get('type')!r} (needs null)")
    post = tok.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        problems.append(f"post_processor={post.get('type')!r} (needs null or ByteLevel)")
    if problems:
        raise UsageError(
            f"{path}: not a byte-level BPE that llama.cpp's gpt2 tokenizer reproduces: "
            + "; ".join(problems)
        )
    return name


def read_vocab(ckpt: Path, vocab_size: int, prefer_pre: str | None = None) -> GGUFVocab:
    """The GGUF vocabulary of a checkpoint's tokenizer, one token per id < `vocab_size`,
    with the special-token ids its tokenizer_config.json and generation_config.json name."""
    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise UsageError(
            f"{path}: no such file; a GGUF file embeds the tokenizer, so the "
            "checkpoint needs its tokenizer.json"
        )
    tok = _read_json(path)
    if not isinstance(tok, dict) or not isinstance((tok.get("model") or {}).get("vocab"), dict):
        raise CheckpointError(f"{path}: not a tokenizers file (no model.vocab object)")
    pre = _check_byte_level_bpe(tok, path, prefer_pre)
    by_id: dict[int, str] = {i: s for s, i in tok["model"]["vocab"].items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in by_id}
    for added in tok.get("added_tokens") or []:
        i = added["id"]
        by_id[i] = added["content"]
        special = added.get("special", False)
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise UsageError(
            f"{path}: token id {max(by_id)} does not fit the model's vocab_size={vocab_size}"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]

    conf: dict[str, Any] = {}
    if (ckpt / "tokenizer_config.json").is_file():
        conf = _read_json(ckpt / "tokenizer_config.json")
    ids = {s: i for i, s in by_id.items()}
    special_ids: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        s = conf.get(f"{role}_token")
        s = s.get("content") if isinstance(s, dict) else s
        if isinstance(s, str) and s in ids:
            special_ids[role] = ids[s]
    # lmlab has no BOS (documents are separated by EOS) and adds none; GPT-2 names EOS as
    # BOS too, which keeps llama.cpp from defaulting BOS to an arbitrary id.
    if "bos" not in special_ids and "eos" in special_ids:
        special_ids["bos"] = special_ids["eos"]
    if END in ids:  # the end of a chat turn (lmlab's chat template)
        special_ids["eot"] = ids[END]
    else:  # a model's own: a stop id beside EOS in its generation_config.json
        gen = (
            _read_json(ckpt / "generation_config.json")
            if (ckpt / "generation_config.json").is_file()
            else {}
        )
        stops = gen.get("eos_token_id") if isinstance(gen, dict) else None
        stops = stops if isinstance(stops, list) else [stops]
        others = [i for i in stops if isinstance(i, int) and 0 <= i < vocab_size]
        others = [i for i in others if i != special_ids.get("eos")]
        if others:
            special_ids["eot"] = others[0]
    template = conf.get("chat_template")
    return GGUFVocab(
        tokens,
        token_types,
        merges,
        special_ids,
        template if isinstance(template, str) else None,
        pre,
    )


# --- export -------------------------------------------------------------------------------


def _rope_base(cfg: ModelConfig) -> float:
    """lmlab's static NTK-aware scaling is a larger base (as `rope_inv_freq` computes it)."""
    theta = float(cfg.rope_theta)
    if cfg.rope_scaling == "ntk":
        rd = cfg.rotary_dim
        theta *= cfg.rope_scaling_factor ** (rd / (rd - 2))
    return theta


def export_gguf(
    checkpoint_dir: str | Path, out_path: str | Path, qtype: str = "f16", overwrite: bool = False
) -> Path:
    """Write an lmlab checkpoint (or a run's newest model) as a llama.cpp GGUF file.

    `qtype`: f32, f16, q8_0 or q4_0 for the weight matrices (norms stay f32). The file
    appears under `out_path` only once complete; an existing file is replaced only when it
    is a GGUF file and `overwrite`."""
    from lmlab.model.loading import as_checkpoint

    if qtype not in QTYPES:
        raise UsageError(f"qtype {qtype!r} is not supported; choose from {', '.join(QTYPES)}")
    claim_output_file(out_path, "GGUF", is_gguf, overwrite=overwrite)
    with as_checkpoint(checkpoint_dir, scratch=Path(out_path).resolve().parent) as ckpt:
        return _export_gguf(ckpt, Path(out_path), qtype)


def _export_gguf(ckpt: Path, out_path: Path, qtype: str) -> Path:
    from safetensors import safe_open

    from lmlab.model.checkpoint import FORMAT, read_config

    cfg_json = read_config(ckpt)
    if cfg_json.get("format") != FORMAT:
        raise UsageError(f"{ckpt / 'config.json'}: not an lmlab checkpoint (format != {FORMAT})")
    if "model" not in cfg_json:
        raise CheckpointError(f"{ckpt / 'config.json'}: no 'model' key")
    cfg = ModelConfig.from_dict(cfg_json["model"])
    check_gguf_fit(cfg)
    source = cfg_json.get("converted_from")
    source = source if isinstance(source, dict) else {}
    vocab = read_vocab(ckpt, cfg.vocab_size, source.get("tokenizer_pre"))

    weights = ckpt / "model.safetensors"
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as e:  # the safetensors error text says what is wrong
        raise CheckpointError(f"{weights}: cannot read weights ({e})") from None
    with handle as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        shapes = lmlab_shapes(cfg)
        extra = sorted(set(stored) - set(shapes) - {"lm_head.weight"})
        if extra:
            raise CheckpointError(
                f"{weights}: tensor {extra[0]!r} has no place in the model config.json describes"
            )
        for name, shape in shapes.items():  # every tensor checked before anything is written
            if name not in stored:
                raise CheckpointError(f"{weights}: tensor {name!r} is missing")
            if stored[name] != shape:
                raise CheckpointError(
                    f"{weights}: tensor {name!r} has shape {list(stored[name])}, "
                    f"config.json implies {list(shape)}"
                )

        def read(name: str) -> torch.Tensor:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                name = "embed_tokens.weight"
            return f.get_tensor(name).float()

        plan = tensor_plan(cfg, read)
        types = [ggml_type_for(t, qtype) for t in plan]
        with atomic_path(out_path) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            try:
                _write_metadata(writer, cfg, vocab, qtype, source.get("name"))
                for t, ty in zip(plan, types, strict=True):
                    dtype = np.float16 if ty == "F16" else np.float32
                    writer.add_tensor_info(t.name, t.shape, dtype, _nbytes(t.shape, ty), _qt(ty))
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for t, ty in zip(plan, types, strict=True):
                    writer.write_tensor_data(encode_tensor(t.load().numpy(), ty))
            finally:
                writer.close()
    return Path(out_path)


def _write_metadata(
    writer, cfg: ModelConfig, vocab: GGUFVocab, qtype: str, name: str | None
) -> None:
    writer.add_name(name if isinstance(name, str) else cfg.preset or "lmlab")
    writer.add_file_type(QTYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(_rope_base(cfg))
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling_factor))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.experts_top_k)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for role, i in vocab.special.items():
        adders[role](i)
    writer.add_add_space_prefix(False)  # a byte-level BPE never adds one (checked above)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- running a GGUF file with llama.cpp ---------------------------------------------------


def load_llama_cpp(
    path: str | Path,
    n_threads: int | None = None,
    n_ctx: int = 0,
    logits_all: bool = False,
    **kwargs: Any,
):
    """A `llama_cpp.Llama` for a GGUF file (n_ctx=0: the model's context length;
    `logits_all` keeps every position's logits in `.scores`, else only the last is made).
    Other keyword arguments go to `Llama` (say `type_k=0, type_v=0` for an f32 KV cache;
    llama.cpp's default is f16)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UsageError(
            "running a GGUF file needs llama-cpp-python: pip install 'lmlab[gguf]'"
        ) from None
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such GGUF file")
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=logits_all,
        **{"verbose": False, **kwargs},
    )


def gguf_greedy(
    gguf_path, prompt_ids: list[int], n: int, n_threads: int | None = None
) -> list[int]:
    """`n` greedy tokens from llama.cpp after `prompt_ids`: exactly n, no stop token, as
    lmlab's `generate` with no stop ids. `gguf_path` is a file or a loaded `Llama`."""
    import llama_cpp

    llm = gguf_path if hasattr(gguf_path, "eval") else load_llama_cpp(gguf_path, n_threads)
    if not prompt_ids:
        raise UsageError("gguf_greedy: empty prompt")
    if len(prompt_ids) + n > llm.n_ctx():
        raise UsageError(
            f"gguf_greedy: prompt {len(prompt_ids)} + {n} new tokens exceed n_ctx={llm.n_ctx()}"
        )
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(list(prompt_ids))
    out: list[int] = []
    while len(out) < n:
        # the last position's logits, which llama.cpp computes even without logits_all
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (n_vocab,))
        out.append(int(np.argmax(logits)))
        if len(out) < n:
            llm.eval([out[-1]])
    return out

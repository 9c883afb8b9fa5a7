"""GGUF, llama.cpp's one-file model format: reading it as an lmlab model, and the pieces
that export (`lmlab.infer.gguf`) shares with the reader.

A GGUF file holds metadata (hyper-parameters under `{arch}.*`, the tokenizer under
`tokenizer.*`, read by `lmlab.model.gguf_vocab`) and tensors in llama.cpp's names, each
in one GGML type: float, or blocks of quantized weights with their scales.

- **What is read.** The architectures lmlab computes exactly: `llama`, `mistral` (the
  `llama` layout; llama.cpp itself writes Mistral models as `llama`) and `qwen2` (q/k/v
  biases). Every `{arch}.*` key must be one lmlab reads; any other (a RoPE scaling type
  lmlab lacks, per-layer head counts, a logit scale, ...) is refused with its name, as is
  a missing, misshapen or unknown tensor and a tensor type outside `TYPES`: a model that
  loads but computes another function is worse than none.
- **Memory.** The file is memory-mapped (`gguf.GGUFReader`). The model is built on the
  meta device and each tensor is dequantized by the gguf package (`gguf.quants`) straight
  into the parameter it becomes, so the float model is the only full copy ever held.
- **RoPE.** llama.cpp's `llama` graph rotates adjacent pairs of each head, so its
  converter permutes the rows of q/k per head (`permute_qk`); lmlab rotates halves, as
  Hugging Face does, and `unpermute_qk` undoes it. `qwen2` rotates halves in llama.cpp
  too: its rows are as they are.
- **Vocabulary.** One embedding row per token in the file; lmlab pads the rows to a
  multiple of 64 with zeros (no token uses them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model
from lmlab.model.gguf_vocab import read_gguf_tokenizer, value
from lmlab.utils import claim_output_dir, write_json

MAGIC = b"GGUF"
# architecture -> whether llama.cpp's converter permuted the q/k rows (its rope rotates pairs)
ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}
QKV_BIAS = ("qwen2",)  # Qwen2: q/k/v biased, o_proj and the MLP not
_T = gguf.GGMLQuantizationType
# tensor types dequantized with gguf.quants; the rest (IQ*, TQ*, MXFP4, integer types) refused
TYPES = (
    *(_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1),
    *(_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K),
)
# `{arch}.` keys the reader understands; any other one under the architecture is refused
KNOWN_KEYS = {
    "vocab_size",
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.sliding_window",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",  # informative for linear scaling
    "rope.scaling.finetuned",
    "expert_count",
    "expert_used_count",
}


def is_gguf(path: str | Path) -> bool:
    """Whether `path` starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# --- the RoPE layout change ---------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate_half order (per head: first half, second half)
    to llama.cpp's interleaved pairs (per head: x1[0], x2[0], x1[1], x2[1], ...)."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# --- llama.cpp's tensor names -------------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    """One GGUF tensor and the lmlab parameter(s) it holds."""

    gguf: str  # llama.cpp's name
    lmlab: tuple[str, ...]  # one parameter, or one per expert (stacked along the first dim)
    rope_heads: int | None = None  # q/k rows permuted per head (llama.cpp's llama layout)
    matrix: bool = True  # a weight matrix (export quantizes it); norms, router, biases are not
    vocab: bool = False  # one row per token (lmlab pads these rows to a multiple of 64)


def tensor_map(cfg: ModelConfig, permuted: bool = True) -> list[TensorMap]:
    """Every GGUF tensor of a llama-layout `cfg`, in llama.cpp's names and order."""
    h = cfg.n_heads if permuted else None
    kv = cfg.n_kv_heads if permuted else None
    out = [TensorMap("token_embd.weight", ("embed_tokens.weight",), vocab=True)]
    for i in range(cfg.n_layers):
        blk, lm = f"blk.{i}", f"layers.{i}"
        attn = f"{lm}.self_attn"
        out.append(
            TensorMap(f"{blk}.attn_norm.weight", (f"{lm}.input_layernorm.weight",), matrix=False)
        )
        for g, proj, heads in (("q", "q_proj", h), ("k", "k_proj", kv), ("v", "v_proj", None)):
            out.append(TensorMap(f"{blk}.attn_{g}.weight", (f"{attn}.{proj}.weight",), heads))
            if cfg.uses_qkv_bias:
                bias = (f"{attn}.{proj}.bias",)
                out.append(TensorMap(f"{blk}.attn_{g}.bias", bias, heads, matrix=False))
        out.append(TensorMap(f"{blk}.attn_output.weight", (f"{attn}.o_proj.weight",)))
        norm = (f"{lm}.post_attention_layernorm.weight",)
        out.append(TensorMap(f"{blk}.ffn_norm.weight", norm, matrix=False))
        projections = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
        if not cfg.n_experts:
            for g, p in projections:
                out.append(TensorMap(f"{blk}.ffn_{g}.weight", (f"{lm}.mlp.{p}.weight",)))
            continue
        router = (f"{lm}.mlp.router.weight",)
        out.append(TensorMap(f"{blk}.ffn_gate_inp.weight", router, matrix=False))
        for g, p in projections:  # experts stacked: [n_experts, out, in]
            names = tuple(f"{lm}.mlp.experts.{e}.{p}.weight" for e in range(cfg.n_experts))
            out.append(TensorMap(f"{blk}.ffn_{g}_exps.weight", names))
    out.append(TensorMap("output_norm.weight", ("norm.weight",), matrix=False))
    if not cfg.tie_embeddings:  # a tied model has no output.weight: llama.cpp reuses token_embd
        out.append(TensorMap("output.weight", ("lm_head.weight",), vocab=True))
    return out


# --- reading a file -----------------------------------------------------------------------


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The parsed file; one that is not GGUF, or is corrupt or truncated, is a
    CheckpointError naming it. The last file read is kept, so loading a model and then its
    tokenizer (as `lmlab generate` does) parses its metadata once: for a 50k-token
    vocabulary that takes seconds."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise UsageError(f"{p}: cannot read it ({e.strerror})") from None
    return _reader(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # struct, value, index, unicode errors: the text says which part
        raise CheckpointError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})"
        ) from None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def architecture_of(reader: gguf.GGUFReader, path: str | Path) -> str:
    """`general.architecture`, refused unless lmlab reads it."""
    arch = value(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: key 'general.architecture' is missing")
    if arch not in ARCHITECTURES:
        raise UsageError(
            f"{path}: general.architecture = {arch!r} is not supported "
            f"(lmlab reads {', '.join(ARCHITECTURES)})"
        )
    return arch


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path) -> ModelConfig:
    """The `ModelConfig` a GGUF file's metadata describes, refusing what lmlab lacks."""
    arch = architecture_of(reader, path)
    parts = value(reader, "split.count", 1)
    if parts > 1:
        raise UsageError(
            f"{path}: split.count = {parts}: one part of a split GGUF file; merge the parts "
            "first (llama-gguf-split --merge)"
        )
    for key in reader.fields:
        if key.startswith(f"{arch}.") and key[len(arch) + 1 :] not in KNOWN_KEYS:
            raise UsageError(
                f"{path}: key {key!r} = {_short(value(reader, key))}: lmlab has no equivalent"
            )

    def get(name: str, default: Any = None) -> Any:
        v = value(reader, f"{arch}.{name}", default)
        if isinstance(v, list):
            raise UsageError(
                f"{path}: key '{arch}.{name}' = {_short(v)} varies by layer; "
                "lmlab's layers share one value"
            )
        return v

    def need(name: str) -> Any:
        v = get(name)
        if v is None:
            raise CheckpointError(f"{path}: key '{arch}.{name}' is missing")
        return v

    def refuse(name: str, why: str) -> UsageError:
        return UsageError(f"{path}: key '{arch}.{name}' = {_short(get(name))}: {why}")

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    d, vocab = (int(n) for n in embd.shape[:2])  # GGUF lists dimensions innermost first
    if get("vocab_size", vocab) != vocab:
        raise refuse("vocab_size", f"token_embd.weight has {vocab} rows")
    if need("embedding_length") != d:
        raise refuse("embedding_length", f"token_embd.weight rows have {d} values")
    heads = need("attention.head_count")
    head_dim = get("attention.key_length", d // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise refuse("attention.value_length", f"lmlab needs it equal to key_length {head_dim}")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise refuse("rope.dimension_count", f"lmlab rotates whole heads ({head_dim})")
    factor = float(get("rope.scaling.factor") or 1.0)
    # llama.cpp reads a factor with no type as linear
    kind = get("rope.scaling.type") or ("linear" if factor != 1.0 else "none")
    if kind not in ("none", "linear"):
        raise refuse("rope.scaling.type", "lmlab's RoPE scaling is none or linear")
    scaling = {"rope_scaling": "linear", "rope_scaling_factor": factor} if kind == "linear" else {}
    kw = dict(
        preset=None,
        family="decoder",
        vocab_size=vocab,
        n_layers=need("block_count"),
        d_model=d,
        n_heads=heads,
        n_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        ffn_hidden=need("feed_forward_length"),
        max_seq_len=need("context_length"),
        norm="rmsnorm",
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        norm_position="pre",
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        **scaling,
        activation="swiglu",
        bias=False,
        qkv_bias=arch in QKV_BIAS,
        n_experts=get("expert_count", 0),
        experts_top_k=get("expert_used_count", 2),
        sliding_window=get("attention.sliding_window"),
        tie_embeddings="output.weight" not in tensors,
        pad_vocab_multiple=64,
    )
    try:
        return ModelConfig(**kw)
    except (UsageError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: cannot be expressed as an lmlab ModelConfig ({e})") from None


def _plan(
    reader: gguf.GGUFReader,
    cfg: ModelConfig,
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    permuted: bool,
) -> list[tuple[TensorMap, Any]]:
    """Each GGUF tensor with the parameters it fills, every one checked (present, of a type
    lmlab reads, of the shape the metadata implies, none left over) before any is read."""
    tensors = {t.name: t for t in reader.tensors}
    plan = []
    for m in tensor_map(cfg, permuted):
        t = tensors.pop(m.gguf, None)
        if t is None:
            raise CheckpointError(f"{path}: tensor {m.gguf!r} is missing")
        if t.tensor_type not in TYPES:
            raise UsageError(
                f"{path}: tensor {m.gguf!r} has type {t.tensor_type.name}; lmlab reads "
                + ", ".join(ty.name for ty in TYPES)
            )
        want = shapes[m.lmlab[0]]
        if m.vocab:
            want = (cfg.vocab_size, *want[1:])
        if len(m.lmlab) > 1:
            want = (len(m.lmlab), *want)
        got = tuple(int(n) for n in reversed(t.shape))
        if got != want:
            raise CheckpointError(
                f"{path}: tensor {m.gguf!r} has shape {list(got)}, the metadata implies "
                f"{list(want)}"
            )
        plan.append((m, t))
    if tensors:
        name = sorted(tensors)[0]
        raise UsageError(f"{path}: tensor {name!r} has no place in the model lmlab builds")
    return plan


def dequantize(t: Any) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor of its row-major shape, owning its memory
    (never a view of the memory-mapped file)."""
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    if not x.flags.owndata or not x.flags.writeable:  # F32 comes back as a view of the file
        x = np.array(x, dtype=np.float32)
    return torch.from_numpy(x.reshape(tuple(int(n) for n in reversed(t.shape))))


def load_gguf_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A GGUF file as an lmlab model in float32, in eval mode (see the module docstring)."""
    reader = open_gguf(path)
    arch = architecture_of(reader, path)
    cfg = config_from_gguf(reader, path)
    with torch.device("meta"):  # no random init, no second copy of the weights
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for m, t in _plan(reader, cfg, path, shapes, ARCHITECTURES[arch]):
        x = dequantize(t)
        if m.rope_heads:
            x = unpermute_qk(x, m.rope_heads)
        if m.vocab and x.shape[0] < cfg.padded_vocab_size:
            x = torch.cat([x, x.new_zeros(cfg.padded_vocab_size - x.shape[0], *x.shape[1:])])
        if len(m.lmlab) == 1:
            state[m.lmlab[0]] = x
        else:  # own storage per expert, so a checkpoint can save each one
            state.update({name: x[e].clone() for e, name in enumerate(m.lmlab)})
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gave the head its own Parameter; share it again
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()


def convert_from_gguf(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a GGUF file as an lmlab checkpoint (float32 weights, written atomically) with
    its tokenizer rebuilt as `tokenizer.json`, a `tokenizer_config.json` (special tokens,
    chat template) and a `generation_config.json` (stop ids). Everything is read and
    checked before anything is written; an existing `out_dir` is replaced only when it is
    an earlier conversion and `overwrite`."""
    src = Path(src)
    if not src.is_file():
        raise UsageError(f"{src}: no such GGUF file")
    claim_output_dir(out_dir, "convert", overwrite=overwrite)
    tok, config, generation = read_gguf_tokenizer(open_gguf(src), src)
    model = load_gguf_model(src)

    def write_tokenizer(d: Path) -> None:
        tok.save(str(d / "tokenizer.json"))
        write_json(d / "tokenizer_config.json", config)
        write_json(d / "generation_config.json", generation)

    reader = open_gguf(src)
    source = {"gguf": str(src), "architecture": value(reader, "general.architecture")}
    # what an export back to GGUF writes again (a split has several llama.cpp names)
    for key, field in (("name", "general.name"), ("tokenizer_pre", "tokenizer.ggml.pre")):
        if isinstance(value(reader, field), str):
            source[key] = value(reader, field)
    extra = {"converted_from": source}
    save_checkpoint(model, out_dir, extra=extra, write_extra=write_tokenizer, kind="convert")
    return Path(out_dir)

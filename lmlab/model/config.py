"""`ModelConfig`: one dataclass describes an architecture; the model reads flags, not subclasses.

The flags span the design space of Zhao et al. §4.2 (Table 3): the family (causal, prefix,
encoder-decoder), normalization and where it sits, position encoding, activation, biases,
attention variants and mixture-of-experts. Presets (`lmlab.model.presets`) fix them per
model card; the accounting here (parameters, FLOPs, KV-cache bytes) reads the same flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from lmlab.config import STRICT, Float, Int, NonNegInt, PosFloat, PosInt
from lmlab.errors import UsageError

Family = Literal["decoder", "prefix", "encoder_decoder"]
Norm = Literal["rmsnorm", "layernorm"]
NormPosition = Literal["pre", "post", "sandwich"]
Position = Literal["rope", "learned", "sinusoidal", "alibi", "t5", "none"]
Activation = Literal["swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu"]
RopeScaling = Literal["none", "linear", "ntk"]
GATED = ("swiglu", "geglu", "geglu_tanh")


@dataclass
class ModelConfig:
    """LLaMA-style by default: pre-RMSNorm, RoPE, SwiGLU, no biases, tied embeddings."""

    __pydantic_config__ = STRICT

    preset: str | None = None  # the preset this came from; informative only
    family: Family = "decoder"
    vocab_size: Int = 4096  # in a recipe, taken from the trained tokenizer
    n_layers: PosInt = 4  # encoder layers for encoder_decoder
    n_decoder_layers: PosInt | None = None  # encoder_decoder only; None = n_layers
    decoder_start_id: NonNegInt = 0  # encoder_decoder: the first decoder input (T5: pad, 0)
    d_model: PosInt = 256
    n_heads: PosInt = 4
    n_kv_heads: PosInt | None = None  # None = n_heads (multi-head); 1 = multi-query; else GQA
    head_dim: PosInt | None = None  # None = d_model / n_heads (T5 decouples them)
    ffn_hidden: PosInt | None = None  # None = 4·d, or 8/3·d rounded to 64 when gated
    max_seq_len: PosInt = 256
    # normalization
    norm: Norm = "rmsnorm"
    norm_bias: bool | None = None  # LayerNorm bias; None = follow `bias`
    norm_eps: PosFloat = 1e-5
    norm_position: NormPosition = "pre"
    deepnorm: bool = False  # post-LN with residual x·α and init gain β (Wang et al. 2022)
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    parallel_residual: bool = False  # x + attn(n(x)) + ffn(n(x)) (GPT-J, GPT-NeoX, PaLM)
    parallel_norms: Literal[1, 2] = 2  # PaLM shares one norm; GPT-NeoX has two
    # positions
    position: Position = "rope"
    rope_theta: PosFloat = 10000.0
    rotary_fraction: PosFloat = 1.0  # share of each head's dims that RoPE rotates (NeoX: 0.25)
    rope_scaling: RopeScaling = "none"  # context extension: position interpolation or NTK
    rope_scaling_factor: PosFloat = 1.0
    learned_pos_offset: NonNegInt = 0  # OPT keeps 2 unused leading rows in its table
    rel_buckets: PosInt = 32  # T5 relative-position buckets
    rel_max_distance: PosInt = 128
    # feed-forward
    activation: Activation = "swiglu"
    bias: bool = False  # biases of every Linear in attention and FFN
    qkv_bias: bool | None = None  # None = follow `bias` (Qwen2: q/k/v only)
    n_experts: NonNegInt = 0  # > 0: mixture-of-experts FFN in every layer
    experts_top_k: PosInt = 2
    capacity_factor: PosFloat | None = None  # None = no token is ever dropped
    moe_aux_loss_coef: Float = 0.01  # weight of the load-balancing loss (Switch)
    # attention
    sliding_window: PosInt | None = None  # local attention over the last w keys
    sliding_window_every: PosInt = 1  # every k-th layer is local (GPT-3 alternates: 2)
    attn_scale: PosFloat | None = None  # None = 1/sqrt(head_dim); T5 folds it into init (1.0)
    # embeddings and initialisation
    tie_embeddings: bool = True
    # a scalar head on the final hidden state (`score`, as HF's ...ForSequenceClassification):
    # a reward model scores a sequence at its last real token
    reward_head: bool = False
    pad_vocab_multiple: PosInt = 64  # matmuls on a padded vocabulary are faster (nanoGPT)
    init_std: PosFloat = 0.02
    scaled_residual_init: bool = True  # GPT-2: residual outputs get std/sqrt(2·layers)
    small_embed_init: bool = False  # embeddings start at U(±1e-4) (small-init embedding)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None:
            gated = self.activation in GATED
            self.ffn_hidden = (
                _round_up(int(8 * self.d_model / 3), 64) if gated else 4 * self.d_model
            )
        if self.family == "encoder_decoder" and self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        self.validate()

    def validate(self) -> None:
        if self.vocab_size <= 0:
            raise UsageError(f"vocab_size must be > 0, got {self.vocab_size}")
        if self.head_dim is None:
            raise UsageError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "make it divisible or set head_dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise UsageError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.position == "rope":
            if not 0 < self.rotary_fraction <= 1:
                raise UsageError(f"rotary_fraction={self.rotary_fraction}: need 0 < f <= 1")
            if self.rotary_dim % 2 or self.rotary_dim == 0:
                raise UsageError(
                    f"RoPE rotates {self.rotary_dim} dims of each head "
                    f"(head_dim {self.head_dim} × rotary_fraction {self.rotary_fraction}); "
                    "it must be a positive even number"
                )
        if self.rope_scaling != "none" and self.position != "rope":
            raise UsageError(f"rope_scaling={self.rope_scaling} needs position: rope")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise UsageError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.n_experts and self.experts_top_k > self.n_experts:
            raise UsageError(
                f"experts_top_k={self.experts_top_k} exceeds n_experts={self.n_experts}"
            )
        if self.deepnorm and self.norm_position != "post":
            raise UsageError("deepnorm: DeepNorm is a post-LN scheme; set norm_position: post")
        if self.parallel_residual and self.norm_position != "pre":
            raise UsageError("parallel_residual needs norm_position: pre")
        if self.n_decoder_layers is not None and self.family != "encoder_decoder":
            raise UsageError("n_decoder_layers applies only to family: encoder_decoder")
        if self.family == "encoder_decoder" and self.position in ("learned", "alibi"):
            raise UsageError(
                f"family encoder_decoder supports position rope, sinusoidal, t5 or none, "
                f"not {self.position}"
            )

    # --- derived sizes -----------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction) // 2 * 2 if self.head_dim else 0

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_vocab_multiple)

    @property
    def uses_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def uses_norm_bias(self) -> bool:
        return self.norm == "layernorm" and (
            self.bias if self.norm_bias is None else self.norm_bias
        )

    @property
    def has_final_norm(self) -> bool:
        """Pre-LN (and sandwich) stacks end with a norm; post-LN outputs are already normed."""
        return self.norm_position != "post"

    def is_local(self, layer: int) -> bool:
        """Whether `layer` uses sliding-window attention (the last of every k layers)."""
        every = self.sliding_window_every
        return self.sliding_window is not None and layer % every == every - 1

    # --- accounting ----------------------------------------------------------------------

    def _norm_params(self) -> int:
        return self.d_model * (2 if self.uses_norm_bias else 1)

    def _attn_params(self) -> int:
        d, hd, h, kv = self.d_model, self.head_dim, self.n_heads, self.n_kv_heads
        w = d * h * hd * 2 + d * kv * hd * 2
        b = (h * hd + 2 * kv * hd if self.uses_qkv_bias else 0) + (d if self.bias else 0)
        return w + b

    def _ffn_params(self, active: bool = False) -> int:
        d, f = self.d_model, self.ffn_hidden
        mats = 3 if self.activation in GATED else 2
        one = mats * d * f + ((mats - 1) * f + d if self.bias else 0)
        if not self.n_experts:
            return one
        used = self.experts_top_k if active else self.n_experts
        return used * one + d * self.n_experts

    def _layer_norms(self, cross: bool = False) -> int:
        n = 1 if (self.parallel_residual and self.parallel_norms == 1) else 2
        n += 2 if self.norm_position == "sandwich" else 0
        if cross:
            n += 2 if self.norm_position == "sandwich" else 1
        return n

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters of the model as built (the padded vocabulary included).

        `embeddings=False` leaves out token and learned-position embeddings and the LM head,
        as Kaplan et al. count for scaling laws; `active=True` counts only the top-k experts
        a token passes through (a sparse model's compute-relevant size)."""
        d = self.d_model
        layer = (
            self._attn_params()
            + self._ffn_params(active)
            + self._layer_norms() * self._norm_params()
        )
        rel = self.rel_buckets * self.n_heads if self.position == "t5" else 0
        if self.family == "encoder_decoder":
            dec = (
                layer
                + self._attn_params()
                + self._norm_params() * (self._layer_norms(cross=True) - self._layer_norms())
            )
            body = self.n_layers * layer + self.n_decoder_layers * dec
            body += 2 * (self._norm_params() * self.has_final_norm + rel)
        else:
            body = self.n_layers * layer + rel
            body += self._norm_params() * (self.has_final_norm + self.embed_norm)
        if not embeddings:
            return body
        emb = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position == "learned":
            emb += (self.max_seq_len + self.learned_pos_offset) * d
        return body + emb

    def _attn_context(self, seq_len: int, layer: int) -> int:
        return min(seq_len, self.sliding_window) if self.is_local(layer) else seq_len

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """FLOPs per token: 2 per multiply-add of every weight matmul a token passes through
        (active experts and the LM head included), plus attention's QKᵀ and AV over the
        context (4·context·heads·head_dim per layer, PaLM's convention, no causal halving).
        Training is 3× forward (backward = 2× forward). For encoder_decoder, per target
        token with an encoder input of the same length (both stacks and cross-attention)."""
        t = seq_len or self.max_seq_len
        d, hd_all = self.d_model, self.n_heads * self.head_dim
        attn_w = d * hd_all * 2 + d * self.n_kv_heads * self.head_dim * 2
        mats = 3 if self.activation in GATED else 2
        ffn_w = mats * d * self.ffn_hidden
        if self.n_experts:
            ffn_w = self.experts_top_k * ffn_w + d * self.n_experts  # active experts + router
        matmul = self.n_layers * (attn_w + ffn_w) + self.padded_vocab_size * d  # + LM head
        attn = sum(4 * self._attn_context(t, i) * hd_all for i in range(self.n_layers))
        if self.family == "encoder_decoder":
            matmul += self.n_decoder_layers * (2 * attn_w + ffn_w)
            attn += self.n_decoder_layers * 8 * t * hd_all  # self + cross attention
        forward = 2 * matmul + attn
        return 3 * forward if training else forward

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes the KV cache holds per token of context (keys + values, every layer); 16-bit
        values by default. Sliding-window layers stop growing at the window, not counted."""
        layers = self.n_decoder_layers if self.family == "encoder_decoder" else self.n_layers
        return 2 * layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def describe(self) -> dict[str, str]:
        """The architecture choices in words, for `lmlab model info` and run logs."""
        norm = f"{self.norm_position}-{'DeepNorm' if self.deepnorm else self.norm}"
        if self.position == "rope":
            pos = f"RoPE (θ={self.rope_theta:g}"
            pos += f", {self.rotary_fraction:g} of each head" if self.rotary_fraction < 1 else ""
            pos += (
                f", {self.rope_scaling} ×{self.rope_scaling_factor:g}"
                if self.rope_scaling != "none"
                else ""
            )
            pos += ")"
        else:
            pos = {
                "learned": "learned absolute",
                "sinusoidal": "sinusoidal",
                "alibi": "ALiBi",
                "t5": "T5 relative buckets",
                "none": "none",
            }[self.position]
        kv = self.n_kv_heads
        attn = (
            "multi-head"
            if kv == self.n_heads
            else "multi-query"
            if kv == 1
            else f"grouped-query ({kv} KV heads)"
        )
        if self.sliding_window:
            every = (
                ""
                if self.sliding_window_every == 1
                else f" every {self.sliding_window_every} layers"
            )
            attn += f", sliding window {self.sliding_window}{every}"
        ffn = f"{self.activation}, hidden {self.ffn_hidden}"
        if self.n_experts:
            ffn += f", {self.n_experts} experts top-{self.experts_top_k}"
            if self.capacity_factor:
                ffn += f" capacity ×{self.capacity_factor:g}"
        layers = str(self.n_layers)
        if self.family == "encoder_decoder":
            layers = f"{self.n_layers} encoder + {self.n_decoder_layers} decoder"
        return {
            "preset": self.preset or "-",
            "family": self.family,
            "layers": layers,
            "width": f"{self.d_model} ({self.n_heads} heads × {self.head_dim})",
            "normalization": norm
            + (" + embedding norm" if self.embed_norm else "")
            + (", parallel" if self.parallel_residual else ""),
            "positions": pos,
            "attention": attn,
            "feed-forward": ffn,
            "biases": "yes" if self.bias else ("q/k/v only" if self.uses_qkv_bias else "no"),
            "embeddings": ("tied" if self.tie_embeddings else "untied")
            + f", vocabulary {self.vocab_size} padded to {self.padded_vocab_size}",
            "context": str(self.max_seq_len),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(
                f"model config: unknown keys {sorted(unknown)}; allowed {sorted(known)}"
            )
        try:  # validated as a recipe would be: types, literals and ranges
            return TypeAdapter(cls).validate_python(d)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if not key:  # a cross-field check in validate()
                raise UsageError(f"model: {msg}") from None
            raise UsageError(f"model.{key}: {msg} (got {err.get('input')!r})") from None


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def deepnorm_constants(n_layers: int, n_decoder_layers: int | None = None) -> dict[str, tuple]:
    """DeepNorm's (α, β) per stack (Wang et al. 2022, Table 1): decoder-only
    α=(2N)^¼, β=(8N)^-¼; encoder-decoder encoder α=0.81(N⁴M)^(1/16), β=0.87(N⁴M)^(-1/16),
    decoder α=(3M)^¼, β=(12M)^-¼."""
    if n_decoder_layers is None:
        n = n_layers
        return {"decoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    n, m = n_layers, n_decoder_layers
    return {
        "encoder": (0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
        "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
    }

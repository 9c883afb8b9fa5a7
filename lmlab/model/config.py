"""`ModelConfig`: one dataclass describes an architecture; the model reads flags, not subclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lmlab.config import STRICT, PosFloat, PosInt
from lmlab.errors import UsageError


@dataclass
class ModelConfig:
    """LLaMA-style by default: pre-RMSNorm, RoPE, SwiGLU, no biases, tied embeddings."""

    __pydantic_config__ = STRICT

    vocab_size: int = 4096  # in a recipe, taken from the trained tokenizer
    n_layers: PosInt = 4
    d_model: PosInt = 256
    n_heads: PosInt = 4
    n_kv_heads: PosInt | None = None  # None = n_heads (multi-head); fewer = grouped-query
    ffn_hidden: PosInt | None = None  # None = 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: PosInt = 256
    rope_theta: PosFloat = 10000.0
    norm_eps: PosFloat = 1e-5
    tie_embeddings: bool = True
    pad_vocab_multiple: PosInt = 64  # matmuls on a padded vocabulary are faster (nanoGPT)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = _round_up(int(8 * self.d_model / 3), 64)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise UsageError(
                f"head dimension d_model/n_heads={self.head_dim} must be even for RoPE"
            )
        if self.n_heads % self.n_kv_heads:
            raise UsageError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_vocab_multiple)

    def num_params(self, embeddings: bool = True) -> int:
        d, f, hd = self.d_model, self.ffn_hidden, self.head_dim
        attn = d * (self.n_heads * hd) * 2 + d * (self.n_kv_heads * hd) * 2
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + d + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (matmuls incl. the LM head) + attention scores (PaLM)."""
        t = seq_len or self.max_seq_len
        n = self.num_params(embeddings=False) + self.padded_vocab_size * self.d_model
        return 6 * n + 12 * self.n_layers * self.d_model * t

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
        return cls(**d)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m

"""Decoder-only Transformer (Zhao et al. §4.2) and its checkpoint format."""

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]

"""Inference: a KV-cache generation engine and decoding strategies (Zhao et al. §4.2.4)."""

from lmlab.infer.generate import GenerationConfig, generate

__all__ = ["GenerationConfig", "generate"]

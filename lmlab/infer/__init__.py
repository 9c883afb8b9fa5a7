"""Inference: a KV-cache generation engine and decoding strategies (Zhao et al. §4.2.4)."""

from lmlab.infer.generate import Completion, generate, generate_batch, stream
from lmlab.infer.sampling import GenerationConfig

__all__ = ["Completion", "GenerationConfig", "generate", "generate_batch", "stream"]

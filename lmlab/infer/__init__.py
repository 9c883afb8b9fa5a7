"""Inference: a KV-cache generation engine and decoding strategies (Zhao et al. §4.2.4)."""

from lmlab.infer.generate import Completion, generate, generate_batch, stream
from lmlab.infer.paged import PagedKVCache
from lmlab.infer.sampling import GenerationConfig
from lmlab.infer.scheduler import Event, Scheduler

__all__ = [
    "Completion",
    "Event",
    "GenerationConfig",
    "PagedKVCache",
    "Scheduler",
    "generate",
    "generate_batch",
    "stream",
]

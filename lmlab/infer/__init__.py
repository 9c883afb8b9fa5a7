"""Inference (Zhao et al. §4.2.4 decoding, §5.4 quantization): using a model.

- `options.py`: `GenerationConfig`, every decoding option with its default and help text
  (the command line builds its flags from it).
- `engine.py`: the core every strategy steps: `Runner` (a model, its KV cache, padding
  mask), `Completion`, prompt fitting, stop strings.
- `sampling.py`: penalties, warpers, the pick, log-probs.
- `generate.py`: the batched decode loop, contrastive decoding, `stream`, `generate`,
  `generate_batch`; `beam.py` beam search; `speculative.py` speculative decoding.
- `session.py`: loading a model for generation and the chat loop (`lmlab chat`).
- `paged.py`, `scheduler.py`: the paged KV cache and continuous batching.
- `quantize.py` `lmlab quantize` (the layer format is `lmlab.model.quant`), `gguf.py` GGUF
  export and the llama.cpp bridge, `bench.py` `lmlab bench infer`.

The names below load on first use, so that the command line, which reads `options.py` at
every start, does not pay for importing torch. `lmlab.infer.generate` is the module (the
function is `lmlab.infer.generate.generate`): importing a submodule binds its name on the
package, so a lazy package cannot also export a function of that name.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmlab.infer.engine import Completion
    from lmlab.infer.generate import generate_batch, stream
    from lmlab.infer.options import GenerationConfig
    from lmlab.infer.paged import PagedKVCache
    from lmlab.infer.scheduler import Event, Scheduler

_HOME = {
    "Completion": "engine",
    "Event": "scheduler",
    "GenerationConfig": "options",
    "PagedKVCache": "paged",
    "Scheduler": "scheduler",
    "generate_batch": "generate",
    "stream": "generate",
}

__all__ = [
    "Completion",
    "Event",
    "GenerationConfig",
    "PagedKVCache",
    "Scheduler",
    "generate_batch",
    "stream",
]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'lmlab.infer' has no attribute {name!r}")
    return getattr(import_module(f"lmlab.infer.{_HOME[name]}"), name)

"""Models (Zhao et al. §4.2) and the forms they take on disk.

`ModelConfig` describes an architecture with flags and `presets` names the survey's model
cards; `transformer` builds the decoders (causal and prefix) with their KV cache and
`encdec` the encoder-decoder; `precision` is the autocast rule every forward shares, and
`scoring` the one windowed-loss scorer (loss, perplexity, bits per byte) that training
validation, evaluation, comparisons, sweeps and the perplexity filter use.
On disk: `checkpoint` (the lmlab format), `quant` (quantized linears and their
checkpoints), `hf` (Hugging Face conversion); `loading` is the one loader, whose readers
live in `formats`. `info` is the accounting behind `lmlab model info`.
"""

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]

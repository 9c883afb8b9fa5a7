"""Language-modelling metrics: loss (nats/token), perplexity and bits per byte.

Bits per byte divides the total negative log-likelihood by the UTF-8 bytes the tokens
stand for, so models with different tokenizers can be compared (The Pile, Gao et al.).
The windows and the scoring are the model layer's (`lmlab.model.scoring.stream_scores`),
shared with the quantization check; the tokenizer gives the bytes.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from lmlab.model.scoring import stream_scores, token_byte_lengths


def lm_metrics(
    model,
    tokens: np.ndarray,
    tok: Tokenizer,
    seq_len: int,
    max_tokens: int,
    precision: str = "fp32",
    batch_size: int = 8,
    label: str = "",
) -> dict:
    """Score the first `max_tokens` tokens in consecutive windows of `seq_len` targets."""
    lengths = token_byte_lengths(tok, tok.get_vocab_size())
    s = stream_scores(model, tokens, seq_len, max_tokens, lengths, precision, batch_size, label)
    return s.summary()

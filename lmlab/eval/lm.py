"""Language-modelling metrics: loss (nats/token), perplexity and bits per byte.

Bits per byte divides the total negative log-likelihood by the UTF-8 bytes the tokens
stand for, so models with different tokenizers can be compared (The Pile, Gao et al.).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.console import progress
from lmlab.model.precision import autocast


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    """Bytes each token id decodes to. In byte-level BPE one character of a token's string
    stands for exactly one byte; special tokens stand for none."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    for token, i in tok.get_vocab().items():
        if i < vocab_size and token not in special:
            lengths[i] = len(token)
    return lengths


@torch.no_grad()
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
    """Score the first `max_tokens` tokens in non-overlapping windows of `seq_len`."""
    n = min(len(tokens) - 1, max_tokens)
    windows = n // seq_len
    if windows == 0:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, have {len(tokens)}")
    byte_len = token_byte_lengths(tok, tok.get_vocab_size())
    nll, count, nbytes = 0.0, 0, 0
    model.eval()
    with progress(f"perplexity {label}".strip(), total=windows) as bar:
        for start in range(0, windows, batch_size):
            rows = range(start, min(start + batch_size, windows))
            arr = np.stack([tokens[r * seq_len : r * seq_len + seq_len + 1] for r in rows])
            t = torch.from_numpy(arr.astype(np.int64))
            x, y = t[:, :-1], t[:, 1:]
            with autocast(precision):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="sum"
            )
            nll += loss.item()
            count += y.numel()
            nbytes += int(byte_len[y.numpy()].sum())
            bar.update(advance=len(rows))
    loss = nll / count
    return {
        "tokens": count,
        "bytes": nbytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll / (math.log(2) * max(nbytes, 1)),
    }

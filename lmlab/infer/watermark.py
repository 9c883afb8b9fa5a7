"""The KGW watermark as a logits processor (Kirchenbauer et al. 2023, "A Watermark for Large
Language Models"): at each step a pseudo-random green list of `gamma * V` tokens, seeded by
the context, gets `delta` added to its logits. Detection (`lmlab.trust.watermark`) counts
green tokens with the same green lists.

The seeding is transformers' (`WatermarkLogitsProcessor`), bit for bit on the CPU, so text
watermarked by either is detected by the other:

- `lefthash`: the seed is `hashing_key * previous token`; the green list is the first
  `int(V * gamma)` entries of `torch.randperm(V)` drawn from a CPU generator with that seed.
- `selfhash`: the seed of a candidate token t is min over the last `context_width` tokens
  (t included) of `key * table[x] * table[t]` (int64 products, wrapping as torch's do),
  with `table` a fixed permutation of 1,000,003 numbers drawn from the key; a candidate is
  green when it is in its own green list. Only the 40 likeliest candidates are tried (as in
  the paper's reference code), which keeps a step at 40 permutations.

Green lists are drawn on the CPU whatever the model's device: a CUDA generator draws
another permutation, and the detector would need the same device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from lmlab.infer.options import WatermarkConfig

__all__ = ["WatermarkConfig", "green_ids", "seed_of", "watermark_logits"]

TABLE_SIZE = 1_000_003  # the fixed table of selfhash (a prime, as the reference code)
SELFHASH_CANDIDATES = 40  # candidates tried per step under selfhash
_SEED_MOD = 2**64 - 1


@lru_cache(maxsize=4)
def _table(key: int) -> torch.Tensor:
    """The key's fixed permutation for selfhash (drawn once per key: it takes ~20 ms)."""
    return torch.randperm(TABLE_SIZE, generator=torch.Generator().manual_seed(key))


def seed_of(context: Sequence[int], cfg: WatermarkConfig) -> int:
    """The generator seed for the green list that `context` selects: its last token under
    lefthash; under selfhash its last `context_width` tokens, the last being the candidate."""
    if cfg.seeding_scheme == "selfhash":
        window = torch.tensor(list(context[-cfg.context_width :]), dtype=torch.long)
        table = _table(cfg.hashing_key)
        a = table[window % TABLE_SIZE] + 1
        b = table[window[-1] % TABLE_SIZE] + 1
        seed = int((cfg.hashing_key * a * b).min())
    else:
        seed = cfg.hashing_key * int(context[-1])
    return seed % _SEED_MOD


@lru_cache(maxsize=512)
def _green(vocab_size: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=gen)[:size]


def green_ids(context: Sequence[int], vocab_size: int, cfg: WatermarkConfig) -> torch.Tensor:
    """The green token ids [int(V * gamma)] that `context` seeds (see `seed_of`), in the
    order of the permutation they come from; do not modify the tensor (it is cached)."""
    return _green(vocab_size, int(vocab_size * cfg.gamma), seed_of(context, cfg))


def is_green(context: Sequence[int], target: int, vocab_size: int, cfg: WatermarkConfig) -> bool:
    return bool((green_ids(context, vocab_size, cfg) == target).any())


def watermark_logits(
    logits: torch.Tensor, seqs: Sequence[Sequence[int]], cfg: WatermarkConfig
) -> torch.Tensor:
    """`logits` [B, V] with `delta` added to each row's green tokens, row r's context being
    `seqs[r]` (prompt and output so far). A row with fewer than `context_width` tokens is
    left as it is, as transformers does."""
    out = logits.clone()
    vocab = logits.shape[-1]
    for r, seq in enumerate(seqs):
        if len(seq) < cfg.context_width or len(seq) == 0:
            continue
        if cfg.seeding_scheme == "lefthash":
            ids = green_ids(seq, vocab, cfg).to(out.device)
        else:  # a candidate is green in the list it seeds itself
            order = logits[r].sort(dim=-1, descending=True).indices[:SELFHASH_CANDIDATES]
            prefix = list(seq[-(cfg.context_width - 1) :]) if cfg.context_width > 1 else []
            hits = [t for t in order.tolist() if is_green([*prefix, t], t, vocab, cfg)]
            if not hits:
                continue
            ids = torch.tensor(hits, device=out.device)
        out[r, ids] += cfg.delta
    return out

"""A language model's loss on token windows: the one scorer that validation, evaluation,
comparisons, scaling sweeps, quantization checks and perplexity filters share.

A row is a pair (inputs, targets) of equal length: the model reads `inputs` and is scored
at each position on the token `targets` holds there (`IGNORE`: not scored). Callers only
frame their rows: `stream_windows` cuts a token stream into windows, non-overlapping or
overlapping by k tokens, with an optional shorter last window; ragged rows are padded.
`score` runs the model on batches of rows under `autocast(precision)` and returns the
summed negative log-likelihood, the token count and, on request, the same per row;
`Scores` turns them into loss, perplexity and bits per byte. `stream_scores` is the
framing evaluation and the quantization check share (the first tokens of a split in
consecutive windows, with a progress bar).

The cross-entropy is taken in float32 whatever the forward's precision, and summed in a
fixed order: `token_loss_sum` over a whole batch (the training loop's per-batch core), or
per row (`per_row`) where rows are compared or texts scored one by one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmlab.console import progress
from lmlab.model.precision import autocast

IGNORE = -100  # a target that is not scored (PyTorch's `ignore_index`)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over positions whose target is not `IGNORE` (float32 softmax)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every position [B, T] (float32 softmax; 0 where not scored)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)


def logits_tensor(out) -> torch.Tensor:
    """The logits of an lmlab model (a tensor) or of a Hugging Face one (`.logits`)."""
    return out.logits if hasattr(out, "logits") else out


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for, so that over any text the lengths of its
    tokens sum to the text's length in bytes, whatever the tokenizer's kind.

    In a byte-level tokenizer (its decoder maps characters back to bytes: lmlab's BPE,
    WordPiece and Unigram, GPT-2's) each character of a piece is one byte. Otherwise a
    piece is its own UTF-8, with SentencePiece's "▁" the one space it stands for and a
    byte-fallback piece `<0xNN>` one byte. A continuation prefix (WordPiece's "##") stands
    for nothing; special tokens stand for none, other added tokens for their text."""
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    prefix = model.get("continuing_subword_prefix") or ""
    byte_level = "ByteLevel" in _types(spec.get("decoder"))
    byte_fallback = bool(model.get("byte_fallback"))
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token, i in tok.get_vocab().items():
        if i >= vocab_size:
            continue
        if token in added:
            lengths[i] = 0 if added[token] else len(token.encode())
            continue
        if prefix and token.startswith(prefix) and len(token) > len(prefix):
            token = token[len(prefix) :]
        if byte_level:
            lengths[i] = len(token)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[i] = 1
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode())
    return lengths


def _types(node: dict | None) -> set[str]:
    """The `type` of a tokenizer.json component and of every part of a Sequence."""
    if not node:
        return set()
    parts = node.get("decoders") or node.get("pretokenizers") or []
    return {node.get("type", ""), *(t for p in parts for t in _types(p))}


def stream_windows(
    tokens: np.ndarray,
    length: int,
    overlap: int = 0,
    limit: int | None = None,
    ragged: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of windows of `length` tokens from the start of `tokens`, each starting
    `length - overlap` after the one before: inputs window[:-1], targets window[1:].

    With overlap 0 the first token of every window but the first is never a target; with
    overlap 1 every token but the first is a target exactly once; with k > 1 the first
    k − 1 targets of each later window are context only (`IGNORE`), so again none is scored
    twice. Only whole windows, the first `limit` of them, unless `ragged` adds a shorter
    last one that covers the rest. Windows are views: memory stays one batch's worth."""
    if not 0 <= overlap < length:
        raise ValueError(f"overlap {overlap} must be in [0, {length})")
    n, step = len(tokens), length - overlap
    stop = n - max(overlap, 1) if ragged else n - length + 1
    for i, s in enumerate(range(0, max(stop, 0), step)):
        if limit is not None and i >= limit:
            return
        w = np.asarray(tokens[s : s + length], dtype=np.int64)
        targets = w[1:]
        if i and overlap > 1:
            targets = targets.copy()
            targets[: overlap - 1] = IGNORE
        yield w[:-1], targets


@dataclass
class Scores:
    """Summed negative log-likelihood (nats) of the scored tokens, their count and the
    UTF-8 bytes they stand for (when byte lengths were given); per row too with `per_row`."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    row_nll: list[float] = field(default_factory=list)  # float32 sums, as computed
    row_tokens: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """Mean loss per token (nats)."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Bits per UTF-8 byte: comparable across tokenizers (The Pile, Gao et al.)."""
        return self.nll / (math.log(2) * max(self.bytes, 1))

    def summary(self) -> dict:
        """tokens, bytes, loss, perplexity and bits_per_byte, as evaluation reports them."""
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }

    def row_means(self) -> list[float]:
        """Mean loss of each row, divided in float32 as its sum was taken."""
        sums = np.asarray(self.row_nll, dtype=np.float32)
        return (sums / np.asarray(self.row_tokens, dtype=np.float32)).tolist()


def _batches(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stack(batch: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a batch, ragged rows padded to the longest."""
    width = max(len(x) for x, _ in batch)
    if all(len(x) == width for x, _ in batch):
        x = np.stack([np.asarray(x, dtype=np.int64) for x, _ in batch])
        y = np.stack([np.asarray(y, dtype=np.int64) for _, y in batch])
    else:
        x = np.full((len(batch), width), pad_id, dtype=np.int64)
        y = np.full((len(batch), width), IGNORE, dtype=np.int64)
        for r, (xi, yi) in enumerate(batch):
            x[r, : len(xi)], y[r, : len(yi)] = xi, yi
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    rows: Iterable[tuple[np.ndarray, np.ndarray]],
    batch_size: int = 8,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    per_row: bool = False,
    byte_lengths: np.ndarray | None = None,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Scores:
    """Score `model` on `rows` (inputs, targets) in batches of `batch_size`, in eval mode.

    `nll` sums each batch's `token_loss_sum`; with `per_row` it sums each row's losses
    instead (float32, up to its last scored position) and keeps them in `row_nll`: rows
    are then independent of how they were batched. `on_batch(rows)` reports progress."""
    was_training = model.training
    model.eval()
    out = Scores()
    for batch in _batches(rows, batch_size):
        x, y = _stack(batch, pad_id)
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = logits_tensor(model(x))
        if per_row:
            losses = token_losses(logits, y)
            for r, (_, yi) in enumerate(batch):
                scored = np.flatnonzero(np.asarray(yi) != IGNORE)
                end = int(scored[-1]) + 1 if len(scored) else 0
                out.row_nll.append(float(losses[r, :end].sum()))
                out.row_tokens.append(len(scored))
                out.nll += out.row_nll[-1]
                out.tokens += len(scored)
        else:
            out.nll += float(token_loss_sum(logits, y))
            out.tokens += int((y != IGNORE).sum())
        if byte_lengths is not None:
            yc = y.cpu()
            out.bytes += int(byte_lengths[yc[yc != IGNORE].numpy()].sum())
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return out


def stream_scores(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    max_tokens: int,
    byte_lengths: np.ndarray | None = None,
    precision: str = "fp32",
    batch_size: int = 8,
    label: str = "",
) -> Scores:
    """The first `max_tokens` tokens of a split in consecutive windows of `seq_len` targets
    (each window's first token is the previous one's last target), with a progress bar:
    how evaluation and the quantization check measure perplexity, so theirs agree."""
    windows = min(len(tokens) - 1, max_tokens) // seq_len
    if windows == 0:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, have {len(tokens)}")
    rows = stream_windows(tokens[: max_tokens + 1], seq_len + 1, overlap=1)
    with progress(f"perplexity {label}".strip(), total=windows) as bar:
        return score(
            model,
            rows,
            batch_size,
            precision,
            byte_lengths=byte_lengths,
            on_batch=lambda n: bar.update(advance=n),
        )

"""One training batch, whatever the objective, and the loss of a model on it.

Every pre-training objective (causal, prefix LM, span corruption; lmlab.train.objectives)
and SFT produce a `Batch`; `logits_of` feeds it to any model family, so the loop never
branches on the objective. What the loop minimises is the loss seam: an objective,
a `LossFn` `(model, batch) -> LossOut`, by default `token_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from lmlab.model.scoring import IGNORE, token_loss_sum
from lmlab.model.transformer import document_mask
from lmlab.train.distributed import unwrap


@dataclass
class Batch:
    """`targets[b, t]` is the token to predict at position t (`IGNORE`: no loss there).

    - `doc_ids` [B, T]: packed documents; attention stays inside a document and positions
      restart at each document's first token.
    - `prefix_len` [B]: prefix LM; the first `prefix_len` tokens see each other both ways
      (prefix-decoder models) and carry no loss.
    - `decoder_inputs` [B, S]: encoder-decoder; `inputs` go to the encoder, `targets` align
      with `decoder_inputs`.
    - `ref_logps` [B] or [B, T]: a frozen reference model's log-probs of each row's
      targets, summed (DPO, computed once before training) or per token (GRPO's KL).
    - `extras`: other per-row tensors an objective needs, by name (GRPO's advantages).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    decoder_inputs: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None

    def _map(self, fn) -> Batch:
        """The batch with `fn` applied to every tensor (those in `extras` too)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            elif v is not None:
                out[f.name] = fn(v)
        return replace(self, **out)

    def rows(self, sl: slice) -> Batch:
        """The same batch restricted to rows `sl` (a data-parallel rank's share)."""
        return self._map(lambda t: t[sl])

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def as_batch(b: Batch | tuple[torch.Tensor, torch.Tensor]) -> Batch:
    """Accept the plain `(inputs, targets)` pair too (SFT and user code use it)."""
    return b if isinstance(b, Batch) else Batch(b[0], b[1])


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its own document: 0 at every document start."""
    t = doc_ids.shape[1]
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def logits_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Run any model family on a batch (DDP/FSDP wrappers pass the keywords through)."""
    if batch.decoder_inputs is not None:
        return model(batch.inputs, batch.decoder_inputs)
    kwargs = {}
    if batch.doc_ids is not None:
        kwargs["attention_mask"] = document_mask(batch.doc_ids)
        kwargs["position_ids"] = doc_positions(batch.doc_ids)
    if batch.prefix_len is not None:
        kwargs["prefix_len"] = batch.prefix_len
    return model(batch.inputs, **kwargs)


@dataclass
class LossOut:
    """What an objective gives the loop for one micro-batch.

    `loss_sum` is summed over the micro-batch; the loop divides the step's sum (over
    micro-batches and data-parallel ranks) by the step's `count` (a tensor or a number)
    and logs that as `loss`. Each of `metrics` is summed the same way and logged divided
    by the same count. `aux_loss`, if any, is added to every micro-batch's normalised
    loss as it is and never logged (a mixture of experts' load-balancing loss)."""

    loss_sum: torch.Tensor
    count: torch.Tensor | float
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None


# The loss seam: an objective scores a model on a batch (training, and validation).
LossFn = Callable[[torch.nn.Module, Batch], LossOut]


def aux_loss_of(model: torch.nn.Module) -> torch.Tensor | None:
    """A mixture-of-experts model's weighted load-balancing loss from its last forward
    (None for other models), through DDP and torch.compile wrappers."""
    inner = unwrap(model)
    return inner.aux_loss() if hasattr(inner, "aux_loss") else None


def token_cross_entropy(model: torch.nn.Module, batch: Batch) -> LossOut:
    """The default objective: next-token cross-entropy summed over the targets that are
    not `IGNORE`, per target, plus the model's load-balancing loss (if it has experts)."""
    logits = logits_of(model, batch)
    return LossOut(
        token_loss_sum(logits, batch.targets),
        (batch.targets != IGNORE).sum(),
        aux_loss=aux_loss_of(model),
    )

"""One training batch, whatever the objective, and the loss of a model on it.

Every objective (causal, prefix LM, span corruption; lmlab.train.objectives) produces a
`Batch`; `forward_loss` feeds it to any model family, so the loop never branches on the
objective.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from lmlab.model.transformer import document_mask


@dataclass
class Batch:
    """`targets[b, t]` is the token to predict at position t (-100: no loss there).

    - `doc_ids` [B, T]: packed documents; attention stays inside a document and positions
      restart at each document's first token.
    - `prefix_len` [B]: prefix LM; the first `prefix_len` tokens see each other both ways
      (prefix-decoder models) and carry no loss.
    - `decoder_inputs` [B, S]: encoder-decoder; `inputs` go to the encoder, `targets` align
      with `decoder_inputs`.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    decoder_inputs: torch.Tensor | None = None

    def rows(self, sl: slice) -> Batch:
        """The same batch restricted to rows `sl` (a data-parallel rank's share)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[sl]
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=True)
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )

    @property
    def n_targets(self) -> int:
        return int((self.targets != -100).sum())


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


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over positions whose target is not -100 (float32 softmax)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )

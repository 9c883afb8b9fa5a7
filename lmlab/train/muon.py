"""Muon for the hidden matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024; modded-nanogpt, nanochat) replaces each 2-D hidden weight's
momentum update by its nearest semi-orthogonal matrix (Newton–Schulz iterations, here
`torch.optim.Muon`), so every direction of the update moves at the same rate. It is
meant only for the matrices inside the transformer blocks: embeddings, the output head,
norms/gains and biases keep AdamW.

The loop, the fp16 GradScaler and `torch.distributed.checkpoint`'s name-keyed optimizer
state all expect one `Optimizer` with one `param_groups` and one `state`, so `MuonAdamW`
is that optimizer: its groups carry `kind` ("muon" or "adamw") and `lr_scale` (the
group's peak learning rate over the schedule's, applied by the loop), and `step` hands
the groups of each kind to a `torch.optim.Muon` / `torch.optim.AdamW` that share those
very group dicts and the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HIDDEN_BLOCK = "Block"  # the transformer block class whose matrices Muon trains


def hidden_matrices(model: torch.nn.Module) -> set[int]:
    """`id`s of the 2-D parameters inside transformer blocks (attention and MLP
    projections): the ones Muon trains. Embeddings and the head live outside blocks."""
    ids: set[int] = set()
    for m in model.modules():
        if type(m).__name__ == HIDDEN_BLOCK:
            ids.update(id(p) for p in m.parameters() if p.dim() == 2)
    return ids


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `muon_groups`, AdamW on `adamw_groups`, behind one optimizer interface
    (step, zero_grad, param_groups, state_dict/load_state_dict)."""

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        *,
        momentum: float,
        adjust_lr_fn: str,
        betas: tuple[float, float],
        fused: bool,
    ) -> None:
        for g in muon_groups:
            g["kind"] = "muon"
        for g in adamw_groups:
            g["kind"] = "adamw"
        self._muon = torch.optim.Muon(muon_groups, momentum=momentum, adjust_lr_fn=adjust_lr_fn)
        self._adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused)
        # the same group dicts, so a learning rate set here is the one the inner ones use
        super().__init__([*self._muon.param_groups, *self._adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after
        `load_state_dict`, which replaces both)."""
        for inner, kind in ((self._muon, "muon"), (self._adamw, "adamw")):
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss

"""Preference-optimisation losses (Zhao et al. §5.2, alignment tuning): what RLHF's reward
model learns, and the RL-free methods that optimise the policy on preferences directly.

Every function works on log-probabilities already summed (or averaged) over each
completion's tokens, so the same loss serves any model and any batching; the objectives
that plug these into the training loop's loss seam compute those sums. The definitions
follow TRL 1.x, which the tests compare against on the same inputs:

- `dpo_loss`: DPO (Rafailov et al. 2023, `sigmoid`; with `label_smoothing` > 0 it is
  conservative DPO, cDPO), robust DPO (`robust`, Chowdhury et al. 2024), SLiC's `hinge`,
  and IPO (`ipo`, Azar et al. 2023). IPO follows TRL: the log-ratios are divided by each
  completion's length before the squared loss (TRL confirmed this form with the IPO
  authors; the paper writes sums). Without lengths it is the paper's unnormalised form.
- `simpo_loss` (Meng et al. 2024): reference-free, length-averaged log-probs, a margin.
- `orpo_odds_ratio` (Hong et al. 2024): the odds-ratio term added to the SFT loss.
- `kto_loss` (Ethayarajh et al. 2024): unpaired desirable/undesirable completions against
  a batch KL estimate.
- `reward_model_loss`: Bradley–Terry on scalar scores, an optional margin per pair and
  the centring term of TRL's `center_rewards_coefficient`.
- `group_advantages`, `k3_kl` and `grpo_loss` (Shao et al. 2024): GRPO's group-normalised
  advantages, the k3 estimate of KL to the reference, the clipped surrogate with the
  `grpo`, `bnpo`, `dr_grpo` and `dapo` normalisations.

Rewards returned for logging are β times the policy/reference log-ratios (detached), as
TRL logs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import UsageError

DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class PairLoss:
    """Per-pair losses and the implicit rewards of each side (for logging)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """The fraction of pairs whose chosen side has the larger reward."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()

    @property
    def margin(self) -> torch.Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PairLoss:
    """The DPO family on summed completion log-probs [B] of the policy and the reference."""
    if loss_type not in DPO_LOSSES:
        raise UsageError(f"dpo: loss_type {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    if beta <= 0:
        raise UsageError(f"dpo: beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise UsageError(f"dpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    delta = chosen - rejected
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":  # unbiased under label noise eps
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: tau = beta; per-token log-ratios when the lengths are given
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise UsageError("ipo: give both completion lengths or neither")
        if chosen_lengths is not None:
            chosen = chosen / chosen_lengths.clamp(min=1)
            rejected = rejected / rejected_lengths.clamp(min=1)
        losses = ((chosen - rejected) - 1 / (2 * beta)) ** 2
    return PairLoss(
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


def simpo_loss(
    chosen_avg: torch.Tensor,
    rejected_avg: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """SimPO on the policy's *average* per-token log-probs [B]: no reference model; the
    target margin `gamma` is in reward units (TRL's `simpo_gamma`)."""
    if beta <= 0:
        raise UsageError(f"simpo: beta must be > 0, got {beta}")
    logits = (chosen_avg - rejected_avg) - gamma / beta
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return PairLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_odds_ratio(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float = 0.1
) -> PairLoss:
    """ORPO's odds-ratio term on average per-token log-probs [B] (Eqs. 4 and 7): losses are
    -beta · log sigmoid(log odds(chosen) - log odds(rejected)); ORPO minimises the SFT loss
    on the chosen side plus their mean."""
    c, r = chosen_avg.float(), rejected_avg.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    losses = -beta * F.logsigmoid(log_odds)
    return PairLoss(losses, beta * c.detach(), beta * r.detach())


def kto_kl(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch KL estimate from completions paired with prompts
    they do not answer, clamped at 0 and detached."""
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO on unpaired completions: summed log-probs [N] of policy and reference, a bool
    mask of the desirable ones, and the batch KL. Returns the per-completion losses, the
    desirable ones first (TRL's order)."""
    ratio = policy - ref
    good, bad = ratio[desirable], ratio[~desirable]
    return torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad))),
        )
    )


def reward_model_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley–Terry: -log sigmoid(r_chosen - r_rejected - margin), averaged; with a
    centring coefficient, plus its multiple of mean((r_chosen + r_rejected)^2), which keeps
    the scores near zero (their offset is otherwise free)."""
    diff = chosen - rejected - (0 if margin is None else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's (or
    the batch's) Bessel-corrected standard deviation + 1e-4, or not scaled (`none`, as
    Dr. GRPO). `rewards` are [prompts · group_size], a prompt's samples together."""
    if group_size < 2 or rewards.numel() % group_size:
        raise UsageError(
            f"grpo: {rewards.numel()} rewards do not form groups of {group_size} (>= 2)"
        )
    if scale not in ("group", "batch", "none"):
        raise UsageError(f"grpo: scale_rewards must be group, batch or none, got {scale!r}")
    groups = rewards.view(-1, group_size)
    adv = (groups - groups.mean(1, keepdim=True)).reshape(-1)
    if scale == "group":
        adv = adv / (groups.std(1, keepdim=True).expand_as(groups).reshape(-1) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy ‖ reference) per token: exp(d) - d - 1 with
    d = ref - policy; unbiased, and never negative."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """GRPO's clipped surrogate on per-token log-probs [B, T] (mask: completion tokens),
    with a k3 KL penalty when `beta` > 0. Normalisations: `grpo` averages each sequence
    then the batch (longer answers weigh less per token), `bnpo` and `dapo` average all
    tokens of the batch, `dr_grpo` divides by B · max_completion_length (no length bias)."""
    if loss_type not in GRPO_LOSSES:
        raise UsageError(f"grpo: loss_type {loss_type!r} is not one of {', '.join(GRPO_LOSSES)}")
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if beta:
        if ref_logps is None:
            raise UsageError("grpo: beta > 0 needs the reference log-probs")
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise UsageError("dr_grpo: needs max_completion_length")
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)

"""PPO-RLHF (Ouyang et al. 2022, InstructGPT; Zhao et al. §5.2) on the training loop's
loss seam: the policy samples an answer per prompt, a reward model (or a verifier)
scores it, a KL penalty to the frozen starting model is paid per token, and generalised
advantage estimation (GAE) with a learned value turns the rewards into advantages for
PPO's clipped objective.

The value head is a scalar `score` on the policy's own trunk (`ModelConfig.reward_head`,
zero-initialised), so one forward gives the logits and every position's value; the
output checkpoint keeps it (generation ignores it). Rollouts are made inside the loop's
`get_batch` by the policy as it is at that step, seeded by step; with `ppo_epochs` > 1
the same rollout serves that many consecutive steps (the ratio then moves away from 1
and the clipping acts), and a run resumed inside such a group regenerates its rollout.
The KL coefficient is fixed (an adaptive controller would need its state in the
checkpoint).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmlab.adapt.dpo import token_logps
from lmlab.adapt.grpo import (
    before_after,
    completion_batch,
    heldout_scores,
    load_reward_model,
    reward_model_scores,
    rewards_for,
    sample,
    task_items,
)
from lmlab.adapt.reward import with_reward_head
from lmlab.config import STRICT, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.eval.synthetic import TASKS, Item, check_task
from lmlab.infer.options import GenerationConfig
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.tokenizer.chat import stop_ids_of
from lmlab.train.batch import Batch, LossOut
from lmlab.train.loop import TrainConfig, train
from lmlab.utils import claim_output_dir, mark_output


@dataclass
class PPOConfig:
    """Defaults as TRL's PPO where it has one (kl_coef 0.05, gamma 1, lambda 0.95, clip
    ranges 0.2, vf_coef 0.1); `ppo_epochs` 1 keeps resume exact."""

    __pydantic_config__ = STRICT

    task: Literal[TASKS] = "addition"  # type: ignore[valid-type]
    difficulty: PosInt = 1
    prompts: PosInt = 256
    heldout: NonNegInt = 32
    max_completion: PosInt = 32
    temperature: PosFloat = 1.0
    reward_model: str | None = None  # None: the task's verifier
    kl_coef: NonNegFloat = 0.05  # the fixed coefficient, or the adaptive one's start
    # adaptive KL (Ziegler et al. 2019): the coefficient follows the KL toward this target
    # (nats per sequence), at a rate set by `kl_horizon` sequences; None: fixed
    kl_target: PosFloat | None = None
    kl_horizon: PosInt = 10_000
    gamma: Fraction = 1.0
    lam: Fraction = 0.95
    cliprange: NonNegFloat = 0.2
    cliprange_value: NonNegFloat = 0.2
    vf_coef: NonNegFloat = 0.1
    ppo_epochs: PosInt = 1
    whiten_advantages: bool = True


# --- the algebra ----------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked
    positions, in order (the value after the last is 0): δ_t = r_t + γ V_{t+1} − V_t,
    A_t = δ_t + γλ A_{t+1}; returns = A + V. Positions outside the mask get 0."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        last = 0.0
        for j in range(len(idx) - 1, -1, -1):
            t = int(idx[j])
            next_v = values[b, int(idx[j + 1])] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (TRL's `masked_whiten`)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
) -> dict[str, torch.Tensor]:
    """PPO's clipped policy loss and clipped value loss, token means over `mask`; also the
    fraction of tokens where each clip bound and the approximate KL to the old policy."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    return {
        "policy": masked_mean(torch.max(pg1, pg2), mask),
        "value": 0.5 * masked_mean(torch.max(vf1, vf2), mask),
        "clip_fraction": masked_mean((pg2 > pg1).float(), mask).detach(),
        "value_clip_fraction": masked_mean((vf2 > vf1).float(), mask).detach(),
        "approx_kl": 0.5 * masked_mean((logps - old_logps) ** 2, mask).detach(),
    }


@dataclass
class KLController:
    """The KL penalty's coefficient: fixed, or adaptive as Ziegler et al. 2019 (TRL's
    `AdaptiveKLController`): after each rollout of `n` sequences whose mean KL is `kl`,
    coef ← coef × (1 + clip(kl / target − 1, −0.2, 0.2) × n / horizon). It is the PPO
    objective's state: saved with each checkpoint, so a resumed run uses the same values."""

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --- rollouts and the objective -------------------------------------------------------------


@torch.no_grad()
def rollout(
    policy, ref, tok, items: list[Item], cfg: PPOConfig, judge, seed: int, kl_ctl: KLController
) -> Batch:
    """One sampled answer per item, scored, with the per-token KL penalty (the controller's
    coefficient, which this rollout's KL then updates), GAE advantages and returns from the
    policy's values at sampling time."""
    stops = stop_ids_of(tok, chat=True)
    gen = GenerationConfig(
        temperature=cfg.temperature, max_new_tokens=cfg.max_completion, seed=seed, stop_ids=stops
    )
    prompts, comps = sample(policy, tok, items, gen)
    texts = [c.text or "" for c in comps]
    x, y = completion_batch(prompts, comps, stops, pad_id(tok))
    mask = y != IGNORE
    was = policy.training
    policy.eval()  # the log-probs and values of the policy that sampled, without dropout
    logits, values = policy(x, with_scores=True)
    policy.train(was)
    old_logps, values = token_logps(logits, y), values.float() * mask
    ref_logps = token_logps(ref(x), y)
    if judge is None:
        scores = rewards_for(cfg.task, texts, [it.answer for it in items], 0.0)
    else:
        scores = reward_model_scores(judge, items, texts)
    kl = (old_logps - ref_logps) * mask
    coef = kl_ctl.value
    rewards = -coef * kl
    last = mask.long().cumsum(-1).argmax(-1)  # each row's last completion position
    rewards[torch.arange(len(comps)), last] += scores
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    extras = {
        "old_logps": old_logps,
        "old_values": values,
        "advantages": adv,
        "returns": returns,
        "scores": scores,
        "kl": kl.sum(-1),
        "kl_coef": torch.full((len(comps),), coef),
    }
    kl_ctl.update(float(kl.sum(-1).mean()), len(comps))
    return Batch(x, y, extras=extras)


def ppo_objective(cfg: PPOConfig, kl_ctl: KLController | None = None):
    """PPO's policy loss + vf_coef × value loss on a rollout batch, counted in sequences;
    logs the score, the KL to the reference and its coefficient, the entropy, the clip
    fraction and the value error. `kl_ctl` (the rollouts' KL controller) becomes the
    objective's `state`, which the training loop checkpoints."""

    def objective(model: torch.nn.Module, batch: Batch) -> LossOut:
        e = batch.extras
        if e is None or "advantages" not in e:
            raise UsageError("ppo: the batch carries no rollout")
        mask = batch.targets != IGNORE
        logits, values = model(batch.inputs, with_scores=True)
        logps = token_logps(logits, batch.targets)
        out = ppo_losses(
            logps, e["old_logps"], e["advantages"], values.float(), e["old_values"],
            e["returns"], mask, cfg.cliprange, cfg.cliprange_value,
        )  # fmt: skip
        loss = out["policy"] + cfg.vf_coef * out["value"]
        with torch.no_grad():
            logp = torch.log_softmax(logits.float(), -1)
            entropy = masked_mean(-(logp.exp() * logp).sum(-1), mask.float())
        n = batch.inputs.shape[0]
        metrics = {
            "score": e["scores"].sum(),
            "kl": e["kl"].sum(),
            "kl_coef": e["kl_coef"].sum() if "kl_coef" in e else torch.tensor(0.0),
            "entropy": entropy * n,
            "clip_fraction": out["clip_fraction"] * n,
            "value_error": out["value"].detach() * n,
        }
        return LossOut(loss * n, n, metrics)

    if kl_ctl is not None:
        objective.state = kl_ctl  # type: ignore[attr-defined]
    return objective


def align_ppo(
    model_ref: str | Path,
    out_dir: str | Path,
    ppo: PPOConfig,
    cfg: TrainConfig,
    seed: int = 0,
    peft: PeftConfig | None = None,
) -> dict:
    """Train `model_ref` with PPO against `ppo.reward_model` (or the task's verifier);
    `cfg.batch_size` counts prompts. Held-out verifier accuracy before and after. With
    `peft` the policy trains an adapter (and its value head)."""
    check_task(ppo.task, ppo.difficulty)
    out_dir = claim_output_dir(out_dir, "align-ppo", resume=True)  # before any work
    judge = load_reward_model(ppo.reward_model) if ppo.reward_model is not None else None
    items, held = task_items(ppo.task, ppo.prompts, ppo.heldout, ppo.difficulty, seed)
    with as_checkpoint(model_ref, scratch=out_dir.parent) as ckpt:
        tok = load_tokenizer(ckpt)
        base = load_model(ckpt)
        ref = copy.deepcopy(base).eval().requires_grad_(False)
        policy = base if base.cfg.reward_head else with_reward_head(base)
        policy = with_adapter(policy, peft, model_ref, tok)
        before = heldout_scores(policy, tok, held, ppo.task, ppo.max_completion)
        if held:
            acc = sum(before) / len(held)
            log(f"ppo: held-out accuracy before: {acc:.3f} ({len(held)} items, greedy)")
        n = len(items)
        cache: dict[int, Batch] = {}
        kl_ctl = KLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)

        def get_batch(index: int, start: int, count: int) -> Batch:
            group = index // ppo.ppo_epochs  # ppo_epochs steps share one rollout
            if group not in cache:
                cache.clear()
                first = group * count
                picked = [items[(first + r) % n] for r in range(count)]
                cache[group] = rollout(
                    policy, ref, tok, picked, ppo, judge, seed * 1_000_003 + first, kl_ctl
                )
            return cache[group]

        key = json.dumps({"ppo": ppo.__dict__, "seed": seed}, sort_keys=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        mark_output(out_dir, "align-ppo")
        log(f"ppo: {n} prompts, {cfg.budget}")
        summary = train(
            policy,
            get_batch,
            [],
            cfg,
            out_dir,
            ckpt,
            key,
            name="ppo",
            objective=ppo_objective(ppo, kl_ctl),
        )
        after = heldout_scores(policy, tok, held, ppo.task, ppo.max_completion)
    summary.update(before_after(before, after))
    return summary

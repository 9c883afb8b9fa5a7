"""The preference losses against TRL's own code on the same inputs.

TRL 1.x keeps most losses inside its trainers' methods. Where a method takes log-probs
(CPO/SimPO's `cpo_loss`, ORPO's `odds_ratio_loss`, DPO's `_compute_loss` given a model
that returns per-token log-probs), it is called on a minimal stand-in for the trainer
that carries only the attributes the method reads; the numbers are TRL's."""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmlab.adapt.preference import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    k3_kl,
    kto_kl,
    kto_loss,
    orpo_odds_ratio,
    reward_model_loss,
    simpo_loss,
)
from lmlab.errors import UsageError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")

B, T = 6, 9
ACCEL = SimpleNamespace(
    device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x, num_processes=1
)


def logps(seed: int, *shape: int, low: float = -3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low * torch.rand(*shape, generator=g, dtype=torch.float64)


def trl_dpo(policy_tok, mask, ref_chosen, ref_rejected, loss_type, beta, label_smoothing):
    """TRL's DPOTrainer._compute_loss on per-token log-probs [2B, T-1] (chosen rows then
    rejected rows, zero outside the completion) and cached reference log-probs."""
    from trl import DPOTrainer

    rows = policy_tok.shape[0]
    outputs = SimpleNamespace(
        log_probs=policy_tok,
        entropy=torch.zeros_like(policy_tok),
        mean_logits=torch.zeros_like(policy_tok),
        is_top1=torch.zeros_like(policy_tok, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model,
        accelerator=ACCEL,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(rows, T, dtype=torch.long),
        "attention_mask": torch.ones(rows, T, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize(
    "loss_type,smoothing",
    [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_family_equals_trl(loss_type, smoothing):
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    lengths = torch.randint(2, T, (2 * B,), generator=torch.Generator().manual_seed(1))
    for r, n in enumerate(lengths.tolist()):
        mask[r, T - n :] = 1  # the completion ends the row; its first token is predicted
    per_token = logps(2, 2 * B, T - 1) * mask[:, 1:]
    ref_c, ref_r = logps(3, B), logps(4, B)
    want = trl_dpo(per_token, mask, ref_c, ref_r, loss_type, beta=0.3, label_smoothing=smoothing)
    sums = per_token.sum(1)
    n = mask.sum(1)  # TRL's IPO divides by the completion's tokens
    got = dpo_loss(
        sums[:B], sums[B:], ref_c, ref_r, beta=0.3, loss_type=loss_type,
        label_smoothing=smoothing, chosen_lengths=n[:B], rejected_lengths=n[B:],
    )  # fmt: skip
    assert got.losses.mean().item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(got.chosen_rewards, 0.3 * (sums[:B] - ref_c))


def test_conservative_dpo_is_cpo_label_smoothing_on_the_log_ratios():
    """TRL's DPO `sigmoid` has no label smoothing; its CPO keeps the conservative form
    (-(1-e) log s(bx) - e log s(-bx)), which DPO's is once the reference is folded into
    the log-probs."""
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr = logps(5, B), logps(6, B), logps(7, B), logps(8, B)
    cpo = SimpleNamespace(beta=0.2, label_smoothing=0.15, loss_type="sigmoid", alpha=0.0,
                          simpo_gamma=0.0, accelerator=ACCEL)  # fmt: skip
    want, _, _ = CPOTrainer.cpo_loss(cpo, pc - rc, pr - rr)
    got = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="sigmoid", label_smoothing=0.15)
    assert torch.allclose(got.losses, want)
    # the paper's IPO (no lengths) is CPO's ipo on the log-ratios
    cpo.loss_type, cpo.label_smoothing = "ipo", 0.0
    want, _, _ = CPOTrainer.cpo_loss(cpo, pc - rc, pr - rr)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="ipo").losses, want)


def test_simpo_and_orpo_equal_trl():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    c, r = logps(9, B, low=-2.0), logps(10, B, low=-2.0)  # average per-token log-probs
    cpo = SimpleNamespace(beta=2.0, label_smoothing=0.05, loss_type="simpo", alpha=0.0,
                          simpo_gamma=0.7, accelerator=ACCEL)  # fmt: skip
    want, want_c, want_r = CPOTrainer.cpo_loss(cpo, c, r)
    got = simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=0.05)
    assert torch.allclose(got.losses, want)
    assert torch.allclose(got.chosen_rewards, want_c) and torch.allclose(
        got.rejected_rewards, want_r
    )
    # ORPO: TRL returns beta · log sigmoid(log odds), which its loss subtracts from the NLL
    orpo = SimpleNamespace(beta=0.25, accelerator=ACCEL)
    ratio, _, _, _, _ = ORPOTrainer.odds_ratio_loss(orpo, c, r)
    assert torch.allclose(orpo_odds_ratio(c, r, beta=0.25).losses, -ratio.float())
    # the odds near log p = 0 stay finite (log1mexp's other branch)
    near = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0], dtype=torch.float64)
    assert torch.isfinite(orpo_odds_ratio(near, near - 1).losses).all()


def test_kto_reward_model_and_grpo_pieces():
    from trl.trainer.utils import nanstd

    # KTO (TRL's kto loss, Eq. 7): desirable 1 - s(b(ratio - kl)), undesirable 1 - s(b(kl - ratio))
    pol, ref = logps(11, 8), logps(12, 8)
    good = torch.tensor([True, False, True, True, False, False, True, False])
    kl = kto_kl(logps(13, 8), logps(14, 8))
    assert kl >= 0
    got = kto_loss(pol, ref, good, kl, beta=0.2, desirable_weight=1.5)
    ratio = pol - ref
    want = torch.cat([1.5 * (1 - torch.sigmoid(0.2 * (ratio[good] - kl))),
                      1 - torch.sigmoid(0.2 * (kl - ratio[~good]))])  # fmt: skip
    assert torch.allclose(got, want)
    # the reward model (TRL's RewardTrainer): margin inside, centring term added
    rc, rr, m = logps(15, B), logps(16, B), logps(17, B, low=0.5)
    want = -F.logsigmoid(rc - rr - m).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    assert torch.allclose(reward_model_loss(rc, rr, m, 0.01), want)
    # GRPO advantages: group mean removed, divided by TRL's Bessel-corrected nanstd + 1e-4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.25])
    want = (rewards - rewards.view(3, 3).mean(1).repeat_interleave(3)) / (
        nanstd(rewards.view(3, 3), dim=1).repeat_interleave(3) + 1e-4
    )
    assert torch.allclose(group_advantages(rewards, 3), want)
    assert torch.allclose(
        group_advantages(rewards, 3, "none").view(3, 3).sum(1), torch.zeros(3), atol=1e-6
    )
    assert torch.allclose(group_advantages(rewards, 3)[3:6], torch.zeros(3))  # equal rewards
    # k3: unbiased for KL(p||q) under samples of p, and never negative
    p = torch.distributions.Categorical(
        logits=torch.randn(50, generator=torch.Generator().manual_seed(0))
    )
    q = torch.distributions.Categorical(
        logits=torch.randn(50, generator=torch.Generator().manual_seed(1))
    )
    x = p.sample((200_000,))
    est = k3_kl(p.log_prob(x), q.log_prob(x))
    assert (est >= 0).all()
    assert est.mean().item() == pytest.approx(
        torch.distributions.kl_divergence(p, q).item(), rel=0.03
    )


def test_grpo_normalisations_and_clipping():
    g = torch.Generator().manual_seed(3)
    lp, old, ref = (-torch.rand(4, 5, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    ratio = torch.exp(lp - old)
    per = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.28) * adv[:, None])
    per = per + 0.04 * (torch.exp(ref - lp) - (ref - lp) - 1)
    m = mask.float()
    want = {
        "grpo": ((per * m).sum(1) / m.sum(1)).mean(),
        "bnpo": (per * m).sum() / m.sum(),
        "dapo": (per * m).sum() / m.sum(),
        "dr_grpo": (per * m).sum() / (4 * 8),
    }
    for kind, value in want.items():
        got = grpo_loss(lp, old, adv, mask, ref, beta=0.04, epsilon_high=0.28, loss_type=kind,
                        max_completion_length=8)  # fmt: skip
        assert torch.allclose(got, value), kind
    # on-policy (ratio 1) without KL the gradient is -advantage · grad log p per token
    lp = lp.clone().requires_grad_(True)
    grpo_loss(lp, lp.detach(), adv, mask, loss_type="bnpo").backward()
    assert torch.allclose(lp.grad, -adv[:, None] * m / m.sum())


def test_bad_settings_are_usage_errors():
    x = torch.zeros(2)
    with pytest.raises(UsageError, match="loss_type 'nope'"):
        dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(UsageError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(UsageError, match="beta"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(UsageError, match="both completion lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=x)
    with pytest.raises(UsageError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(UsageError, match="reference log-probs"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), beta=0.1)

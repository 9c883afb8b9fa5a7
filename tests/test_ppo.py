"""PPO-RLHF: GAE against its closed form, the clipped losses on hand cases, learning on a
bandit-like toy, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.adapt.grpo import prompt_ids
from lmlab.adapt.ppo import KLController, PPOConfig, gae, ppo_losses, ppo_objective, whiten
from lmlab.adapt.reward import with_reward_head
from lmlab.eval.synthetic import make_items
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.loading import load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer
from lmlab.train.batch import Batch
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ppo"))


def test_gae_equals_its_closed_form_on_masked_rows():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6], mask[1, 0:7], mask[2, 5:6] = True, True, True
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
    for b in range(3):
        idx = mask[b].nonzero().squeeze(-1).tolist()
        r, v = rewards[b, idx], values[b, idx]
        v_next = torch.cat([v[1:], torch.zeros(1)])
        delta = r + gamma * v_next - v
        for j, t in enumerate(idx):  # A_t = sum_k (gamma lam)^k delta_{t+k}
            want = sum((gamma * lam) ** k * delta[j + k] for k in range(len(idx) - j))
            assert adv[b, t].item() == pytest.approx(float(want), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(float(want + v[j]), abs=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    w = whiten(adv, mask)
    assert w[mask].mean().item() == pytest.approx(0, abs=1e-5)
    assert w[mask].std().item() == pytest.approx(1, abs=1e-3)


def test_clipped_losses_on_hand_cases():
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    # ratios 1.1 (inside), 1.5 and 0.5 (outside), 0.9; advantages +1, +1, -1, -1
    logps = torch.log(torch.tensor([[1.1, 1.5, 0.5, 0.9]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    z = torch.zeros(1, 4)
    out = ppo_losses(logps, old, adv, z, z, z, mask, cliprange=0.2)
    # per token: max(-A r, -A clip(r)): -1.1, -1.2, +0.8, +0.9
    assert out["policy"].item() == pytest.approx((-1.1 - 1.2 + 0.8 + 0.9) / 4)
    assert out["clip_fraction"].item() == pytest.approx(0.5)
    # the value loss: 0.5 max((v - R)^2, (clip(v) - R)^2)
    v, old_v, ret = torch.tensor([[1.0, 0.0, 0.5, 0.0]]), z, torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    out = ppo_losses(old, old, z, v, old_v, ret, mask, cliprange_value=0.2)
    # token 0: max(1, 0.04) = 1; token 2: max(0.25, 0.64) = 0.64
    assert out["value"].item() == pytest.approx(0.5 * (1 + 0.64) / 4)


def test_ppo_raises_a_reward_on_a_bandit_like_toy(ckpt):
    torch.manual_seed(0)
    model = with_reward_head(load_model(ckpt))
    tok = load_tokenizer(ckpt)
    prompt = prompt_ids(tok, make_items("addition", 1, 1, seed=0, split="train")[0])
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    target = int(first.topk(5).indices[-1])
    before = float(first[target])
    cfg = PPOConfig(vf_coef=0.5)
    objective = ppo_objective(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(15):
        x = torch.tensor([prompt] * 8)
        with torch.no_grad():
            logits, values = model(x, with_scores=True)
            g = torch.Generator().manual_seed(step)
            tokens = torch.multinomial(logits[0, -1].softmax(-1), 8, replacement=True, generator=g)
        y = torch.full_like(x, IGNORE)
        y[:, -1] = tokens
        mask = y != IGNORE
        old = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask
        scores = (tokens == target).float()
        rewards = torch.zeros(8, x.shape[1])
        rewards[:, -1] = scores
        adv, ret = gae(rewards, values * mask, mask, 1.0, 0.95)
        extras = dict(old_logps=old, old_values=values * mask, advantages=whiten(adv, mask),
                      returns=ret, scores=scores, kl=torch.zeros(8))  # fmt: skip
        for _ in range(2):  # two PPO epochs on the rollout: the ratio leaves 1
            opt.zero_grad()
            out = objective(model, Batch(x, y, extras=extras))
            (out.loss_sum / out.count).backward()
            opt.step()
    with torch.no_grad():
        after = float(model(torch.tensor([prompt]))[0, -1].softmax(-1)[target])
    assert after > 2 * before


def test_the_command_with_a_reward_model_and_with_the_verifier(ckpt, tmp_path, monkeypatch, capsys):
    rm = with_reward_head(load_model(ckpt))
    torch.nn.init.normal_(rm.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rm_dir = save_checkpoint(rm, tmp_path / "rm", tokenizer_dir=ckpt)
    common = ["--steps", "2", "--prompts", "4", "--heldout", "2", "--max-completion", "6",
              "--batch-size", "2", "--seq-len", "128", "--ppo-epochs", "2"]  # fmt: skip
    variants = [("rm", ["--reward-model", str(rm_dir)]), ("verifier", []),
                ("lora", ["--peft", "lora:r=2"])]  # fmt: skip
    for name, extra in variants:
        out = tmp_path / f"out-{name}"
        code, _, err = lmlab_here(
            monkeypatch, capsys, "align", "ppo", str(ckpt), "--out", str(out), *common, *extra
        )
        assert code == 0, err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in lines if "score" in x]
        assert len(steps) == 2
        for key in ("kl", "entropy", "clip_fraction", "value_error"):
            assert key in steps[-1]
        assert load_model(out / "model").cfg.reward_head  # the value head stays
        # with --peft: an adapter that trained the value head with it
        assert (out / "model" / "adapter_config.json").is_file() == (name == "lora")
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "ppo", str(ckpt), "--out", str(tmp_path / "x"),
        "--reward-model", str(ckpt),
    )  # fmt: skip
    assert code == 2 and "not a reward model" in err
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "ppo", str(ckpt), "--out", str(tmp_path / "y"), "--lam", "2"
    )
    assert code == 2 and "--lam" in err


def test_adaptive_kl_follows_the_target_as_ziegler_et_al():
    ctl = KLController(0.2, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # twice the target: the error is clipped at +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    ctl.update(5.4, 50)  # 10% under: the coefficient falls
    assert ctl.value == pytest.approx(0.2 * 1.02 * (1 - 0.1 * 50 / 100))
    fixed = KLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
    again = KLController(1.0, target=6.0)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value


def _ppo_run(ckpt, out, steps):
    from lmlab.adapt.ppo import align_ppo
    from lmlab.train.loop import TrainConfig

    # a constant learning rate: a 2-step and a 4-step run share their first steps
    cfg = TrainConfig(batch_size=2, seq_len=128, lr=1e-3, warmup_steps=0, max_steps=steps,
                      min_lr_ratio=1.0, checkpoint_every=2, log_every=1,
                      eval_every=100)  # fmt: skip
    ppo = PPOConfig(prompts=8, heldout=0, max_completion=6, kl_coef=0.3, kl_target=0.5,
                    kl_horizon=4)  # fmt: skip
    align_ppo(ckpt, out, ppo, cfg, seed=3)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "kl_coef" in x]


def test_adaptive_kl_resumes_exactly(ckpt, tmp_path):
    straight = _ppo_run(ckpt, tmp_path / "a", 4)
    _ppo_run(ckpt, tmp_path / "b", 2)  # stops after step 2 with its checkpoint
    resumed = {x["step"]: x for x in _ppo_run(ckpt, tmp_path / "b", 4)}
    coefs = [x["kl_coef"] for x in straight]
    assert len(set(coefs)) > 1  # the coefficient moved
    for x in straight:
        for k in ("loss", "kl_coef", "kl"):
            assert resumed[x["step"]][k] == pytest.approx(x[k], abs=1e-6), (x["step"], k)

"""GRPO with verifiable rewards: the rollout batch, learning on a bandit-like toy, the
command end to end, and exact resume (sampling seeded by step)."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.adapt.grpo import (
    GRPOConfig,
    align_grpo,
    grpo_objective,
    prompt_ids,
    rewards_for,
    rollout,
)
from lmlab.adapt.preference import group_advantages
from lmlab.eval.synthetic import make_items
from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.model.loading import load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.chat import stop_ids_of
from lmlab.train.batch import Batch
from lmlab.train.loop import TrainConfig
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("grpo"))


def test_rewards_and_the_rollout_batch(ckpt):
    assert rewards_for("addition", ["so 2 + 2 = 4. The answer is 4.", "5", "no idea"],
                       ["4", "4", "4"], 0.5).tolist() == [1.5, 0.0, 0.0]  # fmt: skip
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg = GRPOConfig(group_size=3, max_completion=6, beta=0.1)
    items = make_items("addition", 2, 1, seed=0, split="train")
    batch = rollout(model, model, tok, items, cfg, seed=5)
    assert batch.inputs.shape[0] == 6 and batch.extras["advantages"].shape == (6,)
    again = rollout(model, model, tok, items, cfg, seed=5)
    assert torch.equal(again.inputs, batch.inputs)  # seeded: the same answers
    # targets are exactly the sampled answers (and the end of turn when it stopped)
    gen = GenerationConfig(temperature=1.0, max_new_tokens=6, n=3, seed=5,
                           stop_ids=stop_ids_of(tok, chat=True))  # fmt: skip
    comps = generate_batch(model, [prompt_ids(tok, it) for it in items], gen, tokenizer=tok)
    for row, c in enumerate(comps):
        got = batch.targets[row][batch.targets[row] != IGNORE].tolist()
        end = [stop_ids_of(tok, chat=True)[-1]] if c.finish_reason == "stop" else []
        assert got == c.tokens + end
    # with a reference, its per-token log-probs: the policy's own here, so the KL is 0
    out = grpo_objective(cfg)(model, batch)
    assert float(out.metrics["kl"]) == pytest.approx(0.0, abs=1e-5)


def test_grpo_raises_a_reward_on_a_bandit_like_toy(ckpt):
    """Reward 1 when the first sampled token is one fixed token: the clipped objective
    with group advantages must make that token likelier."""
    torch.manual_seed(0)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    prompt = prompt_ids(tok, make_items("addition", 1, 1, seed=0, split="train")[0])
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    target = int(first.topk(5).indices[-1])  # a token the model rarely starts with
    before = float(first[target])
    cfg = GRPOConfig(group_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    objective = grpo_objective(cfg)
    for step in range(15):
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, -1]
            g = torch.Generator().manual_seed(step)
            tokens = torch.multinomial(logits.softmax(-1), 8, replacement=True, generator=g)
        rewards = (tokens == target).float()
        x = torch.tensor([prompt] * 8)
        y = torch.full_like(x, IGNORE)
        y[:, -1] = tokens
        adv = group_advantages(rewards, 8)
        batch = Batch(x, y, extras={"advantages": adv, "rewards": rewards})
        opt.zero_grad()
        out = objective(model, batch)
        (out.loss_sum / out.count).backward()
        opt.step()
    with torch.no_grad():
        after = float(model(torch.tensor([prompt]))[0, -1].softmax(-1)[target])
    assert after > 2 * before


def run(ckpt, out, steps: int) -> list[dict]:
    cfg = TrainConfig(batch_size=2, seq_len=128, lr=1e-3, max_steps=steps, warmup_steps=0,
                      min_lr_ratio=1.0, log_every=1, checkpoint_every=1, eval_every=100,
                      weight_decay=0.0)  # fmt: skip
    grpo = GRPOConfig(prompts=8, heldout=4, group_size=3, max_completion=8, beta=0.05)
    align_grpo(ckpt, out, grpo, cfg, seed=1)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "reward" in x]


def test_resume_after_a_stop_repeats_the_per_step_losses(ckpt, tmp_path):
    straight = run(ckpt, tmp_path / "a", 4)
    run(ckpt, tmp_path / "b", 2)  # stops after step 2 with its checkpoint
    resumed = run(ckpt, tmp_path / "b", 4)  # the same run, continued to step 4
    got = {x["step"]: x for x in resumed}
    assert [x["step"] for x in straight] == [1, 2, 3, 4]
    for x in straight:
        assert got[x["step"]]["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
        assert got[x["step"]]["reward"] == x["reward"]


def test_the_command(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "grpo", str(ckpt), "--out", str(out), "--steps", "2",
        "--prompts", "4", "--heldout", "4", "--group-size", "2", "--max-completion", "6",
        "--batch-size", "2", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    assert "held-out accuracy" in err and (out / "model" / "config.json").is_file()
    for args, said in [(["--task", "nope"], "--task"), (["--group-size", "7"], "--group-size"),
                       (["--loss-type", "x"], "--loss-type")]:  # fmt: skip
        code, _, err = lmlab_here(
            monkeypatch, capsys, "align", "grpo", str(ckpt), "--out", str(tmp_path / "x"), *args
        )
        assert code == 2 and said in err, (args, err)
        assert not (tmp_path / "x").exists()


# --- building preference pairs ------------------------------------------------------------------


def test_pairs_ranked_by_a_reward_model_feed_dpo(ckpt, tmp_path, monkeypatch, capsys):
    from lmlab.adapt.dpo import read_pairs
    from lmlab.adapt.reward import score_texts, with_reward_head
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.tokenizer import pad_id
    from lmlab.tokenizer.chat import encode_exchange

    rm = with_reward_head(load_model(ckpt))
    torch.nn.init.normal_(rm.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rm_dir = save_checkpoint(rm, tmp_path / "rm", tokenizer_dir=ckpt)
    out = tmp_path / "pairs.jsonl"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(out), "--prompts", "3",
        "--k", "3", "--max-new-tokens", "8", "--reward-model", str(rm_dir),
    )  # fmt: skip
    assert code == 0, err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs and all(r["score_chosen"] > r["score_rejected"] for r in recs)
    tok = load_tokenizer(rm_dir)
    for r in recs:  # the scores are the reward model's own
        rows = [
            sum(encode_exchange(tok, r["prompt"], r[side]), []) for side in ("chosen", "rejected")
        ]
        s = score_texts(load_model(rm_dir), rows, pad_id(tok), 256)
        assert s.tolist() == pytest.approx([r["score_chosen"], r["score_rejected"]], abs=1e-4)
    assert len(read_pairs(out)) == len(recs)  # what align dpo reads
    # again without --overwrite: refused; a user's file is never replaced
    code, _, err = lmlab_here(monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(out))
    assert code == 2 and "--overwrite" in err
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"mine": 1}\n')
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(mine), "--overwrite"
    )
    assert code == 2 and mine.read_text() == '{"mine": 1}\n'
    # the verifier on a model that never answers right: no preference, said plainly
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(tmp_path / "v.jsonl"),
        "--prompts", "2", "--k", "2", "--max-new-tokens", "4", "--task", "multiplication",
        "--difficulty", "3",
    )  # fmt: skip
    assert code == 2 and "equally scored" in err


def test_pairs_ranked_by_an_llm_judge(ckpt, tmp_path, monkeypatch, capsys):
    from lmlab.adapt.pairs import _judge_scores
    from lmlab.eval.judge import compare, model_judge

    out = tmp_path / "judged.jsonl"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(out), "--prompts", "2",
        "--k", "3", "--max-new-tokens", "6", "--judge", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs and all(r["scorer"].startswith("judge:") for r in recs)
    assert all(r["score_chosen"] > r["score_rejected"] for r in recs)
    # the scores: each answer's mean win probability over the others, both orders judged
    items = make_items("addition", 1, 1, seed=0, split="train")
    texts = ["4", "five", "The answer is 4."]
    scores = _judge_scores(str(ckpt), items, texts, 3)
    judge = model_judge(load_model(ckpt).eval(), load_tokenizer(ckpt))
    answers = {str(j): t for j, t in enumerate(texts)}
    p01 = compare(judge, items[0].question, answers, "0", "1").p_a
    p02 = compare(judge, items[0].question, answers, "0", "2").p_a
    assert scores[0].item() == pytest.approx((p01 + p02) / 2, abs=1e-6)
    assert scores.sum().item() == pytest.approx(3 / 2, abs=1e-5)  # each pair shares 1
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "pairs", str(ckpt), "--out", str(tmp_path / "z.jsonl"),
        "--judge", str(ckpt), "--reward-model", str(ckpt),
    )  # fmt: skip
    assert code == 2 and "not both" in err

"""optimizer: muon — Muon on the blocks' matrices, AdamW on the rest, as one optimizer
that the loop schedules, clips, checkpoints and resumes like any other."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lmlab.errors import UsageError
from lmlab.model import ModelConfig, Transformer
from lmlab.run.recipe import load_recipe
from lmlab.train.distributed import full_state, load_full_state
from lmlab.train.loop import TrainConfig, make_optimizer
from lmlab.train.muon import MuonAdamW, hidden_matrices
from tests.conftest import lmlab_in
from tests.test_train import Killed, _cfg, _losses, _run_pretrain_loop, shards  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=96, max_seq_len=32)
    )


def _step(model: Transformer, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 96, (4, 16), generator=g)
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    m = _model()
    opt = make_optimizer(m, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, max_steps=1))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    kinds = {names[id(p)]: g["kind"] for g in opt.param_groups for p in g["params"]}
    assert set(kinds) == set(names.values())  # every trainable parameter, once
    muon = {n for n, k in kinds.items() if k == "muon"}
    assert muon == {n for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight"} <= {
        n for n, k in kinds.items() if k == "adamw"
    }
    assert hidden_matrices(m) == {id(p) for n, p in m.named_parameters() if n in muon}
    g = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert g["lr"] == 0.02 and g["lr_scale"] == pytest.approx(20.0)
    # Muon decays by lr·wd per step: the same per-step decay as AdamW's at lr 1e-3
    assert g["lr"] * g["weight_decay"] == pytest.approx(1e-3 * 0.1)


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan's quintic iteration in float64, written out: the reference."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).float()


def test_a_muon_step_is_the_orthogonalised_gradient_and_adamw_moves_the_rest():
    """From zero momentum, Muon's update of a matrix is the Newton–Schulz
    orthogonalisation of its gradient (Nesterov only rescales it), times
    lr·sqrt(max(1, rows/cols)): singular values all in the band the quintic iteration
    lands in (~0.5–1.5, not the gradient's spread), singular vectors the gradient's.
    Non-block parameters take AdamW's first step, ±lr per element."""
    m = _model()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.0, max_steps=1)
    opt = make_optimizer(m, cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    logits = m(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.gate_proj.weight"):
        p = dict(m.named_parameters())[name]
        rows, cols = p.shape
        update = (before[name] - p.detach()) / (0.02 * max(1.0, rows / cols) ** 0.5)
        s = torch.linalg.svdvals(update)
        assert s.min() > 0.45 and s.max() < 1.5, s  # orthogonalised: all directions alike
        gs = torch.linalg.svdvals(grads[name])
        assert gs.max() / gs.min() > 5 * s.max() / s.min()  # the raw gradient is far from that
        ref = _newton_schulz(grads[name])  # torch runs it in bf16
        torch.testing.assert_close(update, ref, rtol=0, atol=0.03 * ref.abs().max().item())
        # Nesterov from zero momentum: the orthogonalised (1 - μ²)·g, i.e. U·Vᵀ of g
        u, _, vh = torch.linalg.svd(grads[name], full_matrices=False)
        cos = torch.nn.functional.cosine_similarity(update.flatten(), (u @ vh).flatten(), dim=0)
        assert cos > 0.95
    for name in ("embed_tokens.weight", "norm.weight"):
        p = dict(m.named_parameters())[name]
        moved = (before[name] - p.detach())[grads[name] != 0]
        torch.testing.assert_close(moved.abs(), torch.full_like(moved, 1e-3), rtol=0.02, atol=0)


def test_the_state_dict_round_trips_by_parameter_name():
    a, b = _model(), _model(seed=9)
    cfg = TrainConfig(optimizer="muon", max_steps=3)
    oa, ob = make_optimizer(a, cfg), make_optimizer(b, cfg)
    for s in range(2):
        _step(a, oa, s)
    model_state, opt_state = copy.deepcopy(full_state(a, oa))  # as a checkpoint holds them
    assert "layers.0.mlp.up_proj.weight" in opt_state["state"]  # keyed by name
    assert "momentum_buffer" in opt_state["state"]["layers.0.mlp.up_proj.weight"]
    assert "exp_avg" in opt_state["state"]["embed_tokens.weight"]
    load_full_state(b, ob, model_state, opt_state)
    assert [g["kind"] for g in ob.param_groups] == [g["kind"] for g in oa.param_groups]
    for s in (5, 6):
        _step(a, oa, s)
        _step(b, ob, s)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_the_schedule_scales_both_kinds(shards, tmp_path):  # noqa: F811
    cfg = _cfg(optimizer="muon", muon_lr=0.05, lr=1e-3, max_steps=6, warmup_steps=3)
    seen = []
    original = MuonAdamW.step

    def spy(self, closure=None):
        seen.append({g["kind"]: g["lr"] for g in self.param_groups})
        return original(self, closure)

    MuonAdamW.step = spy
    try:
        _run_pretrain_loop(shards, tmp_path / "run", cfg)
    finally:
        MuonAdamW.step = original
    seen = [s for s in seen if s["adamw"] > 0]  # torch.distributed's zero-lr state init
    assert len(seen) == 6
    for s in seen:
        assert s["muon"] == pytest.approx(50 * s["adamw"])
    assert seen[0]["adamw"] < seen[2]["adamw"]  # warm-up applies to both
    logged = [
        r["lr"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").open()) if "lr" in r
    ]
    assert logged == pytest.approx([s["adamw"] for s in seen])


def test_a_killed_muon_run_resumes_to_identical_losses_and_weights(shards, tmp_path):  # noqa: F811
    cfg = _cfg(optimizer="muon", muon_lr=0.02, max_steps=10, grad_accum=2)
    _run_pretrain_loop(shards, tmp_path / "ref", cfg)
    with pytest.raises(Killed):  # dies inside step 6 (micro-batches 10, 11)
        _run_pretrain_loop(shards, tmp_path / "run", cfg, kill_at=11)
    assert json.loads((tmp_path / "run/last/trainer_state.json").read_text())["step"] == 4
    _run_pretrain_loop(shards, tmp_path / "run", cfg)
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [s for s, _ in got] == list(range(1, 11)) and got == ref
    assert ref[-1][1] < ref[0][1]  # it trains
    a = load_file(tmp_path / "ref/model/model.safetensors")
    b = load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipes_accept_muon_and_refuse_bad_values():
    r = load_recipe("tiny", ["pretrain.optimizer=muon", "pretrain.muon_lr=0.03"])
    assert r.pretrain.optimizer == "muon" and r.pretrain.muon_lr == 0.03
    with pytest.raises(UsageError, match="pretrain.optimizer: .*'muon'.*got 'lion'"):
        load_recipe("tiny", ["pretrain.optimizer=lion"])
    with pytest.raises(UsageError, match="muon does not support distributed: fsdp"):
        load_recipe("tiny", ["pretrain.optimizer=muon", "pretrain.distributed=fsdp"])
    with pytest.raises(UsageError, match="muon_adjust"):
        load_recipe("tiny", ["pretrain.muon_adjust=spectral"])


def test_bad_optimizer_exits_2_from_the_command_line(tmp_path, monkeypatch, capsys):
    code, _, err = lmlab_in(
        monkeypatch, capsys, tmp_path, "run", "smoke", "--set", "pretrain.optimizer=lion"
    )
    assert code == 2 and "pretrain.optimizer" in err and "'muon'" in err
    assert not (tmp_path / "runs").exists()

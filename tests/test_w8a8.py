"""W8A8 (int8 weights and activations, SmoothQuant smoothing, float outlier channels): the
FBGEMM kernel against the plain-float reference, the reference against hand computation,
what smoothing and the outlier channels buy on a model with an outlier feature,
checkpoints that load back to the same logits, calibration sources and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from lmlab.errors import CheckpointError, UsageError
from lmlab.infer.quantize import format_report, quantize_checkpoint
from lmlab.model.loading import load_model
from lmlab.model.quant import (
    W8A8Linear,
    _act_qparams,
    _pack_w8a8,
    activation_absmax,
    quantize_int8,
    quantize_model,
    save_quantized,
    smoothing_factors,
    w8a8_activation_qmax,
    w8a8_kernel,
    w8a8_kernel_works,
    w8a8_reference,
)

from .conftest import lmlab_cmd
from .test_quant import logits, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_activation_codes_by_hand():
    # range [-1, 2] over 0..127: scale 3/127, zero point round(1 / (3/127)) = 42
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    scale, zero = _act_qparams(x, 127)
    assert scale.item() == pytest.approx(3 / 127) and zero.item() == 42
    # codes: -1 → 0, 0.5 → 21 + 42 = 63, 2 → 85 + 42 = 127; one weight row of ones, scale 1
    ones, one = torch.ones(1, 3, dtype=torch.int8), torch.ones(1)
    y = w8a8_reference(x, ones, one, qmax=127)
    assert y.item() == pytest.approx(((0 - 42) + (63 - 42) + (127 - 42)) * 3 / 127)
    # 8 bits: scale 3/255, zero point round(85) = 85; 0.5 → round(42.5) = 42 (half to even)
    scale, zero = _act_qparams(x, 255)
    assert scale.item() == pytest.approx(3 / 255) and zero.item() == 85
    y = w8a8_reference(x, ones, one, qmax=255)
    assert y.item() == pytest.approx(((0 - 85) + 42 + 170) * 3 / 255)
    # an all-positive tensor still includes 0 in its range (zero point 0)
    assert _act_qparams(torch.tensor([[1.0, 3.0]]), 127)[1].item() == 0


@pytest.mark.skipif(not w8a8_kernel_works(), reason="this torch has no FBGEMM int8 kernel")
@pytest.mark.parametrize("qmax", sorted({127, w8a8_activation_qmax()}))
@pytest.mark.parametrize("rows", [1, 7])
def test_fbgemm_kernel_equals_reference(rows, qmax):
    """7-bit activations everywhere, 8-bit where the probe found the kernel exact."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 300, generator=g) * 3
    w = torch.randn(200, 300, generator=g)
    q, s = quantize_int8(w)
    got = w8a8_kernel(x, _pack_w8a8(q, s), qmax)
    ref = w8a8_reference(x, q, s, qmax)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    exact = x @ w.t()
    assert 0 < ((got - exact).norm() / exact.norm()).item() < 0.03


@pytest.mark.skipif(not w8a8_kernel_works(), reason="this torch has no FBGEMM int8 kernel")
def test_kernel_calls_the_bare_operator(monkeypatch):
    """The `torch.ops` packet's Python scan for fake script objects (generator frames that
    cost ~17 µs each inside a compiled graph) is not on the kernel's path."""
    import torch._ops

    def scan(*a, **k):
        raise AssertionError("went through the packet's Python scan")

    monkeypatch.setattr(torch._ops, "_must_dispatch_in_python", scan)
    x, (q, s) = torch.randn(2, 64), quantize_int8(torch.randn(32, 64))
    got = w8a8_kernel(x, _pack_w8a8(q, s), 127)
    assert torch.allclose(got, w8a8_reference(x, q, s, 127), rtol=1e-5, atol=1e-4)


def _outlier_linear(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer and inputs whose channel 3 is 60× larger than the rest, the kind of
    feature LLM activations carry (Dettmers et al. 2022)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.125, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    x = torch.randn(40, 64, generator=g)
    x[:, 3] *= 60
    return lin, x


def test_smoothing_and_outlier_channels_cut_the_error():
    lin, x = _outlier_linear()
    with torch.no_grad():
        exact = lin(x)
        absmax = x.abs().amax(0)

        def err(mod: nn.Module) -> float:
            return ((mod(x) - exact).norm() / exact.norm()).item()

        from lmlab.model.quant import _quantize_w8a8

        plain = W8A8Linear(64, 48, True, 0)  # no smoothing, no float channels
        plain.qweight, plain.scale = quantize_int8(lin.weight)
        plain.bias.data = lin.bias.detach().clone()
        plain = err(plain)
        smoothed = err(_quantize_w8a8(lin, absmax, alpha=0.5, outliers=0))
        split = _quantize_w8a8(lin, absmax, alpha=0.5, outliers=1)
        both = err(split)
    print(f"relative error: plain {plain:.4f}, smoothed {smoothed:.4f}, + outlier {both:.4f}")
    assert smoothed < plain / 2 and both < smoothed / 2
    # the outlier channel is the one kept in float, with its (smoothed) weights exact there
    assert split.outlier_cols.tolist() == [3]
    want = lin.weight[:, 3].detach() * split.smooth[3]
    assert torch.equal(split.outlier_weight[:, 0], want)
    assert (split.qweight[:, 3] == 0).all()


def test_smoothing_keeps_the_product_and_the_effective_weight():
    lin, x = _outlier_linear(1)
    s = smoothing_factors(x.abs().amax(0), lin.weight, 0.5)
    w = lin.weight.detach()
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    # s_j = max|X_j|^0.5 / max|W_j|^0.5, by hand for channel 3
    want = x[:, 3].abs().max() ** 0.5 / w[:, 3].abs().max() ** 0.5
    assert s[3].item() == pytest.approx(want.item(), rel=1e-5)
    # a channel never active keeps s = 1
    assert smoothing_factors(torch.zeros(64), w, 0.5).eq(1).all()
    from lmlab.model.quant import _quantize_w8a8

    mod = _quantize_w8a8(lin, x.abs().amax(0), alpha=0.5, outliers=2)
    rel = ((mod.dequantized() - w).norm() / w.norm()).item()
    assert 0 < rel < 0.01


def test_one_row_and_many_rows_agree():
    """Decoding one token and scoring many quantize each token to its own range."""
    lin, x = _outlier_linear(2)
    from lmlab.model.quant import _quantize_w8a8

    with torch.no_grad():
        mod = _quantize_w8a8(lin, x.abs().amax(0), alpha=0.5, outliers=2)
        exact = lin(x)
        batched = mod(x)
        one_by_one = torch.cat([mod(x[i : i + 1]) for i in range(len(x))])
    # the same step size per token: the grids differ only by where zero falls
    e_batch = (batched - exact).norm(dim=1) / exact.norm(dim=1)
    e_one = (one_by_one - exact).norm(dim=1) / exact.norm(dim=1)
    assert e_batch.max() < 0.02 and e_one.max() < 0.02
    assert 0.5 < (e_batch.mean() / e_one.mean()).item() < 2
    assert ((batched - one_by_one).norm() / exact.norm()).item() < 0.02


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 200, (2, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    "kw",
    [{}, {"family": "prefix", "bias": True}, {"family": "encoder_decoder", "position": "t5"}],
    ids=["decoder", "prefix", "encdec"],
)
def test_save_load_same_logits(tmp_path, kw):
    model = tiny(**kw)
    ids = torch.randint(0, 200, (2, 12))
    ref = logits(model, ids)
    quantize_model(model, "w8a8", calibration=_batches(), alpha=0.5, outliers=4)
    y = logits(model, ids)
    rel = ((y - ref).norm() / ref.norm()).item()
    print(f"w8a8 {kw}: relative logit change {rel:.4f}")
    assert 0 < rel < 0.05
    save_quantized(model, tmp_path / "q")
    spec = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert spec["method"] == "w8a8" and spec["alpha"] == 0.5 and spec["outliers"] == 4
    loaded = load_model(tmp_path / "q")
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == len(spec["modules"])
    assert torch.equal(logits(loaded, ids), y)


def test_calibration_sees_every_layer():
    model = tiny()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    stats = activation_absmax(model, names, _batches(1))
    assert set(stats) == set(names)
    assert all(v.shape == (model.get_submodule(n).in_features,) for n, v in stats.items())
    assert all((v >= 0).all() and v.max() > 0 for v in stats.values())
    with pytest.raises(UsageError, match="calibration never reached"):
        activation_absmax(model, names, [])


def test_bad_options_and_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="w8a8 needs calibration data"):
        quantize_model(tiny(), "w8a8")
    with pytest.raises(UsageError, match=r"alpha 1.5: .* \[0, 1\]"):
        quantize_model(tiny(), "w8a8", calibration=_batches(), alpha=1.5)
    with pytest.raises(UsageError, match="outliers -1"):
        quantize_model(tiny(), "w8a8", calibration=_batches(), outliers=-1)
    model = quantize_model(tiny(), "w8a8", calibration=_batches(), outliers=4)
    save_quantized(model, tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["quantization"]["outliers"] = 8  # the tensors hold 4 channels per layer
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="outlier_cols has shape"):
        load_model(tmp_path / "q")
    raw["quantization"]["outliers"] = "many"
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="outliers 'many' is not a number"):
        load_model(tmp_path / "q")


def test_quantize_a_trained_checkpoint(smoke_run, tmp_path):
    src = smoke_run / "pretrain" / "model"
    out = tmp_path / "w8a8"
    report = quantize_checkpoint(
        src, out, "w8a8", progress=False, eval_tokens=4000, calibration_tokens=2048
    )
    cal, ppl = report["calibration"], report["perplexity"]
    assert cal["data"].endswith("tokenizer/tokens (train split)") and cal["tokens"] == 2048
    print(f"smoke w8a8: perplexity {ppl['before']:.3f} -> {ppl['after']:.3f}")
    assert ppl["measured"] and 0 < abs(ppl["relative_change"]) < 0.02
    assert report["reload_max_abs_diff"] == 0.0
    assert report["int8_backend"].startswith("fbgemm" if w8a8_kernel_works() else "reference")
    assert "calibrated on 2,048 tokens" in format_report(report)
    assert isinstance(load_model(out).layers[0].self_attn.q_proj, W8A8Linear)


def test_calibration_sources(smoke_run, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(smoke_run / "pretrain" / "model", loose)
    with pytest.raises(UsageError, match="pass --calibration"):
        quantize_checkpoint(loose, tmp_path / "q", "w8a8", progress=False, measure_speed=False)
    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    report = quantize_checkpoint(
        loose,
        tmp_path / "q",
        "w8a8",
        progress=False,
        measure_speed=False,
        calibration=text,
        eval_data=text,
        eval_tokens=1000,
    )
    assert report["calibration"]["data"] == str(text)
    assert "optimistic" in report["calibration"]["warning"]
    # from the command line: no calibration data for a checkpoint outside a run → exit 2
    bad = lmlab_cmd(
        "quantize", str(loose), "--method", "w8a8", "--out", str(tmp_path / "x"), cwd=tmp_path
    )
    assert bad.returncode == 2 and "--calibration" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_loading_new_tensors_replaces_the_kernel_weights():
    """The packed FBGEMM weights are derived state: a load must not leave stale ones."""
    from lmlab.model.quant import _quantize_w8a8

    (a, x), (b, _) = _outlier_linear(3), _outlier_linear(4)
    with torch.no_grad():
        qa = _quantize_w8a8(a, x.abs().amax(0), alpha=0.5, outliers=2)
        qb = _quantize_w8a8(b, x.abs().amax(0), alpha=0.5, outliers=2)
        before = qa(x)
        qa.load_state_dict(qb.state_dict())
        assert torch.equal(qa(x), qb(x)) and not torch.equal(qa(x), before)


def test_siblings_run_as_one_product():
    """q/k/v and gate/up share smoothing and outlier channels, so one int8 product serves
    each group; the result equals each member computed alone, input by input."""
    from lmlab.model.quant import W8A8Group

    model = tiny()
    quantize_model(model, "w8a8", calibration=_batches(), outliers=4)
    groups = model.quantization["groups"]
    assert ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
            "layers.0.self_attn.v_proj"] in groups  # fmt: skip
    assert ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"] in groups
    attn = model.layers[0].self_attn
    assert isinstance(attn.q_proj._group, W8A8Group) and attn.q_proj._group is attn.v_proj._group
    assert torch.equal(attn.q_proj.smooth, attn.k_proj.smooth)
    ids_a, ids_b = torch.randint(0, 200, (2, 12)), torch.randint(0, 200, (2, 12))
    fused_a, fused_b = logits(model, ids_a), logits(model, ids_b)
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m._group, m._packed = None, None  # each member alone, its own weights again
    assert torch.allclose(logits(model, ids_a), fused_a, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits(model, ids_b), fused_b, rtol=1e-5, atol=1e-5)
    # a member called with another input computes for it (cross-attention's keys/values)
    model = quantize_model(tiny(), "w8a8", calibration=_batches(), outliers=4)
    q, k = model.layers[0].self_attn.q_proj, model.layers[0].self_attn.k_proj
    x, other = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        q(x)
        got = k(other)
        k._group, k._packed = None, None
        assert torch.allclose(got, k(other), rtol=1e-5, atol=1e-5)


def test_bad_groups_in_a_checkpoint(tmp_path):
    model = quantize_model(tiny(), "w8a8", calibration=_batches(), outliers=4)
    save_quantized(model, tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["quantization"]["groups"] = [["layers.0.self_attn.q_proj", "nope"]]
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="groups must be lists"):
        load_model(tmp_path / "q")

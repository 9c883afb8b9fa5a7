"""Post-training quantization: the number formats against hand computation, the LLM.int8
decomposition, the int8 kernels against the float path, checkpoints that load back to the
same logits, clear errors, and the perplexity cost on the trained smoke model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import CheckpointError, UsageError
from lmlab.infer.quantize import format_report, quantize_checkpoint
from lmlab.model import quant
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model
from lmlab.model.loading import load_model
from lmlab.model.quant import (
    Int4Linear,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    int8_matmul,
    llm_int8_matmul,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    save_quantized,
    unpack_int4,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **kw) -> nn.Module:
    """A random model whose linears keep the scale of their input (std 1/√d = 0.125), not
    the near-zero 0.02 init: quantization error shows, and is not amplified layer by layer."""
    cfg = {"vocab_size": 200, "n_layers": 2, "d_model": 64, "n_heads": 2, "max_seq_len": 32}
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.125 if "embed" not in name else 1.0)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.cfg.family == "encoder_decoder":
            return model(ids, ids)
        if model.cfg.family == "prefix":
            return model(ids, prefix_len=5)
        return model(ids)


# --- the number formats ------------------------------------------------------------------


def test_int8_by_hand_and_error_bound():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, -4.0, 1.0, 3.0]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    # row 0: s = 1/127; -63.5 and 31.75 round half-to-even / to nearest
    assert q[0].tolist() == [127, -64, 32, 0]
    assert q[1].tolist() == [0, 0, 0, 0] and s[1] == 1.0  # an all-zero row stays zero
    assert q[2].tolist() == [64, -127, 32, 95]  # 2·127/4 = 63.5 → 64, 3·127/4 = 95.25 → 95
    assert torch.allclose(s, torch.tensor([1 / 127, 1.0, 4 / 127]))
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q, s = quantize_int8(w)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # absmax: each row uses the full range


def test_int4_packing_exact():
    assert pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]
    q = torch.randint(0, 16, (7, 130), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 65)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_by_hand_and_error_bound():
    # one group spans -0.3..1.2 in steps of 0.1: min -0.3, scale 0.1, codes 0..15
    row = torch.arange(16) * 0.1 - 0.3
    w = torch.cat([row, row.flip(0) * 2]).view(1, 32)  # a second group, twice the range
    packed, scales, mins = quantize_int4(w, 16)
    assert scales.dtype == mins.dtype == torch.float16 and scales.shape == (1, 2)
    codes = unpack_int4(packed)[0]
    assert codes[:16].tolist() == list(range(16))
    assert codes[16:].tolist() == list(range(15, -1, -1))
    assert torch.allclose(scales.float(), torch.tensor([[0.1, 0.2]]), rtol=1e-3)
    assert torch.allclose(mins.float(), torch.tensor([[-0.3, -0.6]]), rtol=1e-3)
    # random weights: within half a step of a grid that covers each group
    w = torch.randn(48, 256) * 0.05 + torch.randn(48, 1) * 0.02
    for g in (32, 64, 128):
        packed, scales, mins = quantize_int4(w, g)
        err = (dequantize_int4(packed, scales, mins, g) - w).abs().view(48, 256 // g, g)
        assert (err <= scales.float()[..., None] / 2 * (1 + 1e-3) + 1e-7).all()
        lo = w.view(48, 256 // g, g).amin(-1)
        assert (mins.float() <= lo).all()  # rounded down, never above the group minimum


def test_group_size_trades_error_for_scales():
    w = torch.randn(64, 512) * 0.05
    errs = {}
    for g in (32, 64, 128):
        packed, scales, mins = quantize_int4(w, g)
        errs[g] = (dequantize_int4(packed, scales, mins, g) - w).pow(2).mean().item()
    assert errs[32] < errs[64] < errs[128]  # smaller groups: a tighter range per scale


def test_packed_size():
    model = tiny()
    fp = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(model, "int4", group_size=32)
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            n, k = m.out_features, m.in_features
            assert m.qweight.numel() * m.qweight.element_size() == fp[name] // 8  # 4 bits
            assert m.quantized_bytes() == n * k // 2 + 2 * 2 * n * (k // 32)  # + fp16 scale, min
    q_bytes = sum(m.quantized_bytes() for m in model.modules() if isinstance(m, Int4Linear))
    fp_bytes = sum(v for k, v in fp.items() if k != "lm_head")
    assert q_bytes / fp_bytes == pytest.approx(5 / 32)  # 4 bits + 2 × 16 bits per 32 weights


# --- LLM.int8 ----------------------------------------------------------------------------


def test_llm_int8_outlier_columns_exact():
    torch.manual_seed(0)
    w = torch.randn(40, 64) * 0.1
    q, s = quantize_int8(w)
    x = (torch.randn(5, 64) * 0.5).clamp(-3, 3)
    x[1, 3], x[4, 17], x[0, 17] = 20.0, -30.0, 8.0
    y, cols = llm_int8_matmul(x, q, s, threshold=6.0)
    assert cols.tolist() == [3, 17]
    # by hand: outlier columns in float64 against the dequantized weight columns, the rest
    # row-wise int8 with an integer accumulation, rescaled by both scales
    deq = q.double() * s.double()[:, None]
    regular = x.double().clone()
    regular[:, [3, 17]] = 0
    sx = regular.abs().amax(1, keepdim=True) / 127
    xq = torch.round(regular / sx).clamp(-127, 127)
    hand = (xq.long() @ q.long().t()).double() * sx * s.double()[None, :]
    hand += x.double()[:, [3, 17]] @ deq[:, [3, 17]].t()
    assert torch.allclose(y.double(), hand, rtol=1e-5, atol=1e-5)
    # an input made only of outlier features is multiplied entirely in float
    only = torch.zeros(2, 64)
    only[:, [3, 17]] = torch.tensor([[10.0, -7.0], [12.0, 9.0]])
    y_only, _ = llm_int8_matmul(only, q, s, threshold=6.0)
    assert torch.allclose(y_only.double(), only.double() @ deq.t(), rtol=1e-6, atol=1e-6)
    # close to the float matmul; and the activation part of the error is far smaller than
    # with one int8 scale per row, which the outliers stretch (step 30/127 for values ~0.5)
    ref = x @ w.t()
    assert (y - ref).norm() / ref.norm() < 0.01
    plain, none = llm_int8_matmul(x, q, s, threshold=float("inf"))
    assert none.numel() == 0
    ref_q = (x.double() @ deq.t()).float()
    err, err_plain = (y - ref_q).norm() / ref_q.norm(), (plain - ref_q).norm() / ref_q.norm()
    print(f"activation error: LLM.int8 {err:.4f}, one int8 scale per row {err_plain:.4f}")
    assert err_plain > 5 * err


def test_int8_matmul_exact_over_chunks():
    torch.manual_seed(1)
    a = torch.randint(-127, 128, (9, 2500), dtype=torch.int8)  # K spans three float chunks
    b = torch.full((6, 2500), 127, dtype=torch.int8)
    b[1:] = torch.randint(-127, 128, (5, 2500), dtype=torch.int8)
    a[0] = 127  # row 0 · row 0 = 2500·127² > 2^24: a single float32 matmul would round
    ref = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(int8_matmul(a, b, kernel=False), ref)
    assert torch.equal(int8_matmul(a, b, kernel=True), ref)  # torch._int_mm


def test_int8_kernel_matches_dequant():
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        pytest.skip("this torch has no _weight_int8pack_mm")
    assert quant.int8_kernel_works()
    model = quantize_model(tiny(bias=True), "int8")
    ids = torch.randint(0, 200, (2, 16))
    try:
        quant.set_int8_backend("kernel")
        assert quant.int8_backend_name() == "kernel"
        y_kernel = logits(model, ids)
        quant.set_int8_backend("dequant")
        y_deq = logits(model, ids)
    finally:
        quant.set_int8_backend("auto")
    assert torch.allclose(y_kernel, y_deq, rtol=1e-4, atol=1e-4)
    lin = model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, lin.in_features)
    assert torch.allclose(lin(x), x @ lin.dequantized().t() + lin.bias, atol=1e-5)


# --- whole models and checkpoints --------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"family": "prefix", "bias": True},
        {"family": "encoder_decoder", "position": "t5"},
        {"n_experts": 4, "experts_top_k": 2},
    ],
    ids=["decoder", "prefix", "encdec", "moe"],
)
@pytest.mark.parametrize("method", ["int8", "int4", "llm_int8"])
def test_save_load_same_logits(tmp_path, method, kw):
    model = tiny(**kw)
    ids = torch.randint(0, 200, (2, 12))
    ref = logits(model, ids)
    quantize_model(model, method, group_size=32)
    y = logits(model, ids)
    rel = ((y - ref).norm() / ref.norm()).item()
    print(f"{method} {kw}: relative logit change {rel:.4f}")
    # changed, and not by much (an MoE model can flip an expert choice: a larger jump)
    assert 0 < rel < (0.3 if method == "int4" or "n_experts" in kw else 0.05)
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert torch.equal(logits(loaded, ids), y)
    # what stays in full precision
    assert type(loaded.lm_head) is nn.Linear and type(loaded.embed_tokens) is nn.Embedding
    routers = [m for n, m in loaded.named_modules() if n.endswith("router")]
    assert all(type(r) is nn.Linear for r in routers) and bool(routers) == ("n_experts" in kw)
    plain = [n for n, m in loaded.named_modules() if type(m) is nn.Linear]
    assert set(plain) == {"lm_head", *(n for n in plain if n.endswith("router"))}


def test_include_lm_head_with_tied_embeddings(tmp_path):
    model = tiny()
    assert model.cfg.tie_embeddings
    embed = model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 200, (2, 12))
    quantize_model(model, "int4", group_size=64, include_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.embed_tokens.weight, embed)  # the embedding stays exact
    y = logits(model, ids)
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert cfg["include_lm_head"] and "lm_head" in cfg["modules"]
    assert torch.equal(logits(load_model(tmp_path / "q"), ids), y)


def test_bad_options():
    with pytest.raises(UsageError, match="method 'int3': allowed int8, int4, llm_int8"):
        quantize_model(tiny(), "int3")
    with pytest.raises(UsageError, match="group size 48: int4 groups hold 32, 64, 128"):
        quantize_model(tiny(), "int4", group_size=48)
    with pytest.raises(
        UsageError,
        match=r"group size 128 does not divide the input dimension 64 of "
        r"layers\.0\.self_attn\.q_proj .*fit this model: 32, 64$",
    ):
        quantize_model(tiny(), "int4", group_size=128)
    with pytest.raises(UsageError, match="threshold -1"):
        quantize_model(tiny(), "llm_int8", threshold=-1)
    model = quantize_model(tiny(), "int8")
    with pytest.raises(UsageError, match="already quantized"):
        quantize_model(model, "int4")
    with pytest.raises(UsageError, match="int8 backend 'fast'"):
        quant.set_int8_backend("fast")


def _edit_config(ckpt, **changes) -> None:
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization"].update(changes)
    path.write_text(json.dumps(cfg))


def test_corrupt_quantized_checkpoints(tmp_path):
    good = tmp_path / "good"
    save_quantized(quantize_model(tiny(), "int4", group_size=64), good)
    load_model(good)

    def copy(name: str):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = copy("method")
    _edit_config(d, method="int2")
    with pytest.raises(CheckpointError, match="method 'int2' is not one of int8, int4, llm_int8"):
        load_model(d)
    d = copy("module")
    _edit_config(d, modules=["layers.9.mlp.up_proj"])
    with pytest.raises(CheckpointError, match="'layers.9.mlp.up_proj' is not in this model"):
        load_model(d)
    d = copy("group")  # the file holds group-64 scales, config.json says 32
    _edit_config(d, group_size=32)
    with pytest.raises(
        CheckpointError, match=r"q_proj.scales has shape \[64, 1\], the model needs \[64, 2\]"
    ):
        load_model(d)
    state = load_file(str(good / "model.safetensors"))
    key = "layers.0.mlp.up_proj.qweight"
    d = copy("dtype")
    save_file({**state, key: state[key].float()}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} is float32, a int4 checkpoint stores uint8"):
        load_model(d)
    d = copy("missing")
    save_file({k: v for k, v in state.items() if k != key}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(d)
    d = copy("truncated")
    (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(d)


# --- checkpoints of a trained model ------------------------------------------------------


def test_perplexity_on_trained_checkpoint(smoke_run, tmp_path):
    src = smoke_run / "pretrain" / "model"
    limits = {("int8", 64): 0.01, ("int4", 64): 0.05, ("llm_int8", 64): 0.01}
    weight_err = {}
    for (method, g), limit in limits.items():
        out = tmp_path / f"{method}-{g}"
        report = quantize_checkpoint(src, out, method, group_size=g, progress=False)
        ppl = report["perplexity"]
        print(
            f"smoke {method} g{g}: perplexity {ppl['before']:.3f} -> {ppl['after']:.3f} "
            f"({100 * ppl['relative_change']:+.3f}%)"
        )
        assert ppl["measured"] and ppl["data"].endswith("tokenizer/tokens")
        assert 0 <= abs(ppl["relative_change"]) < limit
        assert ppl["after"] != ppl["before"]
        assert report["disk_bytes"]["after"] < report["disk_bytes"]["before"]
        assert report["memory_bytes"]["after"] < report["memory_bytes"]["before"]
        assert report["reload_max_abs_diff"] == 0.0
        assert report["decode_tokens_per_s"]["after"] > 0
        assert json.loads((out / "quantization.json").read_text()) == json.loads(json.dumps(report))
        assert (out / "tokenizer.json").is_file()
        assert "perplexity" in format_report(report)
        q = report["quantized_weight_bytes"]
        assert q["after"] / q["before"] < (0.15 if method == "int4" else 0.27)
        weight_err[method] = report["weight_relative_error"]
    # the same int8 weights for both 8-bit methods; 4 bits err ~16× more (15 vs 254 steps)
    assert weight_err["int8"] == weight_err["llm_int8"]
    assert 8 * weight_err["int8"] < weight_err["int4"] < 0.2
    assert isinstance(load_model(tmp_path / "int4-64").layers[0].mlp.up_proj, Int4Linear)


def test_checkpoint_outside_a_run(smoke_run, tmp_path):
    src = tmp_path / "loose"
    shutil.copytree(smoke_run / "pretrain" / "model", src)
    report = quantize_checkpoint(src, tmp_path / "q", "int8", progress=False, measure_speed=False)
    assert not report["perplexity"]["measured"]
    assert "not inside a run directory" in report["perplexity"]["reason"]
    assert "not measured" in format_report(report)
    tokens = smoke_run / "tokenizer" / "tokens"
    report = quantize_checkpoint(
        src,
        tmp_path / "q",
        "int8",
        eval_data=tokens,
        eval_tokens=2000,
        progress=False,
        measure_speed=False,
        overwrite=True,
    )
    assert report["perplexity"]["measured"] and report["perplexity"]["tokens"] <= 2000
    report = quantize_checkpoint(  # a run directory names its held-out shards too
        src,
        tmp_path / "q",
        "int8",
        eval_data=smoke_run,
        eval_tokens=2000,
        progress=False,
        measure_speed=False,
        overwrite=True,
    )
    assert report["perplexity"]["data"] == str(tokens)
    with pytest.raises(UsageError, match="refusing to replace it"):
        quantize_checkpoint(src, smoke_run, "int8", progress=False)
    with pytest.raises(UsageError, match="would replace the checkpoint"):
        quantize_checkpoint(src, src, "int8", progress=False)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "q2", "int4", progress=False)
    with pytest.raises(UsageError, match="eval data must be a token-shard directory"):
        quantize_checkpoint(src, tmp_path / "q3", "int8", eval_data=tmp_path, progress=False)

"""The compiled decode step: `decode_step` over a per-layer static cache equals the model's
own forward step by step (left padding, grouped-query attention, parallel residual), and
`generate(compile=True)` under torch.compile gives the eager tokens for a float and a w8a8
model while rows leave the batch. Models it cannot serve are refused by name."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from torch import nn

import lmlab.infer.engine as engine
import lmlab.model.quant as quant
from lmlab.errors import UsageError
from lmlab.infer.engine import Runner
from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.model.transformer import KVCache, decode_step

from .conftest import lmlab_cmd
from .test_quant import logits, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 150]]  # left padding for row 0


def _w8a8(model: nn.Module, outliers: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 200, (2, 16), generator=g) for _ in range(3)]
    return quant.quantize_model(model, "w8a8", calibration=calib, outliers=outliers)


def _steps(model, compile: bool, n: int = 6) -> list[torch.Tensor]:
    runner = Runner(model, n, compile=compile)
    out = [runner.prefill(PROMPTS)]
    for _ in range(n - 1):
        out.append(runner.step(out[-1].argmax(-1)))
    return out


@pytest.mark.parametrize(
    "kw",
    [{}, {"n_heads": 4, "n_kv_heads": 2}, {"parallel_residual": True, "activation": "gelu"}],
    ids=["mha", "gqa", "parallel"],
)
def test_decode_step_equals_the_forward(monkeypatch, kw):
    """`decode_step` run eagerly (the function torch.compile receives) against the model's
    own cached forward: the same logits at every step, padding included."""
    model = tiny(**kw)
    ref = _steps(model, compile=False)
    monkeypatch.setattr(engine, "_compiled_decode_step", decode_step)
    got = _steps(model, compile=True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_per_layer_cache_behaves_as_the_stacked_one():
    cfg = tiny().cfg
    stacked, layered = KVCache.empty(cfg, 3, 10), KVCache.empty(cfg, 3, 10, per_layer=True)
    assert layered.capacity == stacked.capacity == 10
    assert layered.nbytes() == stacked.nbytes()
    k, v = torch.randn(3, cfg.n_kv_heads, 4, cfg.head_dim), torch.randn(3, cfg.n_kv_heads, 4, 32)
    for cache in (stacked, layered):
        cache.advance(2)
        ks, vs = cache.update(1, k, v)
        assert ks.shape[2] == 6 and torch.equal(ks[:, :, 2:], k) and torch.equal(vs[:, :, 2:], v)
        cache.select(torch.tensor([2, 0]))
    assert torch.equal(layered.k[1], stacked.k[1]) and len(layered.k) == cfg.n_layers


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "w8a8"])
def test_compiled_generation_gives_the_eager_tokens(quantized):
    """torch.compile for real (fullgraph: a graph break fails the test). The first row stops
    early on a stop id, so the batch shrinks and the step recompiles for the new shape."""
    model = tiny(seed=3)
    if quantized:
        model = _w8a8(model)
    ref = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    stop = ref[0].tokens[2]
    assert stop not in ref[1].tokens[:3]
    eager = generate_batch(model, PROMPTS, GenerationConfig(max_new_tokens=8, stop_ids=[stop]))
    cfg = GenerationConfig(max_new_tokens=8, stop_ids=[stop], compile=True)
    compiled = generate_batch(model, PROMPTS, cfg)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    assert len(compiled[0].tokens) < len(compiled[1].tokens)


def test_compiled_w8a8_step_reads_only_what_it_multiplies_by(monkeypatch):
    """Each tensor the compiled step reads is guarded, and the guards run on every call;
    the int8 weights and scales live in FBGEMM's packed form, so the step must not read
    them (nor the outlier channels of a model without any)."""
    if not quant.w8a8_kernel_works():
        pytest.skip("FBGEMM's int8 kernel does not run on this CPU")
    torch._dynamo.reset()
    guarded: list[str] = []

    def export(guards) -> None:
        guarded.extend(g.name for g in guards)

    model = _w8a8(tiny(seed=3), outliers=0)
    step = torch._dynamo.optimize("eager", nopython=True, guard_export_fn=export)(decode_step)
    monkeypatch.setattr(engine, "_compiled_decode_step", step)
    runner = Runner(model, 4, compile=True)
    runner.step(runner.prefill(PROMPTS[:1]).argmax(-1))
    assert any("layers" in n for n in guarded), "the step was not compiled"
    read = {n for n in guarded if any(k in n for k in ("qweight", "outlier", "'scale'"))}
    assert not read, sorted(read)[:3]
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "kw, why",
    [
        ({"position": "alibi"}, "RoPE or no positions"),
        ({"family": "encoder_decoder", "position": "t5"}, "decoder-only"),
        ({"sliding_window": 4}, "sliding-window"),
    ],
)
def test_models_the_compiled_step_cannot_serve_are_refused(kw, why):
    with pytest.raises(UsageError, match=why):
        generate_batch(tiny(**kw), [[1, 2, 3]], GenerationConfig(compile=True))


def test_fused_projections_step_aside_for_a_replaced_member():
    """Attention runs q/k/v as one w8a8 product only while the projections are the group's
    own: an adapter wrapped around one of them must be called, not bypassed."""
    model = _w8a8(tiny())
    ids = torch.randint(0, 200, (2, 8))
    before = logits(model, ids)

    class Shifted(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1.0

    attn = model.layers[0].self_attn
    attn.q_proj = Shifted(attn.q_proj)
    assert not torch.allclose(logits(model, ids), before)
    attn.q_proj = attn.q_proj.inner
    assert torch.equal(logits(model, ids), before)


def test_kernel_handles_are_released_with_their_model():
    model = _w8a8(tiny())
    logits(model, torch.randint(0, 200, (1, 4)))  # packs the weights: handles registered
    handles = {m._handle for m in model.modules() if isinstance(m, quant.W8A8Linear)}
    handles |= {m._group._handle for m in model.modules() if getattr(m, "_group", None)}
    handles.discard(0)
    if not quant.w8a8_kernel_works():
        pytest.skip("no FBGEMM kernel here: nothing is packed")
    assert handles and handles <= set(quant._PACKED)
    del model
    gc.collect()
    assert not handles & set(quant._PACKED)


def test_bench_infer_compiled_from_the_command_line(smoke_run, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "infer", str(smoke_run), "--batch", "2", "--prompt-len", "8"]
    args += ["--new-tokens", "4", "--repeats", "1", "--compile", "--json", str(out)]
    p = lmlab_cmd(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "compiled decode step" in p.stdout
    report = json.loads(out.read_text())
    assert report["compiled"] and report["results"][0]["warmup_s"] > 0

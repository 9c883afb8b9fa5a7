"""`lmlab guide cost`: its FLOPs and bytes are `lmlab model info`'s, its formulas give the
hand-computed numbers, and its bounds sit below lmlab's measured prefill and decode here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.guide.cost import Hardware, Workload, estimate, measure
from lmlab.model.config import ModelConfig
from tests.conftest import lmlab_here

pytestmark = pytest.mark.usefixtures("one_thread")

SAME = ("parameters", "forward_flops_per_token", "training_flops_per_token", "context",
        "kv_cache_bytes_per_token_16bit", "weights_bytes_16bit")  # fmt: skip


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=128, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                       ffn_hidden=128, max_seq_len=256)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    return str(save_checkpoint(model, tmp_path_factory.mktemp("cost") / "ckpt"))


def _json(monkeypatch, capsys, *args: str) -> dict:
    code, out, err = lmlab_here(monkeypatch, capsys, *args)
    assert code == 0, err
    return json.loads(out)


def _same_as_model_info(monkeypatch, capsys, target: list[str], extra: list[str]) -> dict:
    """The cost report for prompt 100 + output 28 against `model info --seq-len 128`."""
    cost = _json(monkeypatch, capsys, "guide", "cost", *target, *extra, "--prompt-tokens", "100",
                 "--output-tokens", "28", "--json", "--train-tokens", "1000")  # fmt: skip
    info = _json(monkeypatch, capsys, "model", "info", *target, "--seq-len", "128",
                 "--json")  # fmt: skip
    full = _json(monkeypatch, capsys, "model", "info", *target, "--json")
    for key in SAME:
        assert cost["model"][key] == info[key], key
    assert cost["model"]["config"] == info["config"]
    assert cost["memory"]["bf16"]["weights_bytes"] == info["weights_bytes_16bit"]
    assert cost["memory"]["int8"]["weights_bytes"] == info["parameters"]
    assert cost["memory"]["bf16"]["kv_cache_bytes"] == 128 * info["kv_cache_bytes_per_token_16bit"]
    assert cost["training"]["flops"] == 1000 * full["training_flops_per_token"]
    return cost


def test_preset_at_a_size_matches_model_info(monkeypatch, capsys):
    preset = ["llama", "--size", "20M"]
    cost = _same_as_model_info(monkeypatch, capsys, preset, ["--hardware", "h100-sxm"])
    assert cost["hardware"]["peak_flops"] == 989e12
    assert cost["decode"]["bound"] == "memory"  # batch 1 decode reads all weights per token


def test_checkpoint_matches_model_info_and_bounds_hold_when_measured(
    monkeypatch, capsys, checkpoint
):
    """The bounds use this machine's measured peak matmul and bandwidth (each the best of
    several timings), so lmlab's real prefill and decode steps cannot beat them."""
    here = ["--hardware", "this", "--precision", "fp32", "--measure"]
    cost = _same_as_model_info(monkeypatch, capsys, [checkpoint], here)
    m = cost["measured"]
    assert m["precision"] == "fp32"
    assert m["prefill_s"] >= m["prefill_bound_s"] > 0
    assert m["decode_step_s"] >= m["decode_step_bound_s"] > 0
    assert m["prefill_ratio"] >= 1 and m["decode_ratio"] >= 1


def test_bounds_hold_at_a_larger_batch(checkpoint):
    from lmlab.model.loading import load_model

    m = measure(load_model(checkpoint), prompt_tokens=32, new_tokens=8, batch=4, repeats=2)
    assert m["workload"]["batch"] == 4
    assert m["prefill_s"] >= m["prefill_bound_s"]
    assert m["decode_step_s"] >= m["decode_step_bound_s"]


def test_hand_computed_numbers():
    """2 layers, d 64, 4 heads of 16 (2 KV heads), SwiGLU 128, vocabulary 128, tied:
    82,240 parameters; forward FLOPs per token at context t = 163,840 + 512·t; KV cache
    2·2·2·16 = 128 values per token. A made-up device: 1 GFLOP/s, 1 MB/s."""
    cfg = tiny_config()
    hw = Hardware("made up", {"bf16": 1e9}, 1e6, 1e6, "test")
    r = estimate(cfg, Workload(prompt_tokens=4, output_tokens=3, requests=5, batch=2), hw,
                 "bf16", train_tokens=1000, mfu=0.5, price_per_hour=36.0)  # fmt: skip
    assert r["model"]["parameters"] == 82_240
    assert r["model"]["forward_flops_per_token"] == 163_840 + 512 * 7
    # prefill: 2 rows × (Σ_{t=1..4} f(t) − 3 LM heads of 2·128·64) FLOPs; bytes: bf16
    # weights once + 2 rows × 4 tokens × 256 bytes of keys/values
    assert r["prefill"]["flops"] == 2 * (4 * 163_840 + 512 * 10 - 3 * 16_384) == 1_222_656
    assert r["prefill"]["bytes"] == 164_480 + 2_048
    assert r["prefill"]["bound_s"] == pytest.approx(0.166528)
    assert r["prefill"]["bound"] == "memory"
    # decode steps at context 5 and 6 read the weights and 2 rows × 4 (then 5) cached tokens
    assert r["decode"]["steps"] == 2
    assert r["decode"]["total_s"] == pytest.approx((164_480 + 2_048) / 1e6 + 167_040 / 1e6)
    assert r["decode"]["step_bound_s"] == pytest.approx(0.166784)
    assert r["totals"]["batches"] == 3
    assert r["totals"]["seconds"] == pytest.approx(3 * 0.500096)
    assert r["totals"]["cost"] == pytest.approx(3 * 0.500096 / 100)
    assert r["memory"]["bf16"] == {"weights_bytes": 164_480, "kv_cache_bytes": 2 * 7 * 256,
                                   "total_bytes": 168_064, "fits": True}  # fmt: skip
    assert r["memory"]["int4"]["weights_bytes"] == 41_120
    # training: 1000 tokens × 3 × f(256) at 50% of 1 GFLOP/s
    assert r["training"]["flops"] == 1000 * 3 * (163_840 + 512 * 256) == 884_736_000
    assert r["training"]["seconds"] == pytest.approx(1.769472)
    assert r["training"]["flops_6nd"] == 6 * 82_240 * 1000


def test_sliding_window_sum_matches_the_accounting():
    """The prefill's closed-form sum equals summing `flops_per_token` position by position."""
    cfg = ModelConfig(vocab_size=128, n_layers=4, d_model=64, n_heads=4, sliding_window=8,
                      sliding_window_every=2, max_seq_len=64)  # fmt: skip
    hw = Hardware("made up", {"fp32": 1e9}, 1e9, None, "test")
    r = estimate(cfg, Workload(prompt_tokens=20, output_tokens=2), hw, "fp32")
    head = 2 * cfg.padded_vocab_size * cfg.d_model
    want = sum(cfg.flops_per_token(t, training=False) for t in range(1, 21)) - 19 * head
    assert r["prefill"]["flops"] == want
    assert r["memory"]["fp32"]["fits"] is None


def test_text_report(monkeypatch, capsys):
    code, out, err = lmlab_here(monkeypatch, capsys, "guide", "cost", "llama", "--size", "7B",
                                "--hardware", "a100-80gb", "--price-per-hour", "2")  # fmt: skip
    assert code == 0, err
    assert "NVIDIA A100 SXM 80GB" in out and "decode bound" in out and "cost" in out
    assert math.isfinite(float(out.split("fp32: weights")[1].split()[0]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hardware", "tpu-v9"], "hardware 'tpu-v9'"),
        (["--prompt-tokens", "-5"], "prompt-tokens must be >= 1"),
        (["--output-tokens", "0"], "output-tokens must be >= 1"),
        (["--precision", "fp8"], "precision 'fp8'"),
        (["--mfu", "1.5"], "mfu must be in (0, 1]"),
        (["--train-tokens", "-1"], "train-tokens must be >= 0"),
    ],
)
def test_bad_input_exits_2(monkeypatch, capsys, args, message):
    code, out, err = lmlab_here(monkeypatch, capsys, "guide", "cost", "llama", "--size", "1M",
                                "--hardware", "l4", *args)  # fmt: skip
    assert code == 2
    assert message in out + err


def test_catalog_entry_is_a_preset_at_its_size(monkeypatch, capsys):
    from lmlab.guide.catalog import find, load_catalog

    entry = find(load_catalog(), "GPT-3")
    cost = _json(monkeypatch, capsys, "guide", "cost", "--catalog", "gpt-3", "--hardware",
                 "h100-sxm", "--json")  # fmt: skip
    info = _json(monkeypatch, capsys, "model", "info", entry.preset or "llama", "--size",
                 f"{entry.size_b:g}B", "--json")  # fmt: skip
    assert cost["model"]["config"] == info["config"]
    assert cost["model"]["parameters"] == info["parameters"]
    if cost["training"]["tokens_default"] is None:  # the entry states its training tokens
        assert str(round(cost["training"]["tokens"] / 1e9)) in entry.pretrain_data
    assert any("GPT-3" in n for n in cost["notes"])


@pytest.mark.parametrize(
    "args",
    [["--catalog", "no-such-model"], ["llama", "--catalog", "GPT-3"], [], ["no-such-preset"]],
)
def test_bad_model_exits_2(monkeypatch, capsys, args):
    code, out, err = lmlab_here(monkeypatch, capsys, "guide", "cost", *args, "--hardware", "l4")
    assert code == 2, out + err

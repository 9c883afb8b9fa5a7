"""`lmlab model info` / `lmlab model presets` and presets in recipes, as a user meets them."""

from __future__ import annotations

import json

import torch

from lmlab import load_model, load_tokenizer
from lmlab.errors import UsageError
from lmlab.model.presets import PRESETS
from lmlab.run.recipe import load_recipe

from .conftest import lmlab_cmd, lmlab_in

here = lmlab_in  # `lmlab ARGS` in this process, from a directory


def test_model_info_prints_architecture_and_costs(tmp_path, monkeypatch, capsys):
    # in this process (quicker); the real process of `model info` is checked below and in
    # test_export_convert_and_info_through_the_cli
    code, out, err = here(
        monkeypatch, capsys, tmp_path, "model", "info", "llama", "--size", "10M", "--json"
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["config"]["preset"] == "llama"
    assert abs(info["non_embedding_parameters"] - 10e6) < 1.5e6
    assert info["training_flops_per_token"] == 3 * info["forward_flops_per_token"]
    assert info["kv_cache_bytes_per_token_16bit"] == 2 * 6 * 6 * 64 * 2
    code, out, err = here(
        monkeypatch, capsys, tmp_path, "model", "info", "switch", "--layers", "2", "--width", "128"
    )
    assert code == 0
    text = out + err
    assert "active per token" in text and "T5 relative buckets" in text


def test_model_presets_lists_every_preset(tmp_path):
    p = lmlab_cmd("model", "presets", cwd=tmp_path, check=True)
    text = p.stdout + p.stderr
    for name in PRESETS:
        assert name in text


def test_model_info_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    # a real process: exit status 2 and no traceback on its stderr
    p = lmlab_cmd("model", "info", "llama", "--set", "norm=batchnorm", cwd=tmp_path)
    assert p.returncode == 2 and "norm" in p.stderr and "Traceback" not in p.stderr
    # the other bad inputs take the same path: in this process (quicker)
    code, _, err = here(monkeypatch, capsys, tmp_path, "model", "info", "gpt5")
    assert code == 2 and "neither a preset" in err
    code, _, err = here(monkeypatch, capsys, tmp_path, "model", "info", "llama", "--size", "lots")
    assert code == 2 and "parameter count" in err


def test_recipe_model_presets_resolve_and_report_bad_keys():
    r = load_recipe("smoke", ["model.preset=bloom"])
    assert r.model.position == "alibi" and r.model.embed_norm and r.model.n_layers == 2
    r = load_recipe("smoke", ["model.preset=llama", "model.size=1M"])
    assert r.model.preset == "llama" and r.model.n_layers > 2
    # a resolved recipe (as results.json stores it) loads back to the same model
    stored = {k: v for k, v in r.resolved()["model"].items() if k != "vocab_size"}
    again = load_recipe("smoke", [f"model={json.dumps(stored)}"])
    assert again.model == r.model
    for bad, needle in (
        ("model.preset=gpt5", "unknown preset"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.layers=0", "positive integer"),
    ):
        try:
            load_recipe("smoke", [bad])
        except UsageError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_pretrain_with_a_prefix_deepnorm_preset_trains_saves_loads_and_generates(
    tmp_path, monkeypatch, capsys
):
    """GLM's choices (prefix decoder, post-LN DeepNorm, GeGLU, biases) through the real
    stage: the checkpoint reloads to identical logits and generates."""
    lmlab_cmd("pretrain", "smoke", "--set", "model.preset=glm", "--quiet", cwd=tmp_path, check=True)
    ckpt = tmp_path / "runs/smoke/pretrain/model"
    cfg = json.loads((ckpt / "config.json").read_text())["model"]
    assert cfg["preset"] == "glm" and cfg["family"] == "prefix" and cfg["deepnorm"]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    x = torch.tensor([tok.encode("def main():").ids])
    assert torch.equal(model(x), load_model(ckpt)(x))
    # the stage ran in a real process above; `generate` runs in this one (quicker)
    args = ("generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "5")
    code, out, err = here(monkeypatch, capsys, tmp_path, *args)
    assert code == 0 and out.startswith("def "), err


def test_export_convert_and_info_through_the_cli(smoke_run, tmp_path):
    """A trained run -> HF directory -> lmlab checkpoint, by the commands a user types."""
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    lmlab_cmd(
        "export", str(smoke_run), "--to", "hf", "--out", str(hf_dir), cwd=tmp_path, check=True
    )
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"
    info = json.loads(
        lmlab_cmd("model", "info", str(hf_dir), "--json", cwd=tmp_path, check=True).stdout
    )
    ours = json.loads(
        lmlab_cmd("model", "info", str(smoke_run), "--json", cwd=tmp_path, check=True).stdout
    )
    assert info["non_embedding_parameters"] == ours["non_embedding_parameters"]
    lmlab_cmd("convert", "--from-hf", str(hf_dir), "--out", str(back), cwd=tmp_path, check=True)
    tok = load_tokenizer(back)
    x = torch.tensor([tok.encode("import os").ids])
    torch.testing.assert_close(load_model(back)(x), load_model(smoke_run)(x), rtol=0, atol=0)
    p = lmlab_cmd(
        "export", str(smoke_run), "--to", "onnx", "--out", str(tmp_path / "g"), cwd=tmp_path
    )
    assert p.returncode == 2 and "unknown format" in p.stderr

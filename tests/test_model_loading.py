"""The loader registry: every on-disk form is read by exactly one registered reader, a run
directory stands for its newest model, and a form registered from outside the dispatcher
is dispatched to."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmlab.errors import CheckpointError, UsageError
from lmlab.model import loading
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.hf import export_to_hf
from lmlab.model.loading import find_format, load_model, register_format, resolve_checkpoint
from lmlab.model.quant import quantize_model, save_quantized
from lmlab.model.transformer import Transformer


def tiny() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, max_seq_len=16)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """One directory of each form lmlab reads today, and the model they were written from."""
    root = tmp_path_factory.mktemp("forms")
    model = tiny()
    save_checkpoint(model, root / "lmlab")
    save_quantized(quantize_model(tiny(), "int8"), root / "quantized")
    export_to_hf(root / "lmlab", root / "huggingface", family="llama", tokenizer=False)
    return root, model


def test_each_form_has_exactly_one_reader(forms):
    root, _ = forms
    for name in ("lmlab", "quantized", "huggingface"):
        claims = [f.name for f in loading.formats() if f.detect(root / name)]
        assert claims == [name]


def test_every_form_loads_to_the_same_function(forms):
    root, model = forms
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(load_model(root / "lmlab")(ids), want)
        torch.testing.assert_close(load_model(root / "huggingface")(ids), want)
        quantized = load_model(root / "quantized")
        assert quantized.quantization["method"] == "int8"
        assert (quantized(ids) - want).abs().max() < 0.05


def test_a_run_directory_stands_for_its_newest_model(forms, tmp_path):
    root, _ = forms
    run = tmp_path / "run"
    shutil.copytree(root / "lmlab", run / "pretrain" / "model")
    assert resolve_checkpoint(run) == run / "pretrain" / "model"
    shutil.copytree(root / "quantized", run / "sft" / "model")
    fmt, where = find_format(run)
    assert (fmt.name, where) == ("quantized", run / "sft" / "model")


def test_paths_no_form_reads(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_model(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_model(tmp_path)


def test_a_registered_form_is_dispatched_to(forms, tmp_path):
    """What a new module in `lmlab.model.formats` does: register, and be found."""
    root, model = forms
    (tmp_path / "model.toy").write_text(json.dumps({"from": str(root / "lmlab")}))

    def detect(path):
        return (path / "model.toy").is_file()

    def read(path, device):
        return load_model(json.loads((path / "model.toy").read_text())["from"], device)

    register_format("toy", detect, read)
    try:
        ids = torch.arange(8)[None]
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path)(ids), model(ids))
    finally:
        del loading.FORMATS["toy"]
    with pytest.raises(UsageError, match="not a checkpoint"):
        load_model(tmp_path)

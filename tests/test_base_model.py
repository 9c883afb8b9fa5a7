"""Recipes that start from a real model (`base_model:`): its tokenizer, its chat template
in instruction tuning, pre-training skipped, and the run's cache keys."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from lmlab.errors import UsageError
from lmlab.run.recipe import load_recipe
from lmlab.tokenizer import (
    EOS,
    PAD,
    end_of_text_id,
    format_chat,
    load_tokenizer,
    pad_id,
    special_id,
)
from lmlab.tokenizer.chat import encode_exchange
from lmlab.tokenizer.train import train_bpe
from tests.conftest import SMOLLM, lmlab_cmd, needs_smollm

QUESTION = [{"role": "user", "content": "What does `os.path.join` do?"}]


def test_recipe_checks_base_model_before_any_work(tmp_path):
    assert load_recipe("smollm2").base_model == "smollm2-135m-instruct"
    assert load_recipe("smoke").base_model is None
    with pytest.raises(UsageError, match="base_model: variants compare"):
        load_recipe("smollm2", ["variants.small.n_layers=2"])
    with pytest.raises(UsageError, match="base_model: empty"):
        load_recipe("smoke", ['base_model=""'])
    p = lmlab_cmd("run", "smoke", "--set", "base_model=no-such-model", cwd=tmp_path)
    assert p.returncode == 2
    assert "no-such-model: no such checkpoint" in p.stderr
    assert not (tmp_path / "runs" / "smoke").exists()  # refused before the data stage


def test_lmlab_tokenizers_encode_an_exchange_as_before():
    """lmlab's own template: the prompt as format_chat renders it, the reply and <|end|>."""
    tok = train_bpe([f"def f{i}(x): return x + {i}" for i in range(100)], vocab_size=300)
    prompt, reply = encode_exchange(tok, QUESTION, "Join paths.")
    assert prompt == tok.encode(format_chat(QUESTION)).ids
    assert reply == tok.encode("Join paths.").ids + [special_id(tok, "<|end|>")]
    assert end_of_text_id(tok) == special_id(tok, EOS) and pad_id(tok) == special_id(tok, PAD)


@needs_smollm
def test_a_real_models_exchange_is_in_its_own_template():
    tok = load_tokenizer(SMOLLM)
    prompt, reply = encode_exchange(tok, QUESTION, "Join paths.")
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.decode(reply, skip_special_tokens=False) == "Join paths.<|im_end|>\n"
    assert end_of_text_id(tok) == tok.token_to_id("<|endoftext|>")
    assert isinstance(pad_id(tok), int)


@needs_smollm
def test_a_run_from_a_store_model_skips_pretraining(tmp_path, monkeypatch):
    """The smoke recipe from SmolLM2 by its store name: its tokenizer and weights become the
    run's, SFT learns in its ChatML template, the run is reused as it stands."""
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))  # nothing converted
    budget = [
        "base_model=smollm2-135m-instruct",
        "sft.train.batch_size=2",
        "sft.train.max_steps=2",
        "sft.train.eval_every=2",
        "sft.train.eval_batches=1",
        "sft.train.checkpoint_every=100",  # no resumable checkpoint of 135M weights + Adam
        "sft.train.keep_best=false",
        "sft.peft.method=lora",  # an adapter: no 540 MB full checkpoint to write and reload
        "eval.val_tokens=128",
        "eval.questions=1",
        "eval.max_new_tokens=8",
        "eval.tasks=[]",
    ]
    sets = [a for s in budget for a in ("--set", s)]
    lmlab_cmd("run", "smoke", "--quiet", *sets, cwd=tmp_path, check=True, timeout=900)
    run = tmp_path / "runs" / "smoke"

    config = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (run / "tokenizer" / "generation_config.json").is_file()
    manifest = json.loads((run / "tokenizer" / "tokens" / "manifest.json").read_text())
    tok = load_tokenizer(SMOLLM)
    assert manifest["eos_id"] == tok.token_to_id("<|endoftext|>")

    base = run / "pretrain" / "model"
    assert json.loads((base / "config.json").read_text())["base_model"] == "smollm2-135m-instruct"
    assert not (run / "pretrain" / "metrics.jsonl").exists()  # nothing was trained
    from lmlab.model.gguf import dequantize, open_gguf

    embd = next(t for t in open_gguf(SMOLLM).tensors if t.name == "token_embd.weight")
    want = dequantize(embd)
    with safe_open(base / "model.safetensors", "pt") as f:
        assert f.get_tensor("embed_tokens.weight")[: len(want)].equal(want)
    sft_tok = json.loads((run / "sft" / "model" / "tokenizer_config.json").read_text())
    assert sft_tok["chat_template"] == config["chat_template"]
    assert "## Base model (pre-training skipped)" in (run / "report.md").read_text()


def test_the_cache_key_follows_the_base_models_files(tmp_path):
    """Work done from a base model is reused while its files are unchanged, and redone
    when another model stands under the same path."""
    from lmlab.run.runner import base_model_facts

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF one")
    recipe = load_recipe("smoke", [f"base_model={model}"])
    first = base_model_facts(recipe)
    assert base_model_facts(recipe) == first and first["base_model"]["path"] == str(model)
    model.write_bytes(b"GGUF another")
    assert base_model_facts(recipe) != first
    assert base_model_facts(load_recipe("smoke")) == {}  # a run from scratch keeps its key

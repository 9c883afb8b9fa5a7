"""Hugging Face interoperability (`lmlab.model.hf`) against transformers' own models.

For every supported family a tiny random HF model is saved with `save_pretrained`,
converted, and its logits compared with lmlab's on a padded batch; export is checked the
other way (AutoModel loads it and agrees, and converting back is lossless); bad inputs must
raise errors that name the file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import EncoderDecoder, build_model
from lmlab.model.hf import FAMILIES, choose_family, convert_from_hf, export_to_hf
from lmlab.model.loading import load_model
from lmlab.model.presets import resolve_model
from lmlab.model.transformer import KVCache, Transformer

from .conftest import lmlab_cmd

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 64: lmlab pads to 320 rows, HF keeps 300


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers(one_thread):
    """One thread (conftest) and no transformers warnings for the random tiny models."""
    transformers.logging.set_verbosity_error()
    yield


# --- tiny HF models -------------------------------------------------------------------


def _rope(theta: float, **extra) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **extra}}


def hf_config(case: str):
    """A tiny config per case; each case turns on what its family can vary."""
    t = transformers
    dec = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    llama = dict(dec, hidden_size=64, intermediate_size=96, max_position_embeddings=32)
    llama.update(num_key_value_heads=2, rms_norm_eps=1e-5, **_rope(5000.0))
    t5 = dict(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4)
    t5.update(relative_attention_num_buckets=8, relative_attention_max_distance=20)
    neox = dict(dec, hidden_size=64, intermediate_size=96, max_position_embeddings=32)
    neox.update(rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5})
    opt = dict(dec, hidden_size=64, ffn_dim=96, max_position_embeddings=32)
    configs = {
        "llama": lambda: t.LlamaConfig(**llama),
        # biases, a tied head, linear RoPE scaling and a GeLU gate in one
        "llama-bias-linear-geglu": lambda: t.LlamaConfig(
            **{**llama, **_rope(5000.0, rope_type="linear", factor=2.0)},
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            hidden_act="gelu",
        ),
        "mistral": lambda: t.MistralConfig(**llama, sliding_window=5),
        "qwen2": lambda: t.Qwen2Config(**llama, tie_word_embeddings=True),
        "qwen2-window": lambda: t.Qwen2Config(
            **llama, use_sliding_window=True, sliding_window=5, max_window_layers=0
        ),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32
        ),
        "gpt_neox": lambda: t.GPTNeoXConfig(**neox),
        "gpt_neox-sequential": lambda: t.GPTNeoXConfig(**neox, use_parallel_residual=False),
        "opt": lambda: t.OPTConfig(**opt),
        "opt-post-ln": lambda: t.OPTConfig(**opt, do_layer_norm_before=False),
        # 6 heads: ALiBi slopes for a head count that is not a power of two
        "bloom": lambda: t.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6),
        "t5": lambda: t.T5Config(**t5, feed_forward_proj="relu"),  # v1.0: tied, scaled
        "t5-gated": lambda: t.T5Config(
            **t5, feed_forward_proj="gated-gelu", num_decoder_layers=1, tie_word_embeddings=False
        ),
    }
    cfg = configs[case]()
    cfg._attn_implementation = "eager"  # an independent implementation, not lmlab's SDPA
    return cfg


CASES = [
    "llama",
    "llama-bias-linear-geglu",
    "mistral",
    "qwen2",
    "qwen2-window",
    "gpt2",
    "gpt_neox",
    "gpt_neox-sequential",
    "opt",
    "opt-post-ln",
    "bloom",
    "t5",
    "t5-gated",
]
EMBEDDINGS = ("embed", "wte", "wpe", "shared", "word_embeddings", "relative_attention_bias")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that make logits far from uniform; norm gains and biases away from 1 and 0
    (an identity gain or a zero bias would hide a tensor mapped to the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(0.2 * r if name.endswith("bias") else 1.0 + 0.2 * r)
        elif any(k in name for k in (*EMBEDDINGS, "lm_head", "rel_pos_bias")):
            p.copy_(0.5 * r)
        else:
            p.copy_(r / math.sqrt(min(p.shape)))
    return model


def make_hf(case: str, root: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A random HF model saved to `root/hf`, and the reference: what transformers itself
    loads back from that directory."""
    cfg = hf_config(case)
    if case.startswith("t5"):
        cls = transformers.AutoModelForSeq2SeqLM
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        cls = transformers.AutoModelForCausalLM
        model = cls.from_config(cfg)
    out = root / "hf"
    randomize_(model.float(), seed).save_pretrained(out)
    if case == "t5-gated":  # Flan-T5's layout: a head of its own, and no output scaling
        state = load_file(out / "model.safetensors")
        g = torch.Generator().manual_seed(seed + 1)
        state["lm_head.weight"] = 0.5 * torch.randn(state["shared.weight"].shape, generator=g)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return cls.from_pretrained(out, attn_implementation="eager").float().eval(), out


def batch(seed: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows: full, left-padded by 4, right-padded by 3 (pad id 0 is a real token id)."""
    ids = torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, -3:] = 0
    return ids, mask


@torch.no_grad()
def logits_pair(case: str, hf: torch.nn.Module, ours: torch.nn.Module, seed: int = 1):
    """(lmlab, HF) logits at the non-pad positions of a padded batch."""
    ids, mask = batch(seed)
    if case.startswith("t5"):
        dec, dmask = batch(seed + 1, length=9)
        ref = hf(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask
        ).logits
        got = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dmask)
        keep = dmask.bool()
    else:
        kw = {}
        if not case.startswith("bloom"):  # BLOOM has no position ids (ALiBi)
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # lmlab's default
        ref = hf(input_ids=ids, attention_mask=mask, **kw).logits
        got = ours(ids, attention_mask=mask)
        keep = mask.bool()
    assert got.shape == ref.shape
    return got[keep], ref[keep]


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 1.0  # far from uniform, so the bound means something
    assert (got - ref).abs().max().item() < 1e-4


# --- HF -> lmlab ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_converted_model_matches_hf_logits_on_a_padded_batch(case, tmp_path):
    hf, src = make_hf(case, tmp_path)
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["converted_from"]["model_type"] == case.split("-")[0]
    ours = load_model(ckpt)
    assert isinstance(ours, EncoderDecoder if case.startswith("t5") else Transformer)
    assert ours.cfg.vocab_size == VOCAB and ours.embed_tokens.weight.shape[0] == 320
    assert_close(*logits_pair(case, hf, ours))
    # load_model on the HF directory itself converts in memory: the same model
    direct = load_model(src)
    assert type(direct) is type(ours) and direct.cfg == ours.cfg
    assert not any(t.is_meta for t in direct.state_dict().values())
    hf_tied = (
        hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    )
    tied = direct.lm_head.weight is direct.embed_tokens.weight
    assert tied == direct.cfg.tie_embeddings == hf_tied
    assert_close(*logits_pair(case, hf, direct))


@pytest.mark.parametrize("case", ["llama", "gpt2", "bloom"])
@torch.no_grad()
def test_hf_directory_loads_as_lmlab_model_with_kv_cache(case, tmp_path):
    """The point of converting in memory: lmlab's cache and decoding run on HF models."""
    _, src = make_hf(case, tmp_path)
    model = load_model(src)
    ids, _ = batch(2)
    full = model(ids)
    cache = KVCache.empty(model.cfg, ids.shape[0], 16)
    steps = [model(ids[:, :5], cache)] + [model(ids[:, i : i + 1], cache) for i in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_other_families_still_load_with_transformers(tmp_path):
    cfg = transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16, rotary_dim=4
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gptj")
    model = load_model(tmp_path / "gptj")
    assert isinstance(model, transformers.PreTrainedModel)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, VOCAB)


def test_features_lmlab_lacks_fall_back_to_transformers_in_load_model(tmp_path):
    """`convert` refuses (it would change the model); `load_model` still loads it."""
    _, src = make_hf("llama", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"config\.json.*rope_parameters.*yarn"):
        convert_from_hf(src, tmp_path / "ckpt")
    assert isinstance(load_model(src), transformers.LlamaForCausalLM)


def test_sharded_safetensors_and_pytorch_bin_are_read(tmp_path):
    hf, src = make_hf("llama", tmp_path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert_close(*logits_pair("llama", hf, load_model(sharded)))
    binary = tmp_path / "bin"
    shutil.copytree(src, binary)
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    assert_close(*logits_pair("llama", hf, load_model(binary)))


LEGACY = {  # how original checkpoints name tensors, and buffers they kept
    "gpt2": (lambda k: k.removeprefix("transformer."), "h.0.attn.bias"),
    "opt": (lambda k: k.removeprefix("model."), None),
    "bloom": (lambda k: k.removeprefix("transformer."), None),
    "gpt_neox": (
        lambda k: "lm_head.weight" if k == "embed_out.weight" else k,  # the module's name
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
    ),
}


@pytest.mark.parametrize("case", LEGACY)
def test_legacy_checkpoint_names(case, tmp_path):
    """Original GPT-2/OPT/BLOOM files omit the base-model prefix; GPT-NeoX's head is saved
    as `embed_out` but may be `lm_head`; old files keep buffers (GPT-2's `attn.bias`)."""
    hf, src = make_hf(case, tmp_path)
    rename, buffer = LEGACY[case]
    legacy = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    assert legacy.keys() != load_file(src / "model.safetensors").keys()
    if buffer:
        legacy[buffer] = torch.ones(4)
    save_file(legacy, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_close(*logits_pair(case, hf, load_model(src)))


# --- lmlab -> HF ----------------------------------------------------------------------


def _hf_class(case: str):
    if case.startswith("t5"):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip(case, tmp_path):
    """convert -> export: AutoModel loads it with no missing or unexpected tensors and
    agrees with lmlab; converting the export back gives identical tensors."""
    _, src = make_hf(case, tmp_path)
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "export", tokenizer=False)
    family = case.split("-")[0]
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    back, info = _hf_class(case).from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert_close(*logits_pair(case, back.float().eval(), load_model(ckpt)))
    again = convert_from_hf(out, tmp_path / "again")
    a, b = load_file(ckpt / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# lmlab presets -> the HF family chosen for them (the mistral window shrunk to matter;
# NTK-aware RoPE scaling exports as plain RoPE with the larger base it amounts to)
PRESET_FAMILY = {
    "llama": ("llama", {}),
    "llama-ntk": ("llama", {"rope_scaling": "ntk", "rope_scaling_factor": 4.0}),
    "mistral": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {}),
    "gpt2": ("gpt2", {}),
    "neox": ("gpt_neox", {}),
    "opt": ("opt", {}),
    "bloom": ("bloom", {}),
    "t5": ("t5", {"n_decoder_layers": 1, "activation": "geglu"}),
}


@pytest.mark.parametrize("name", PRESET_FAMILY)
def test_lmlab_preset_exports_to_its_family(name, tmp_path):
    family, overrides = PRESET_FAMILY[name]
    preset = name.split("-")[0]
    cfg = resolve_model(
        {"preset": preset, "layers": 2, "width": 64, "vocab_size": VOCAB, **overrides}
    )
    assert choose_family(cfg) == family
    model = randomize_(build_model(cfg).eval(), seed=3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "export", tokenizer=False)
    back = _hf_class(family).from_pretrained(out, attn_implementation="eager").float().eval()
    assert_close(*logits_pair(family, back, model))


def test_dtype_is_kept(tmp_path):
    hf, src = make_hf("gpt_neox", tmp_path)
    hf.to(torch.bfloat16).save_pretrained(src)
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    assert {t.dtype for t in load_file(ckpt / "model.safetensors").values()} == {torch.bfloat16}
    out = export_to_hf(ckpt, tmp_path / "export", tokenizer=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_round_trip(tmp_path):
    """An exported tokenizer loads with AutoTokenizer (no custom code) and encodes, decodes,
    and renders chats as lmlab does; the model config carries its special-token ids."""
    from lmlab.tokenizer import (
        EOS,
        PAD,
        format_chat,
        load_tokenizer,
        save_tokenizer,
    )
    from lmlab.tokenizer.train import train_bpe

    texts = [f"def f{i}(x):\n    return x * {i}  # ünïcode ok\n" for i in range(200)]
    save_tokenizer(train_bpe(texts, vocab_size=VOCAB), tmp_path / "tok")
    model = build_model(
        resolve_model({"preset": "llama", "layers": 1, "width": 64, "vocab_size": VOCAB})
    )
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    out = export_to_hf(ckpt, tmp_path / "export")
    ours = load_tokenizer(ckpt)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["def g(y):\n    return y", "plain words, ünïcode and 🙂", f"a{EOS}b"]:
        assert theirs.encode(text, add_special_tokens=True) == ours.encode(text).ids
        assert theirs.decode(ours.encode(text).ids) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == format_chat(chat, add_generation_prompt=True)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["eos_token_id"] == ours.token_to_id(EOS) == theirs.eos_token_id
    assert hf_cfg["pad_token_id"] == ours.token_to_id(PAD) == theirs.pad_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    # transformers stops at the end of text and at lmlab's end of a chat turn
    assert gen["eos_token_id"] == [hf_cfg["eos_token_id"], ours.token_to_id("<|end|>")]


def test_convert_builds_tokenizer_json_from_slow_tokenizer_files(tmp_path):
    """An HF directory with only vocab.json + merges.txt gets a tokenizer.json lmlab reads."""
    from lmlab.tokenizer import load_tokenizer
    from lmlab.tokenizer.train import train_bpe

    tok = train_bpe([f"token {i} words here" for i in range(300)], vocab_size=VOCAB)
    _, src = make_hf("gpt2", tmp_path)
    tok.model.save(str(src))  # vocab.json + merges.txt
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    assert (ckpt / "tokenizer.json").is_file()
    text = "token 12 words here and more"
    assert load_tokenizer(ckpt).encode(text).ids == tok.encode(text).ids


# --- bad input ------------------------------------------------------------------------


def test_corrupted_weights_name_the_file(tmp_path):
    _, src = make_hf("llama", tmp_path)
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        convert_from_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_config_that_is_not_json_names_the_file(tmp_path):
    _, src = make_hf("gpt2", tmp_path)
    (src / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*invalid JSON"):
        convert_from_hf(src, tmp_path / "ckpt")


def test_unsupported_model_type_and_features_name_file_and_key(tmp_path):
    _, src = make_hf("opt", tmp_path)
    cfg_path = src / "config.json"
    original = json.loads(cfg_path.read_text())
    bad = {
        "model_type": ("gptj", "model_type 'gptj' is not supported"),
        "word_embed_proj_dim": (32, "word_embed_proj_dim"),
    }
    for key, (value, message) in bad.items():
        cfg_path.write_text(json.dumps({**original, key: value}))
        with pytest.raises(UsageError, match=message) as e:
            convert_from_hf(src, tmp_path / "ckpt")
        assert str(cfg_path) in str(e.value)


def test_missing_or_extra_tensors_are_named(tmp_path):
    _, src = make_hf("qwen2", tmp_path)
    state = load_file(src / "model.safetensors")
    gone = state.pop("model.layers.1.self_attn.k_proj.bias")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        convert_from_hf(src, tmp_path / "ckpt")
    state["model.layers.1.self_attn.k_proj.bias"] = gone
    state["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="surprise"):
        convert_from_hf(src, tmp_path / "ckpt")
    del state["model.layers.0.mlp.surprise.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="do not match config.json.*mlp"):
        convert_from_hf(src, tmp_path / "ckpt")


def test_missing_shard_is_named(tmp_path):
    hf, _ = make_hf("llama", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        convert_from_hf(tmp_path / "sharded", tmp_path / "ckpt")


def test_config_with_no_hf_family_says_what_blocks_each(tmp_path):
    cfg = resolve_model({"preset": "glm", "layers": 1, "width": 64, "vocab_size": VOCAB})
    ckpt = save_checkpoint(build_model(cfg), tmp_path / "glm")
    with pytest.raises(UsageError) as e:
        export_to_hf(ckpt, tmp_path / "out", tokenizer=False)
    msg = str(e.value)
    assert all(f"{fam}:" in msg for fam in FAMILIES)
    assert "family='prefix'" in msg and "norm_position='post'" in msg
    assert not (tmp_path / "out").exists()
    llama = resolve_model({"preset": "llama", "layers": 1, "width": 64, "vocab_size": VOCAB})
    with pytest.raises(UsageError, match=r"as gpt2: .*norm='rmsnorm' \(needs layernorm\)"):
        choose_family(llama, "gpt2")
    with pytest.raises(UsageError, match="position='sinusoidal'"):
        choose_family(ModelConfig(vocab_size=VOCAB, position="sinusoidal"))


def test_cli_convert_exits_2_with_one_line_naming_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2")
    p = lmlab_cmd("convert", str(tmp_path / "bad"), "--out", str(tmp_path / "ck"), cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert str(tmp_path / "bad" / "config.json") in p.stderr.replace("\n", "")

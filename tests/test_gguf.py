"""GGUF export: the file read back with `gguf.GGUFReader`, and run by llama.cpp.

The reader checks always run: metadata, the vocabulary, every tensor dequantized against
lmlab's weights within its format's error bound, the Q/K permutation, the refusals. When
llama-cpp-python is importable, llama.cpp itself loads the files: its logits equal lmlab's
(f32, random weights, every supported variant), its tokenization equals lmlab's, and its
greedy tokens equal lmlab's on a briefly trained model.
"""

from __future__ import annotations

import json
import math
import os
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmlab.errors import UsageError
from lmlab.infer.generate import generate
from lmlab.infer.gguf import (
    QTYPES,
    export_gguf,
    gguf_greedy,
    load_llama_cpp,
    permute_qk,
    unpermute_qk,
)
from lmlab.infer.options import GenerationConfig
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.loading import load_model
from lmlab.model.transformer import Transformer, apply_rope, rope_tables
from lmlab.tokenizer import load_tokenizer, save_tokenizer
from lmlab.tokenizer.train import train_bpe

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (CI does not compile llama.cpp)"
)

# Each variant exercises one thing the export must get right.
VARIANTS = {
    "mha-tied": dict(n_heads=4),
    # ffn_hidden=80: down_proj rows are not a multiple of 32, so q8_0/q4_0 fall back to f16
    "gqa-untied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False, ffn_hidden=80),
    "moe": dict(n_heads=4, n_kv_heads=2, n_experts=4, experts_top_k=2),
    # head_dim != d_model / n_heads, multi-query, NTK-scaled RoPE (a larger base)
    "mqa-headdim-ntk": dict(
        n_heads=4, n_kv_heads=1, head_dim=32, rope_scaling="ntk", rope_scaling_factor=2.0
    ),
    "rope-linear": dict(n_heads=2, rope_scaling="linear", rope_scaling_factor=2.0),
}

STRINGS = [
    "Hello, world! It's a test: we'll see 12345 apples.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n",
    "Ünïcödé café naïve — 日本語のテキスト, emoji 🚀🦙, Ελληνικά, русский текст.",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
]


def _texts() -> list[str]:
    mods = (textwrap, string, json.decoder, json.encoder)
    return [Path(m.__file__).read_text(encoding="utf-8") for m in mods] + [STRINGS[2]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained as lmlab trains one; 600 tokens, so the model pads to 640."""
    out = tmp_path_factory.mktemp("tok")
    tok = train_bpe(_texts(), 600)
    assert tok.get_vocab_size() == 600  # the tests' configs assume it
    save_tokenizer(tok, out)
    return out


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    kw = dict(vocab_size=vocab_size, n_layers=2, d_model=64, ffn_hidden=96, max_seq_len=64)
    kw.update(rope_theta=5000.0, norm_eps=1e-5)  # not the defaults, so a dropped one shows
    return ModelConfig(**{**kw, **overrides})


@torch.no_grad()
def randomize_(model: Transformer, seed: int) -> Transformer:
    """Weights that make logits far from uniform and norm gains that are not 1; residual
    outputs scaled up so the layers, not the input embedding, pick the next token."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            gain = 3.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
    return model


@pytest.fixture(scope="module")
def ckpts(tok_dir, tmp_path_factory) -> dict[str, Path]:
    """One random-weight checkpoint per variant, with the tokenizer beside it."""
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = randomize_(Transformer(tiny_config(vocab, **kw)).eval(), seed=i)
        out[name] = save_checkpoint(model, root / name, tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory):
    """export(variant, qtype) -> the GGUF path, each written once."""
    root = tmp_path_factory.mktemp("gguf")
    done: dict[tuple[str, str], Path] = {}

    def export(variant: str, qtype: str) -> Path:
        if (variant, qtype) not in done:
            path = root / f"{variant}-{qtype}.gguf"
            done[variant, qtype] = export_gguf(ckpts[variant], path, qtype)
        return done[variant, qtype]

    return export


def field(reader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


# --- the file, read back ------------------------------------------------------------------


def test_metadata_and_vocabulary(exports, tok_dir):
    r = gguf.GGUFReader(exports("gqa-untied", "q8_0"))
    cfg = tiny_config(600, **VARIANTS["gqa-untied"])
    expect = {
        "general.architecture": "llama",
        "general.file_type": 7,
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 600,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expect.items():
        assert field(r, key) == value, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(5000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)

    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = {i: s for s, i in tok["model"]["vocab"].items()}
    assert field(r, "tokenizer.ggml.tokens") == [vocab[i] for i in range(600)]
    merges = field(r, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) for m in tok["model"]["merges"]] and len(merges) > 300
    types = field(r, "tokenizer.ggml.token_type")
    special = {t["id"] for t in tok["added_tokens"]}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(600) if i not in special)
    ids = {s: i for i, s in vocab.items()}
    assert field(r, "tokenizer.ggml.eos_token_id") == ids["<|endoftext|>"]
    assert field(r, "tokenizer.ggml.padding_token_id") == ids["<|pad|>"]
    assert field(r, "tokenizer.ggml.eot_token_id") == ids["<|end|>"]
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert field(r, "tokenizer.chat_template") == conf["chat_template"]

    for q, (_, file_type, _) in QTYPES.items():
        assert field(gguf.GGUFReader(exports("mha-tied", q)), "general.file_type") == file_type


def _lmlab_tensors(ckpt: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The GGUF tensors expected from an lmlab state dict, written independently of the
    exporter's table: names, vocabulary rows cut, experts stacked (Q/K left unpermuted)."""
    s = load_file(str(ckpt / "model.safetensors"))
    v = cfg.vocab_size
    out = {
        "token_embd.weight": s["embed_tokens.weight"][:v],
        "output_norm.weight": s["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = s["lm_head.weight"][:v]
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(cfg.n_layers):
        for gg, lm in names.items():
            out[f"blk.{i}.{gg}.weight"] = s[f"layers.{i}.{lm}.weight"]
        for gg in ("gate", "up", "down"):
            if cfg.n_experts:
                experts = [
                    s[f"layers.{i}.mlp.experts.{e}.{gg}_proj.weight"] for e in range(cfg.n_experts)
                ]
                out[f"blk.{i}.ffn_{gg}_exps.weight"] = torch.stack(experts)
            else:
                out[f"blk.{i}.ffn_{gg}.weight"] = s[f"layers.{i}.mlp.{gg}_proj.weight"]
        if cfg.n_experts:
            out[f"blk.{i}.ffn_gate_inp.weight"] = s[f"layers.{i}.mlp.router.weight"]
    return out


def _block_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    """Per-element error bound of a 32-block format: q8_0 rounds to amax/127 steps (+ the
    f16 scale's own rounding); q4_0's top code clips, so up to one full amax/8 step."""
    blocks = np.abs(w.reshape(*w.shape[:-1], -1, 32)).max(-1, keepdims=True)
    step = blocks / (127 if qtype == "q8_0" else 8)
    half = 0.5 if qtype == "q8_0" else 1.0
    bound = step * (half + 127 * 2**-10) + 1e-7
    return np.broadcast_to(bound, (*w.shape[:-1], w.shape[-1] // 32, 32)).reshape(w.shape)


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("variant", ["mha-tied", "gqa-untied", "moe"])
def test_tensors_dequantize_to_lmlab_weights(exports, ckpts, variant, qtype):
    cfg = tiny_config(600, **VARIANTS[variant])
    expected = _lmlab_tensors(ckpts[variant], cfg)
    r = gguf.GGUFReader(exports(variant, qtype))
    assert sorted(t.name for t in r.tensors) == sorted(expected)
    for t in r.tensors:
        want = expected[t.name].float()
        assert list(t.shape) == list(reversed(want.shape)), t.name  # GGUF lists dims reversed
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        got = got.reshape(want.shape)
        if t.name.endswith("attn_q.weight"):
            got = unpermute_qk(got, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            got = unpermute_qk(got, cfg.n_kv_heads)
        ty = t.tensor_type.name
        if want.dim() == 1 or t.name.endswith("ffn_gate_inp.weight"):
            assert ty == "F32", t.name  # norms and the router are never quantized
        elif qtype in ("q8_0", "q4_0") and want.shape[-1] % 32:
            assert ty == "F16", t.name  # a row that is not whole blocks
        else:
            assert ty == qtype.upper(), t.name
        if ty == "F32":
            assert torch.equal(got, want), t.name
        elif ty == "F16":
            assert torch.equal(got, want.half().float()), t.name
        else:
            err = (got - want).abs().numpy()
            assert (err <= _block_bound(want.numpy(), qtype)).all(), t.name
            assert err.max() > 0  # it was quantized
    if variant == "gqa-untied" and qtype == "q8_0":  # down_proj rows are 80 long
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def _interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's normal RoPE: rotates adjacent pairs (x[2i], x[2i+1]) by angle i."""
    half = cos.shape[-1] // 2  # rope_tables holds angle i at i and at i + half
    c, s = cos[..., :half], sin[..., :half]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def test_qk_permutation_turns_rotate_half_into_pair_rotation():
    cfg = tiny_config(64, n_heads=4, n_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(cfg.n_heads * cfg.head_dim, cfg.d_model, generator=g)
    wk = torch.randn(cfg.n_kv_heads * cfg.head_dim, cfg.d_model, generator=g)
    assert torch.equal(unpermute_qk(permute_qk(wq, 4), 4), wq)
    assert not torch.equal(permute_qk(wq, 4), wq)
    x = torch.randn(1, 10, cfg.d_model, generator=g)
    cos, sin = rope_tables(cfg, 10)

    def heads(w, n):
        return (x @ w.T).view(1, 10, n, cfg.head_dim).transpose(1, 2)

    q_lm = apply_rope(heads(wq, 4), cos, sin)
    k_lm = apply_rope(heads(wk, 2), cos, sin)
    q_cpp = _interleaved_rope(heads(permute_qk(wq, 4), 4), cos, sin)
    k_cpp = _interleaved_rope(heads(permute_qk(wk, 2), 2), cos, sin)
    # the same rotated vectors, their dims in permuted order ...
    dims = permute_qk(torch.arange(cfg.head_dim), 1)
    torch.testing.assert_close(q_cpp, q_lm[..., dims])
    torch.testing.assert_close(k_cpp, k_lm[..., dims])
    # ... so the attention scores are unchanged
    rep = cfg.n_heads // cfg.n_kv_heads
    s_lm = q_lm @ k_lm.repeat_interleave(rep, 1).transpose(-1, -2)
    s_cpp = q_cpp @ k_cpp.repeat_interleave(rep, 1).transpose(-1, -2)
    torch.testing.assert_close(s_cpp, s_lm, rtol=1e-4, atol=1e-4)


def test_ids_the_tokenizer_lacks_become_unused_tokens(tmp_path, tok_dir, llama):
    """A model vocabulary larger than the tokenizer's: one UNUSED token per extra row."""
    ckpt = save_checkpoint(Transformer(tiny_config(610)), tmp_path / "c", tok_dir)
    out = export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(out)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 610 and tokens[600:] == [f"[PAD{i}]" for i in range(600, 610)]
    assert types[600:] == [gguf.TokenType.UNUSED] * 10
    assert r.get_tensor(0).name == "token_embd.weight" and list(r.get_tensor(0).shape) == [64, 610]
    if HAVE_LLAMA_CPP:
        assert llama(out).n_vocab() == 610


# --- refusals and bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(position="alibi"), "position"),
        (dict(norm="layernorm"), "norm"),
        (dict(bias=True), "bias"),
        (dict(qkv_bias=True), "qkv_bias"),
        (dict(family="encoder_decoder", position="t5"), "family"),
        (dict(sliding_window=16), "sliding_window"),
        (dict(activation="gelu"), "activation"),
        (dict(rotary_fraction=0.5), "rotary_fraction"),
        (dict(parallel_residual=True), "parallel_residual"),
        (dict(n_experts=4, capacity_factor=1.25), "capacity_factor"),
        (dict(attn_scale=1.0), "attn_scale"),
    ],
)
def test_refuses_what_llama_cannot_express(tmp_path, tok_dir, overrides, key):
    from lmlab.model.encdec import build_model

    ckpt = save_checkpoint(build_model(tiny_config(600, **overrides)), tmp_path / "c", tok_dir)
    with pytest.raises(UsageError, match=rf"\b{key}="):
        export_gguf(ckpt, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_inputs_name_what_is_wrong(tmp_path, ckpts, tok_dir):
    with pytest.raises(UsageError, match="qtype 'q5_k'.*f32, f16, q8_0, q4_0"):
        export_gguf(ckpts["mha-tied"], tmp_path / "x.gguf", "q5_k")
    with pytest.raises(UsageError, match="no such checkpoint"):
        export_gguf(tmp_path / "nothing", tmp_path / "x.gguf")

    model = Transformer(tiny_config(600))
    bare = save_checkpoint(model, tmp_path / "bare")  # no tokenizer beside the weights
    with pytest.raises(UsageError, match=r"tokenizer\.json: no such file"):
        export_gguf(bare, tmp_path / "x.gguf")

    small = save_checkpoint(Transformer(tiny_config(500)), tmp_path / "small", tok_dir)
    with pytest.raises(UsageError, match="token id 599 does not fit.*vocab_size=500"):
        export_gguf(small, tmp_path / "x.gguf")

    prefix = save_checkpoint(model, tmp_path / "prefix", tok_dir)
    tok = json.loads((prefix / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["add_prefix_space"] = True
    (prefix / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UsageError, match=r"tokenizer\.json.*add_prefix_space"):
        export_gguf(prefix, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, ckpts):
    broken = _copy_ckpt(ckpts["mha-tied"], tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    state["layers.1.mlp.up_proj.weight"] = state["layers.1.mlp.up_proj.weight"][:, :32].clone()
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UsageError, match=r"'layers.1.mlp.up_proj.weight' has shape \[96, 32\]"):
        export_gguf(broken, tmp_path / "x.gguf")
    del state["layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UsageError, match="'layers.1.mlp.up_proj.weight' is missing"):
        export_gguf(broken, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_write_leaves_the_old_file(tmp_path, ckpts, monkeypatch):
    import lmlab.infer.gguf as mod

    out = export_gguf(ckpts["mha-tied"], tmp_path / "m.gguf", "f32")
    before = out.read_bytes()
    real, calls = mod.encode_tensor, []

    def failing(x, ty):  # fails halfway through the tensor data
        calls.append(ty)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(x, ty)

    monkeypatch.setattr(mod, "encode_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpts["mha-tied"], out, "f16", overwrite=True)
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left behind


# --- llama.cpp runs the file --------------------------------------------------------------


@pytest.fixture
def llama():
    """open(path, **kw) -> a llama_cpp.Llama, closed after the test (closing at interpreter
    exit can fail inside llama-cpp-python)."""
    opened = []

    def open_(path: Path, **kw):
        llm = load_llama_cpp(path, n_threads=1, **kw)
        opened.append(llm)
        return llm

    yield open_
    for llm in opened:
        llm.close()


@needs_llama_cpp
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_logits_equal_lmlab(exports, ckpts, llama, variant):
    model = load_model(ckpts[variant])
    v = model.cfg.vocab_size
    ids = torch.randint(0, v, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, :, :v].numpy()
    llm = llama(exports(variant, "f32"), logits_all=True, type_k=0, type_v=0)  # f32 KV cache
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert got.shape == want.shape
    scale = np.abs(want).max()
    # measured ~1e-6 of the largest logit: the same function, only float32 summation order
    assert np.abs(got - want).max() < 1e-5 * scale, np.abs(got - want).max() / scale
    prompt = ids[:8]
    expect = generate(model, prompt, GenerationConfig(max_new_tokens=16))
    assert gguf_greedy(llama(exports(variant, "f32")), prompt, 16) == expect


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_lmlab(exports, tok_dir, llama):
    tok = load_tokenizer(tok_dir)
    llm = llama(exports("mha-tied", "f16"))
    for s in STRINGS:
        want = tok.encode(s).ids
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == want, s
        plain = tok.encode(s.replace("<|", "<")).ids  # no special tokens: decodes to itself
        assert llm.detokenize(plain) == s.replace("<|", "<").encode(), s


@pytest.fixture(scope="module")
def trained(tok_dir, tmp_path_factory) -> Path:
    """A tiny LLaMA trained briefly on one module's source: confident, non-repeating greedy
    paths (the smoke run's 30 steps only ever repeat the indentation token)."""
    tok = load_tokenizer(tok_dir)
    ids = torch.tensor(tok.encode(_texts()[0]).ids[:3000])
    cfg = tiny_config(tok.get_vocab_size(), n_heads=4, n_kv_heads=2, ffn_hidden=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        start = torch.randint(0, len(ids) - 65, (8,), generator=g)
        x = torch.stack([ids[i : i + 65] for i in start])
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("trained") / "m", tok_dir)


def _prefix_agreement(got: list[int], want: list[int]) -> int:
    """How many tokens agree before the first divergence."""
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))


@needs_llama_cpp
def test_llama_cpp_greedy_equals_lmlab_on_a_trained_model(trained, tmp_path, llama, capsys):
    model = load_model(trained)
    tok = load_tokenizer(trained)
    ids = tok.encode(_texts()[0]).ids  # prompts from the text it was trained on
    prompts = [ids[i : i + 16] for i in (100, 1000, 2000)]
    n = 24
    want = [generate(model, p, GenerationConfig(max_new_tokens=n)) for p in prompts]
    assert all(len(set(w)) > n // 3 for w in want), want  # not a degenerate repetition
    agree = {}
    for qtype in QTYPES:
        llm = llama(export_gguf(trained, tmp_path / f"{qtype}.gguf", qtype))
        got = [gguf_greedy(llm, p, n) for p in prompts]
        agree[qtype] = [_prefix_agreement(g, w) for g, w in zip(got, want, strict=True)]
        if qtype in ("f32", "f16"):
            assert got == want, qtype
    with capsys.disabled():
        print(
            f"\nGGUF greedy: tokens equal to lmlab's before the first divergence, of {n}: {agree}"
        )
    assert min(agree["q8_0"]) >= n // 2, agree  # measured: all 24 of 24

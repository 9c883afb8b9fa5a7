"""Reference parity: lmlab's `Transformer` against Hugging Face's `LlamaForCausalLM`.

The weight mapping below is written by hand and kept apart from `lmlab.model.hf` on
purpose: a second, independent mapping, so that a converter bug cannot hide a model bug
(test_model_hf.py checks the converter itself). The generation tests import it too.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import KVCache, Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 64: the embedding is padded to 320 rows

VARIANTS = {
    "mha-tied": dict(n_kv_heads=None, tie_embeddings=True),
    "gqa-tied": dict(n_kv_heads=2, tie_embeddings=True),
    "mha-untied": dict(n_kv_heads=None, tie_embeddings=False),
    "gqa-untied": dict(n_kv_heads=2, tie_embeddings=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(
        vocab_size=VOCAB,
        n_layers=2,
        d_model=64,
        n_heads=4,
        ffn_hidden=96,
        max_seq_len=48,
        rope_theta=5000.0,  # not the default, so a dropped setting shows
        norm_eps=1e-5,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


@torch.no_grad()
def randomize_(
    model: Transformer, seed: int, scale: float = 1.0, layer_gain: float = 1.0
) -> Transformer:
    """Weights large enough that logits are far from uniform, and norm gains that are not 1
    (an identity gain would hide a norm applied in the wrong place). `scale` sizes the
    (un)embedding and so the logits; `layer_gain` multiplies the residual-branch outputs
    (o_proj, down_proj), so that with tied embeddings the layers, not the input token's
    own embedding, decide the next token (otherwise greedy decoding just repeats it)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name in ("embed_tokens.weight", "lm_head.weight"):  # a tied head is listed once
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        else:
            gain = layer_gain if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
    return model


def make_model(
    seed: int = 0, scale: float = 1.0, layer_gain: float = 1.0, **overrides
) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).float().eval()
    return randomize_(model, seed, scale, layer_gain)


def hf_config_from_lmlab(cfg: ModelConfig):
    kw = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        # no special tokens: HF's generate must not stop early on a random model
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    params = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kw["rope_theta"] = cfg.rope_theta
    hf_cfg = transformers.LlamaConfig(**kw)
    # eager attention: an independent implementation, not the same SDPA kernel lmlab uses
    hf_cfg._attn_implementation = "eager"
    return hf_cfg


def lmlab_to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Map lmlab parameter names to HF Llama's; cut the padded vocabulary rows off."""
    v = model.cfg.vocab_size
    out = {}
    for name, p in model.state_dict().items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            p = p[:v]
        out[name if name == "lm_head.weight" else f"model.{name}"] = p.clone()
    if "lm_head.weight" not in out:  # tied models may list the shared tensor once
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def hf_llama_from_lmlab(model: Transformer):
    hf = transformers.LlamaForCausalLM(hf_config_from_lmlab(model.cfg)).float().eval()
    hf.load_state_dict(lmlab_to_hf_state_dict(model), strict=True)
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.cfg.tie_embeddings
    return hf


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


# --- the mapping itself ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_mapping_covers_every_hf_parameter(variant):
    model = make_model(**VARIANTS[variant])
    hf_keys = set(hf_llama_from_lmlab(model).state_dict())
    assert set(lmlab_to_hf_state_dict(model)) == hf_keys
    assert model.embed_tokens.weight.shape[0] == 320  # padded to a multiple of 64
    assert (model.lm_head.weight is model.embed_tokens.weight) == model.cfg.tie_embeddings


# --- logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_match_hf_llama(variant):
    model = make_model(seed=1, **VARIANTS[variant])
    hf = hf_llama_from_lmlab(model)
    ids = random_ids(3, model.cfg.max_seq_len, seed=2)  # the full RoPE table is used
    ours = model(ids)
    ref = hf(input_ids=ids).logits
    assert ours.shape == ref.shape == (3, model.cfg.max_seq_len, VOCAB)
    assert ref.abs().max() > 1.0  # logits are not all near zero, so the bound means something
    assert (ours - ref).abs().max().item() < 1e-4


@torch.no_grad()
def test_padded_vocab_rows_never_reach_the_logits():
    """Untied head: huge weights in the padding rows must change nothing we return."""
    model = make_model(seed=3, tie_embeddings=False)
    ids = random_ids(2, 10, seed=4)
    before = model(ids)
    model.lm_head.weight[VOCAB:] = 1e4
    model.embed_tokens.weight[VOCAB:] = 1e4  # never looked up: ids are < vocab_size
    after = model(ids)
    assert after.shape[-1] == VOCAB
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["mha-tied", "gqa-untied"])
@torch.no_grad()
def test_left_padded_batch_matches_hf_with_attention_mask(variant):
    """HF sees a left-padded batch with a mask; lmlab (no mask argument) sees each row alone."""
    model = make_model(seed=5, **VARIANTS[variant])
    hf = hf_llama_from_lmlab(model)
    lengths = [12, 7, 3]
    width = max(lengths)
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    pad_id = 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # each row starts at position 0
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    for i, row in enumerate(rows):
        ours = model(row[None])[0]
        theirs = ref[i, width - len(row) :]
        assert (ours - theirs).abs().max().item() < 1e-4, f"row {i} (length {len(row)})"


# --- KV cache -------------------------------------------------------------------------


# float32 with logits of a realistic size (|logit| < 4), and float64 where anything above
# rounding noise would be a real difference (a mask or RoPE offset off by one gives ~1e-1).
CACHE_CASES = {
    "float32": (torch.float32, 0.1, 1e-5),
    "float64": (torch.float64, 1.0, 1e-10),
}


@pytest.mark.parametrize("dtype_case", CACHE_CASES)
@pytest.mark.parametrize("variant", ["mha-tied", "gqa-untied"])
@torch.no_grad()
def test_kv_cache_prefill_chunks_and_steps_match_full_sequence(variant, dtype_case):
    dtype, scale, tol = CACHE_CASES[dtype_case]
    model = make_model(seed=6, scale=scale, **VARIANTS[variant]).to(dtype)
    ids = random_ids(2, 30, seed=7)
    full = model(ids)
    # prefill 8, one token, a chunk of 5, three tokens, a chunk of 2, then the rest one by one
    pieces = [8, 1, 5, 1, 1, 1, 2] + [1] * 11
    assert sum(pieces) == ids.shape[1]
    # longer than needed: the unused slots must not leak into attention
    cache = KVCache.empty(model.cfg, 2, 40, dtype=dtype)
    outs, start = [], 0
    for n in pieces:
        outs.append(model(ids[:, start : start + n], cache))
        start += n
        assert cache.pos == start
    cached = torch.cat(outs, dim=1)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() < tol


@torch.no_grad()
def test_kv_cache_overflow_raises():
    model = make_model(seed=8, max_seq_len=16)
    cache = KVCache.empty(model.cfg, 1, 16)
    model(random_ids(1, 10, seed=9), cache)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        model(random_ids(1, 7, seed=9), cache)

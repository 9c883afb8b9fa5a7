"""Decoding strategies beyond plain greedy/sampling: batched generation, penalties and
min-p against transformers' processors, beam search against transformers' beam search,
speculative decoding (greedy identity, sampling distribution), contrastive decoding,
stop strings, log-probabilities and n samples."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.infer.beam import beam_search
from lmlab.infer.generate import Contrast, contrastive_scores, generate, generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.infer.sampling import History, apply_penalties, banned_ngram_tokens, filter_logits
from lmlab.infer.speculative import speculative_generate
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model

logits_process = pytest.importorskip("transformers.generation.logits_process")

try:
    from .test_model_parity import (
        VARIANTS,
        hf_llama_from_lmlab,
        make_model,
        random_ids,
        tiny_config,
    )
except ImportError:
    from test_model_parity import (  # noqa: E402
        VARIANTS,
        hf_llama_from_lmlab,
        make_model,
        random_ids,
        tiny_config,
    )

pytestmark = pytest.mark.usefixtures("one_thread")


def sharp(variant: str = "gqa-untied", seed: int = 11, **kw):
    return make_model(seed=seed, scale=0.3, layer_gain=3.0, **{**VARIANTS[variant], **kw})


def greedy(model, prompt, n, **kw):
    return generate(model, prompt, GenerationConfig(max_new_tokens=n, **kw))


# --- processors against transformers ------------------------------------------------------


def rand_logits(seed: int, batch: int = 8, vocab: int = 300, spread: float = 3.0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * spread


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_matches_hf_warper(min_p):
    x = rand_logits(int(min_p * 100))
    ours = filter_logits(x, min_p=min_p)
    ref = logits_process.MinPLogitsWarper(min_p=min_p)(None, x.clone())
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    assert 1 <= (~torch.isneginf(ours)).sum(-1).min() < 300


def seen_tokens(batch: int, seed: int, length: int = 12, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    x, ids = rand_logits(1), seen_tokens(8, 2)
    hist = History(ids.tolist(), 300)
    ours = apply_penalties(x, hist, GenerationConfig(repetition_penalty=penalty))
    ref = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone())
    torch.testing.assert_close(ours, ref)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_hf(n):
    ids = torch.randint(0, 6, (8, 30), generator=torch.Generator().manual_seed(n))  # repeats
    x = rand_logits(3, vocab=6)
    ours = apply_penalties(x, History(ids.tolist(), 6), GenerationConfig(no_repeat_ngram_size=n))
    ref = logits_process.NoRepeatNGramLogitsProcessor(n)(ids, x.clone())
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    assert torch.isneginf(ours).any()


def test_banned_ngrams_by_hand():
    assert sorted(banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    assert banned_ngram_tokens([1, 2, 3], 3) == []
    assert sorted(banned_ngram_tokens([4, 4, 5], 1)) == [4, 5]


def test_presence_and_frequency_penalties_count_only_the_output():
    x = torch.zeros(1, 5)
    hist = History([[0, 0, 1]], 5)  # the prompt does not count for these two
    hist.push([2])
    hist.push([2])
    hist.push([3])
    out = apply_penalties(x, hist, GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[0].tolist() == [0.0, 0.0, -1.0, -0.75, 0.0]


# --- batched generation ----------------------------------------------------------------------


def models_of_every_family():
    yield "gqa", sharp("gqa-untied")
    yield (
        "alibi-window",
        make_model(seed=3, scale=0.3, layer_gain=3.0, position="alibi", sliding_window=5),
    )
    torch.manual_seed(4)
    base = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.2)
    yield "prefix", build_model(ModelConfig(family="prefix", **base)).eval()
    enc = dict(base, n_decoder_layers=2, decoder_start_id=0, position="t5")
    yield "encdec", build_model(ModelConfig(family="encoder_decoder", **enc)).eval()


@pytest.mark.parametrize("name", ["gqa", "alibi-window", "prefix", "encdec"])
def test_batched_mixed_lengths_equal_one_by_one(name):
    model = dict(models_of_every_family())[name]
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 5, 1)]
    stop = greedy(model, prompts[1], 6)[3]  # row 1 stops early: the batch must shrink
    cfg = GenerationConfig(max_new_tokens=10, stop_ids=[stop])
    alone = [generate(model, p, cfg) for p in prompts]
    batch = generate_batch(model, prompts, cfg)
    assert [c.tokens for c in batch] == alone
    assert batch[1].finish_reason == "stop" and len(batch[1].tokens) <= 3
    assert any(c.finish_reason == "length" and len(c.tokens) == 10 for c in batch)


def test_streaming_callback_sees_every_token_in_order():
    model = sharp()
    prompts = [[1, 2, 3], [4, 5]]
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = generate_batch(
        model, prompts, GenerationConfig(max_new_tokens=7), on_token=lambda i, t: seen[i].append(t)
    )
    assert seen == {0: out[0].tokens, 1: out[1].tokens}


@torch.no_grad()
def test_logprobs_are_the_models_and_top_k_is_sorted():
    model = sharp()
    prompt = [7, 8, 9, 10]
    (c,) = generate_batch(model, [prompt], GenerationConfig(max_new_tokens=5, logprobs=3))
    full = model(torch.tensor([prompt + c.tokens])).float().log_softmax(-1)[0]
    for j, t in enumerate(c.tokens):
        ref = full[len(prompt) - 1 + j]
        assert abs(c.logprobs[j] - float(ref[t])) < 1e-4
        ids = [i for i, _ in c.top_logprobs[j]]
        assert ids == ref.topk(3).indices.tolist()
        assert ids[0] == t  # greedy picks the top one


def test_n_samples_per_prompt_are_seeded_and_distinct():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()  # lmlab's init: near-uniform, samples differ
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, n=4, seed=5)
    a = generate_batch(model, [[1, 2], [3, 4, 5]], cfg)
    b = generate_batch(model, [[1, 2], [3, 4, 5]], cfg)
    assert [c.prompt_index for c in a] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a[:4]}) > 1
    g = generate_batch(model, [[1, 2]], GenerationConfig(max_new_tokens=8, n=3))
    assert g[0].tokens == g[1].tokens == g[2].tokens == greedy(model, [1, 2], 8)


class CharTokenizer:
    """Token i is the character chr(97 + i % 26): enough to test stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_cut_the_text_and_end_the_row():
    model = sharp()
    prompt = [1, 2, 3]
    free = greedy(model, prompt, 12)
    text = CharTokenizer().decode(free)
    stop = text[4:6]
    cfg = GenerationConfig(max_new_tokens=12, stop_strings=[stop])
    (c,) = generate_batch(model, [prompt], cfg, tokenizer=CharTokenizer())
    assert c.finish_reason == "stop"
    assert c.text == text[: text.find(stop)]
    assert c.tokens == free[: text.find(stop) + 2]
    with pytest.raises(UsageError, match="tokenizer"):
        generate_batch(model, [prompt], cfg)


def test_bad_generation_settings_are_usage_errors():
    model = sharp()
    for bad in (dict(top_p=0.0), dict(min_p=1.0), dict(temperature=-1), dict(num_beams=0)):
        with pytest.raises(UsageError):
            generate(model, [1, 2], GenerationConfig(**bad))
    with pytest.raises(UsageError, match="empty"):
        generate(model, [], GenerationConfig())


# --- beam search against transformers ----------------------------------------------------------


def hf_beams(hf, prompt, n, beams, lp, early, eos, ret):
    ids = torch.tensor([prompt])
    out = hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=beams,
        length_penalty=lp,
        early_stopping=early,
        eos_token_id=eos,
        pad_token_id=eos,
        max_new_tokens=n,
        num_return_sequences=ret,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seqs = []
    for row in out.sequences[:, len(prompt) :].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        seqs.append(row)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize(
    ("lp", "early"), [(1.0, False), (2.0, False), (0.3, True), (1.5, "never"), (-0.5, False)]
)
@torch.no_grad()
def test_beam_search_matches_hf(lp, early):
    model = sharp("mha-untied", seed=21)
    hf = hf_llama_from_lmlab(model)
    prompt = random_ids(1, 5, seed=22)[0].tolist()
    path = greedy(model, prompt, 8)
    eos = path[2]  # a token the model likes: some beams end early, others run long
    cfg = GenerationConfig(
        max_new_tokens=10,
        num_beams=4,
        length_penalty=lp,
        early_stopping=early,
        stop_ids=[eos],
        num_return_sequences=3,
    )
    ours = beam_search(model, prompt, cfg)
    seqs, scores = hf_beams(hf, prompt, 10, 4, lp, early, eos, 3)
    assert [c.tokens for c in ours] == seqs
    assert [round(c.score, 4) for c in ours] == pytest.approx(
        [round(s, 4) for s in scores], abs=2e-3
    )
    assert any(c.finish_reason == "stop" for c in ours)


@torch.no_grad()
def test_beam_search_one_beam_is_greedy_and_wide_beams_score_at_least_greedy():
    model = sharp("gqa-tied", seed=23)
    prompt = [3, 1, 4, 1, 5]
    ref = greedy(model, prompt, 6)
    (one,) = beam_search(model, prompt, GenerationConfig(max_new_tokens=6, num_beams=1))
    assert one.tokens == ref
    (best,) = beam_search(model, prompt, GenerationConfig(max_new_tokens=6, num_beams=5))
    assert best.score >= one.score - 1e-6


# --- speculative decoding -------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_speculative_greedy_equals_plain_greedy(gamma):
    target = sharp("gqa-untied", seed=31)
    draft = sharp("mha-tied", seed=32, n_layers=1)
    prompt = random_ids(1, 5, seed=33)[0].tolist()
    ref = greedy(target, prompt, 24)
    comp, stats = speculative_generate(
        target, draft, prompt, GenerationConfig(max_new_tokens=24), gamma=gamma
    )
    assert comp.tokens == ref
    assert stats.tokens == 24 and 0 <= stats.acceptance_rate <= 1
    # the target itself as draft: everything is accepted, one target call per gamma + 1
    same, s2 = speculative_generate(
        target, target, prompt, GenerationConfig(max_new_tokens=24), gamma
    )
    assert same.tokens == ref and s2.acceptance_rate == 1.0
    assert s2.target_calls == -(-24 // (gamma + 1))


@torch.no_grad()
def test_speculative_sampling_draws_from_the_target_distribution():
    """Rejection sampling: the first token's frequencies match the target's (warped)
    distribution, not the draft's, though the draft's differs a lot."""
    target = make_model(seed=41, scale=0.3, layer_gain=2.0)
    draft = make_model(seed=42, scale=0.3, layer_gain=2.0, n_layers=1)
    prompt = [5, 9, 2]
    cfg = dict(max_new_tokens=2, temperature=1.0, top_k=6)
    p = filter_logits(target(torch.tensor([prompt]))[0, -1:].float(), top_k=6).softmax(-1)[0]
    q = filter_logits(draft(torch.tensor([prompt]))[0, -1:].float(), top_k=6).softmax(-1)[0]
    assert 0.5 * (p - q).abs().sum() > 0.3  # the draft alone would fail this test
    n = 1500
    counts = torch.zeros_like(p)
    for seed in range(n):
        comp, _ = speculative_generate(target, draft, prompt, GenerationConfig(seed=seed, **cfg), 2)
        counts[comp.tokens[0]] += 1
    assert 0.5 * (counts / n - p).abs().sum() < 0.06


def test_speculative_refuses_mismatched_vocabularies():
    target = sharp()
    draft = make_model(seed=1, vocab_size=200)
    with pytest.raises(UsageError, match="vocabulary"):
        speculative_generate(target, draft, [1, 2], GenerationConfig(), 2)


# --- contrastive decoding --------------------------------------------------------------------


def test_contrastive_scores_by_hand():
    expert = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    amateur = torch.log(torch.tensor([[0.6, 0.1, 0.1, 0.2]]))
    s = contrastive_scores(expert, amateur, alpha=0.2)
    # 0.05 < 0.2 * 0.5: implausible; the rest score log(pe / pa)
    assert torch.isneginf(s[0, 3])
    torch.testing.assert_close(s[0, :3], torch.log(torch.tensor([0.5 / 0.6, 3.0, 1.5])))


@torch.no_grad()
def test_contrastive_decoding_matches_a_loop_without_cache():
    expert = sharp("gqa-untied", seed=51)
    amateur = sharp("mha-tied", seed=52, n_layers=1)
    prompts = [[4, 4, 2, 8], [6, 1]]
    cfg = GenerationConfig(max_new_tokens=8)
    got = generate_batch(expert, prompts, cfg, contrast=Contrast(amateur, alpha=0.1))
    for c, prompt in zip(got, prompts, strict=True):
        ctx = list(prompt)
        for _ in range(8):
            x = torch.tensor([ctx])
            s = contrastive_scores(expert(x)[:, -1], amateur(x)[:, -1], 0.1)
            ctx.append(int(s.argmax()))
        assert c.tokens == ctx[len(prompt) :]
    assert [c.tokens for c in got] != [greedy(expert, p, 8) for p in prompts]


def test_greedy_tokens_equal_argmax_with_ties_nan_and_inf():
    """`greedy_tokens` (through `max`) picks what `argmax` picks: the first of tied
    maxima, a NaN where a row has one, index 0 for an all −inf row; any dtype."""
    from lmlab.infer.sampling import greedy_tokens

    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(4, 49152, generator=g),
        torch.randint(0, 3, (8, 1000), generator=g).float(),  # many ties
        torch.full((2, 500), float("-inf")),
    ]
    nan = torch.randn(3, 700, generator=g)
    nan[0, 123] = nan[0, 500] = float("nan")
    rows += [nan, torch.randn(5, 300, generator=g).bfloat16()]
    for x in rows:
        assert torch.equal(greedy_tokens(x), x.argmax(-1))

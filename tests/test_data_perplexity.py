"""Perplexity filter: the n-gram reference model and the checkpoint scorer."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from lmlab.data.perplexity import (
    NGramLM,
    PerplexityConfig,
    checkpoint_scorer,
    load_scorer,
    percentile_cutoff,
    prepare_model,
    tokens,
    train_ngram,
)
from lmlab.errors import UsageError
from lmlab.model import Transformer
from lmlab.model.checkpoint import save_checkpoint
from lmlab.tokenizer.train import train_bpe
from tests.test_components import TEXTS, _tiny_setup

_SYL = [c + v for c in "bdfgklmnprst" for v in "aeiou"]
W = [_SYL[i % 60] + _SYL[7 * i % 59] for i in range(300)]  # letters only: digits become 0
_ZIPF = [1 / (r + 1) for r in range(len(W))]


def _markov_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """Sentences from a sparse random bigram chain over Zipf-distributed words: structure
    for n-grams to learn, and counts-of-counts like those of real text."""
    rng = random.Random(0)
    nxt = {w: rng.choices(W, _ZIPF, k=4) for w in W}
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        w = rng.choice(W[:8])
        sent = [w]
        for _ in range(rng.randint(3, 12)):
            w = rng.choice(nxt[w]) if rng.random() < 0.8 else rng.choices(W, _ZIPF)[0]
            sent.append(w)
        lines.append(" ".join(sent))
    return ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]


@pytest.fixture(scope="module")
def corpus():
    return _markov_corpus(1500)


@pytest.fixture(scope="module")
def lm(corpus):
    return train_ngram(corpus, order=3, vocab_size=250)  # the rarest words become <unk>


def _reference_kn(corpus, order, vocab):
    """Interpolated modified Kneser–Ney straight from Chen & Goodman's formulas, on dicts."""
    known = set(vocab)
    grams = [Counter() for _ in range(order + 1)]
    for text in corpus:
        for line in text.split("\n"):
            s = ["<s>"] + [w if w in known else "<unk>" for w in tokens(line) if w != "\n"]
            s.append("</s>")
            for k in range(1, order + 1):
                for i in range(max(1, k - 1), len(s)):
                    if i - k + 1 >= 0:
                        grams[k][tuple(s[i - k + 1 : i + 1])] += 1
    adj = [None] * (order + 1)
    adj[order] = grams[order]
    for k in range(order - 1, 0, -1):
        left = Counter(g[1:] for g in grams[k + 1])
        adj[k] = Counter({g: c if g[0] == "<s>" else left[g] for g, c in grams[k].items()})
    disc = [None]
    for k in range(1, order + 1):
        n = Counter(adj[k].values())
        y = n[1] / (n[1] + 2 * n[2])
        disc.append([0, 1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3]])
    predicted = [w for w in vocab if w != "<s>"]
    by_context = [{} for _ in range(order + 1)]
    for k in range(2, order + 1):
        for g, c in adj[k].items():
            by_context[k].setdefault(g[:-1], {})[g[-1]] = c

    def d(k, c):
        return disc[k][min(c, 3)] if c else 0.0

    def p(word, ctx):
        k = len(ctx) + 1
        if k == 1:
            total = sum(adj[1].values())
            gamma = sum(d(1, c) for c in adj[1].values()) / total
            a = adj[1].get((word,), 0)
            return (a - d(1, a)) / total + gamma / len(predicted)
        conts = by_context[k].get(ctx, {})
        lower = p(word, ctx[1:])
        if not conts:
            return lower
        s = sum(conts.values())
        gamma = sum(d(k, c) for c in conts.values()) / s
        a = conts.get(word, 0)
        return (a - d(k, a)) / s + gamma * lower

    return p, disc[1:]


def test_matches_the_modified_kneser_ney_formulas(corpus, lm):
    ref, discounts = _reference_kn(corpus, 3, lm.vocab)
    assert np.allclose(lm.discounts, [x[1:] for x in discounts])  # no clipping on this corpus
    contexts = [("<s>",), (W[3],), ("<s>", W[1]), (W[2], W[17]), (W[5], W[5]), ("<unk>", W[9])]
    contexts += [(W[38], W[39]), ("</s>",), ()]  # rare and unseen contexts back off
    for ctx in contexts:
        for w in [W[0], W[1], W[7], W[20], W[33], "<unk>", "</s>"]:
            assert lm.logprob(w, ctx) == pytest.approx(math.log(ref(w, ctx)), abs=2e-6)


@pytest.mark.parametrize("ctx", [(), ("<s>",), (W[4],), ("<s>", W[2]), (W[6], W[8]), ("x", "y")])
def test_probabilities_sum_to_one_over_the_vocabulary(lm, ctx):
    total = sum(math.exp(lm.logprob(w, ctx)) for w in lm.vocab if w != "<s>")
    assert total == pytest.approx(1.0, abs=1e-5)


def test_document_score_is_the_sum_of_word_probabilities(lm):
    words = [[W[1], W[5], W[9]], [W[3], W[3], W[0], "zz", W[2]]]
    text = "\n\n".join(" ".join(ws) for ws in words) + "\n"
    total, n = 0.0, 0
    for sent in words:
        ctx = ["<s>"]
        for w in [*sent, "</s>"]:
            total += lm.logprob(w, ctx[-2:])
            ctx.append(w)
            n += 1
    assert lm.perplexity(text) == pytest.approx(math.exp(-total / n), rel=1e-6)
    assert tokens("Fig. 12: x=3") == ["fig", ".", "00", ":", "x", "=", "0"]


def test_in_domain_text_scores_lower_than_shuffled_words(lm):
    rng = random.Random(1)
    held_out = _markov_corpus(200, seed=0)[-20:]  # same chain; sentences unseen
    for text in held_out:
        ws = text.split()
        rng.shuffle(ws)
        shuffled = "\n".join(" ".join(ws[i : i + 8]) for i in range(0, len(ws), 8))
        assert lm.perplexity(text) < 0.5 * lm.perplexity(shuffled)
    assert math.isfinite(lm.perplexity("")) and lm.perplexity("never seen words") > 10


def test_save_load_round_trip(lm, tmp_path):
    lm.save(tmp_path / "lm.npz")
    back = NGramLM.load(tmp_path / "lm.npz")
    assert back.vocab == lm.vocab and back.order == lm.order
    for text in [" ".join(W[:3]), f"{W[9]} {W[4]}\n{W[7]} {W[7]} {W[7]} unknown", ""]:
        assert back.perplexity(text) == lm.perplexity(text)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not an lmlab n-gram model"):
        NGramLM.load(tmp_path / "bad.npz")


def test_prepare_model_trains_on_reference_files(corpus, tmp_path):
    (tmp_path / "ref.txt").write_text("\n".join(corpus[:60]))
    (tmp_path / "ref.jsonl").write_text(f'{{"text": "{W[1]} {W[2]}"}}\n{{bad json\n')
    cfg = TypeAdapter(PerplexityConfig).validate_python(
        {"reference": [str(tmp_path / "ref.txt"), str(tmp_path / "ref.jsonl")], "order": 3}
    )
    path = prepare_model(cfg, tmp_path / "work" / "model")
    assert path.endswith("model.npz")
    score = load_scorer(path)
    direct = train_ngram(["\n".join(corpus[:60]), f"{W[1]} {W[2]}"], order=3)
    assert score(corpus[70]) == pytest.approx(direct.perplexity(corpus[70]), rel=1e-6)
    cfg2 = TypeAdapter(PerplexityConfig).validate_python({"model": path})
    assert prepare_model(cfg2, tmp_path / "unused") == path


def test_config_validation(tmp_path):
    ta = TypeAdapter(PerplexityConfig)
    for bad in [
        {},  # neither a model nor reference text
        {"model": str(tmp_path), "reference": [str(tmp_path)]},
        {"model": str(tmp_path / "missing.npz")},
        {"reference": [str(tmp_path)], "order": 9},
        {"reference": [str(tmp_path)], "keep_percentile": 0},
        {"reference": [str(tmp_path)], "max_perplexity": -1.0},
        {"reference": [str(tmp_path)], "percentile": 50},
    ]:
        with pytest.raises(ValidationError):
            ta.validate_python(bad)


def test_percentile_cutoff():
    scores = np.arange(1.0, 11.0)
    assert percentile_cutoff(scores, 50) == 5.0
    assert percentile_cutoff(scores, 25) == 3.0  # 2/10 < 25% ≤ 3/10
    assert percentile_cutoff(scores, 100) == 10.0
    assert (scores <= percentile_cutoff(scores, 70)).mean() == 0.7
    assert percentile_cutoff(np.array([np.nan, 2.0, np.inf, 4.0]), 50) == 2.0
    assert percentile_cutoff(np.array([]), 50) == math.inf


def test_checkpoint_scorer_matches_a_direct_forward_pass(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=400, min_frequency=1)
    cfg_m, _ = _tiny_setup(tmp_path, tok)  # max_seq_len 32
    model = Transformer(cfg_m).eval()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    score = checkpoint_scorer(tmp_path / "ckpt")
    assert load_scorer(tmp_path / "ckpt")(TEXTS[0]) == pytest.approx(score(TEXTS[0]))
    eos = tok.token_to_id("<|endoftext|>")

    def direct(ids):  # one window at a time, no batching or padding
        nll, n = 0.0, 0
        for s in range(0, len(ids) - 1, 31):
            w = torch.tensor([ids[s : s + 32]])
            with torch.no_grad():
                lp = torch.log_softmax(model(w)[0, :-1], -1)
            nll -= lp.gather(-1, w[0, 1:, None]).sum().item()
            n += w.shape[1] - 1
        return math.exp(nll / n)

    short = "def add(a, b):"
    long = TEXTS[0] * 4 + TEXTS[1]
    for text in (short, long):
        ids = [eos, *tok.encode(text).ids, eos]
        assert score(text) == pytest.approx(direct(ids), rel=1e-4)
    assert len(tok.encode(long).ids) > 64  # several windows, the last one padded

"""Evaluation metrics, statistics and calibration against reference packages and hand cases."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmlab.errors import UsageError
from lmlab.eval.calibration import (
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_plot,
)
from lmlab.eval.metrics import (
    corpus_bleu,
    corpus_chrf,
    exact_match,
    mean_pass_at_k,
    mean_stderr,
    pass_at_k,
    rouge,
    rouge_l,
    sentence_bleu,
    sentence_chrf,
    squad_exact_match,
    token_f1,
)
from lmlab.eval.stats import (
    bootstrap,
    paired_bootstrap,
    paired_t_test,
    stderr_mean,
    stderr_proportion,
    summarize,
    t_quantile,
    t_two_sided_p,
    wilson_interval,
)

# --- token F1 / exact match --------------------------------------------------------------


def test_token_f1_squad_definition():
    # articles and punctuation go: [cat sat on mat] vs [cat on mat] -> P 3/4, R 1, F1 6/7
    assert token_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("Paris", ["London", "paris!"]) == 1.0  # best over references
    assert token_f1("the", "") == 1.0 and token_f1("x", "the") == 0.0  # empty after normalising
    assert squad_exact_match("The Eiffel Tower", ["eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", "eiffel tower") == 0.0
    # the existing exact_match keeps articles (callers rely on it)
    assert exact_match("an answer", "the answer") == 0.0
    with pytest.raises(UsageError, match="token_f1"):
        token_f1("x", [])


# --- BLEU, chrF, ROUGE -------------------------------------------------------------------


def test_bleu_hand_case_and_sacrebleu():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1
    hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu(hyp, ref) == pytest.approx(hand)
    assert corpus_bleu([hyp], [ref]) == pytest.approx(hand)

    hyps = ["the cat sat on the mat", "hello world there", "a b c d e"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], "hello world", ["a b c d f"]]
    streams = [
        ["the cat is on the mat", "hello world", "a b c d f"],
        ["a cat sat on the mat", None, None],
    ]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    for h, r in zip(hyps, refs, strict=True):
        rl = [r] if isinstance(r, str) else r
        assert sentence_bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, rl).score)
        assert sentence_chrf(h, r) == pytest.approx(sacrebleu.sentence_chrf(h, rl).score)
    # BLEU is a corpus statistic, not a mean of sentence scores
    mean_sentence = np.mean([sentence_bleu(h, r) for h, r in zip(hyps, refs, strict=True)])
    assert corpus_bleu(hyps, refs) != pytest.approx(mean_sentence)
    with pytest.raises(UsageError, match="2 predictions but 1"):
        corpus_bleu(["a", "b"], ["a"])


def test_chrf_hand_case():
    # char n-grams, whitespace removed: "ab" vs "abc". Orders 1-2 are effective:
    # P = (1 + 1)/2, R = (2/3 + 1/2)/2 = 7/12; F_beta=2 = 5PR / (4P + R) = 7/11
    assert sentence_chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert sentence_chrf("same text", "same text") == pytest.approx(100.0)


def test_rouge_hand_case_and_reference():
    got = rouge("the cat sat", "the cat ran")
    assert got["rouge1"] == pytest.approx(2 / 3)
    assert got["rouge2"] == pytest.approx(1 / 2)
    assert got["rougeL"] == pytest.approx(2 / 3)
    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [("cats are running fast", "the cat runs quickly"), ("a b c d", "d c b a")]
    for p, r in pairs:
        want = ref.score(r, p)
        got = rouge(p, r)
        assert got == pytest.approx({k: want[k].fmeasure for k in got})
        assert got["rougeL"] == pytest.approx(rouge_l(p, r))
    assert rouge("a b", ["x y", "a b"])["rouge2"] == 1.0  # best over references


# --- pass@k ----------------------------------------------------------------------------------


def test_pass_at_k_against_exact_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 0, 5) == 0.0  # nothing passes
    assert pass_at_k(10, 7, 5) == 1.0  # n - c < k: every 5-subset holds a pass
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is c / n
    # large n: binomials with ~60 digits, still exact to double precision
    exact = 1 - Fraction(comb(200 - 3, 100), comb(200, 100))
    assert pass_at_k(200, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    assert mean_pass_at_k([(4, 1), (4, 4)], 1) == pytest.approx((0.25 + 1) / 2)
    for bad in ((0, 0, 1), (5, 6, 1), (5, 1, 6), (5, 1, 0)):
        with pytest.raises(UsageError, match="pass_at_k"):
            pass_at_k(*bad)


# --- statistics ------------------------------------------------------------------------------


def test_student_t_hand_values():
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| >= 1) = 1/2
    for t in (0.3, 2.0, 7.5):  # df = 2 has a closed form: 1 - t / sqrt(2 + t^2)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12)
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert t_quantile(0.95, 10**6) == pytest.approx(1.959964, abs=1e-5)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_student_t_against_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30, 500):
        for t in (0.05, 0.7, 1.96, 3.3, 12.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * st.t.sf(t, df), rel=1e-10)
        assert t_quantile(0.95, df) == pytest.approx(st.t.ppf(0.975, df), rel=1e-9)
        assert t_quantile(0.99, df) == pytest.approx(st.t.ppf(0.995, df), rel=1e-9)


def test_paired_t_test_hand_case_and_scipy():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3), df = 2
    r = paired_t_test([0, 0, 0], [1, 2, 3])
    t = 2 * math.sqrt(3)
    assert (r.diff, r.df, r.n, r.method) == (2.0, 2, 3, "paired-t")
    assert r.stderr == pytest.approx(1 / math.sqrt(3)) and r.t == pytest.approx(t)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert r.ci[0] < 2.0 < r.ci[1]
    # no noise: identical scores give p = 1, a constant shift p = 0 (JSON turns inf into None)
    assert paired_t_test([1, 0, 1], [1, 0, 1]).p_value == 1.0
    shift = paired_t_test([0, 0, 1], [1, 1, 2])
    assert shift.p_value == 0.0 and shift.to_dict()["t"] is None
    st = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 80).astype(float)
    b = np.where(rng.uniform(size=80) < 0.2, 1 - a, a)
    want = st.ttest_rel(b, a)
    got = paired_t_test(a, b)
    assert got.t == pytest.approx(want.statistic) and got.p_value == pytest.approx(want.pvalue)
    with pytest.raises(UsageError, match="same items"):
        paired_t_test([1, 2], [1])


def test_analytic_stderrs():
    assert stderr_mean([0.0, 1.0, 1.0, 0.0]) == pytest.approx(mean_stderr([0.0, 1.0, 1.0, 0.0])[1])
    assert math.isnan(stderr_mean([1.0]))
    assert stderr_proportion(30, 100) == pytest.approx(math.sqrt(0.3 * 0.7 / 100))
    lo, hi = wilson_interval(0, 10)  # at 0 successes the upper bound is z^2 / (n + z^2)
    z2 = 1.959963984540054**2
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2))
    st = pytest.importorskip("scipy.stats")
    for k, n in ((7, 20), (0, 5), (50, 50)):
        want = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((want.low, want.high))


def test_bootstrap_seeded_and_close_to_analytic():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=400)
    r = bootstrap(x, n_boot=2000, seed=7)
    assert r.value == pytest.approx(x.mean())
    assert r.stderr == pytest.approx(stderr_mean(x), rel=0.1)
    assert r.ci[0] < x.mean() < r.ci[1]
    assert bootstrap(x, n_boot=2000, seed=7) == r  # seeded: reproducible
    assert bootstrap(x, n_boot=2000, seed=8).stderr != r.stderr
    # a plain function and its vectorised form see the same resamples
    slow = bootstrap(list(x), lambda v: float(np.mean(v)), n_boot=300, seed=1)
    fast = bootstrap(x, lambda m: m.mean(axis=1), n_boot=300, seed=1, vectorized=True)
    assert slow.stderr == pytest.approx(fast.stderr) and slow.ci == pytest.approx(fast.ci)
    with pytest.raises(UsageError, match="metric"):
        bootstrap(x, "mode")


def _bleu_of(items):
    return corpus_bleu([p for p, _ in items], [r for _, r in items])


def test_bootstrap_corpus_metric_and_paired_bootstrap():
    refs = [f"the {w} sat on the mat today" for w in ("cat", "dog", "cow", "hen", "fox", "owl")]
    good = [r.replace("today", "now") for r in refs]
    bad = [" ".join(r.split()[:3]) for r in refs]
    r = bootstrap(list(zip(good, refs, strict=True)), _bleu_of, n_boot=200, seed=0)
    assert r.value == pytest.approx(corpus_bleu(good, refs)) and r.stderr >= 0
    cmp = paired_bootstrap(
        list(zip(bad, refs, strict=True)),
        list(zip(good, refs, strict=True)),
        _bleu_of,
        n_boot=200,
        seed=0,
    )
    assert cmp.diff == pytest.approx(corpus_bleu(good, refs) - corpus_bleu(bad, refs))
    assert cmp.diff > 0 and cmp.ci[0] > 0 and cmp.p_value == pytest.approx(1 / 200)
    same = paired_bootstrap([0, 1, 1, 0], [0, 1, 1, 0], n_boot=100)
    assert same.diff == 0 and same.p_value == 1.0 and same.ci == (0.0, 0.0)
    # paired beats unpaired: a small consistent gain on noisy items is detected
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 200)
    pb = paired_bootstrap(a, a + 0.1 + rng.normal(0, 0.05, 200), n_boot=500)
    assert pb.p_value < 0.01 and pb.method == "paired-bootstrap"


def test_summarize():
    acc = [1, 0, 1, 1, 0, 1, 1, 1]
    s = summarize(acc)
    assert set(s) == {"value", "stderr", "ci95", "n", "method"}
    assert s["value"] == pytest.approx(6 / 8) and s["method"] == "analytic-t" and s["n"] == 8
    half = t_quantile(0.95, 7) * stderr_mean(acc)
    assert s["ci95"] == pytest.approx([6 / 8 - half, 6 / 8 + half])
    p = summarize(acc, "proportion")
    assert p["method"] == "wilson" and p["stderr"] == pytest.approx(stderr_proportion(6, 8))
    b = summarize([3.0, 1.0, 2.0, 10.0, 4.0], "median", n_boot=100)
    assert b["method"] == "bootstrap" and b["value"] == 3.0
    one = summarize([0.5])
    assert one["stderr"] is None and one["ci95"] is None
    json.dumps([s, p, b, one], allow_nan=False)  # JSON-safe, no NaN
    with pytest.raises(UsageError, match="0 or 1"):
        summarize([0.5, 1.0], "proportion")
    with pytest.raises(UsageError, match="no values"):
        summarize([])


# --- calibration ----------------------------------------------------------------------------


def test_ece_hand_cases():
    # perfectly calibrated: 1 of 4 right at 0.25, 3 of 4 right at 0.75
    conf = [0.25] * 4 + [0.75] * 4
    correct = [1, 0, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)
    assert maximum_calibration_error(conf, correct) == pytest.approx(0.0)
    # all confident, all wrong
    assert expected_calibration_error([1.0] * 5, [False] * 5) == pytest.approx(1.0)
    # two bins: (0.9 conf, 1/2 right) weight 2/3 gap 0.4; (0.3 conf, 1 right) weight 1/3 gap 0.7
    conf, correct = [0.9, 0.9, 0.3], [1, 0, 1]
    assert expected_calibration_error(conf, correct) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.7)
    assert maximum_calibration_error(conf, correct) == pytest.approx(0.7)
    assert brier_score(conf, correct) == pytest.approx((0.01 + 0.81 + 0.49) / 3)
    # Guo et al.'s bins are ((m-1)/M, m/M]: 0.1 is in the first bin, 0 too
    bins = calibration_bins([0.0, 0.1, 0.1000001, 1.0], [1, 1, 1, 1], n_bins=10)
    assert [b.count for b in bins] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [1])
    with pytest.raises(UsageError, match="same length"):
        expected_calibration_error([0.5, 0.5], [1])


def test_ece_against_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 500)
    correct = rng.uniform(size=500) < conf**2
    # a 4-way choice whose top probability is `conf` on class 0; right iff the target is 0
    probs = np.stack([conf] + [(1 - conf) / 3] * 3, axis=1)
    target = np.where(correct, 0, 1)
    args = (torch.tensor(probs), torch.tensor(target))
    for norm, ours in (("l1", expected_calibration_error), ("max", maximum_calibration_error)):
        want = tm.multiclass_calibration_error(*args, num_classes=4, n_bins=15, norm=norm)
        assert ours(conf, correct, n_bins=15) == pytest.approx(float(want), abs=1e-6)


def test_reliability_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 200)
    correct = rng.uniform(size=200) < conf
    out = reliability_plot(conf, correct, tmp_path / "plots" / "reliability.png", title="MC")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert [p.name for p in out.parent.iterdir()] == ["reliability.png"]  # no temp file left
    with pytest.raises(UsageError):
        reliability_plot([], [], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()

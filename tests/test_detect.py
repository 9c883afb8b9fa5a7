"""Generated-text detection without a watermark: AUROC against scikit-learn, the log-rank
against a full-vocabulary argsort, the log-likelihood against lmlab's continuation
scorer, DetectGPT's curvature against its formula, separation of a tiny model's greedy
text from other text, and the `detect-generated` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import UsageError
from lmlab.eval.perturb import Perturbation
from lmlab.prompt.likelihood import score_continuations
from lmlab.trust.detect import (
    auroc,
    curvature_z,
    evaluate,
    perturbations_of,
    score_texts,
    token_scores,
)
from tests.conftest import lmlab_here
from tests.serving import TEXTS, tiny_checkpoint

HUMAN = [
    "The committee will meet again next spring to review the budget.",
    "Hello there, my cat sleeps on the warm windowsill all afternoon.",
    "Paris was quiet that morning, and the bakeries opened late.",
    "Tokens of gratitude were left at the old stone bridge.",
    "The quick rain soaked every tent at the festival by noon.",
    "def mul(x, y):\n    return x * y\n",
    "Hello again, the train to Lyon is delayed by twenty minutes.",
    "Tokens are cheap, but attention is what the reader pays.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny checkpoint (random weights, varied greedy picks)."""
    from lmlab import load_model, load_tokenizer

    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("detect"))
    return ckpt, load_model(ckpt), load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained 80 steps on the serving texts, saved; and a labelled set:
    HUMAN (0) and the model's greedy continuations of their first words (1)."""
    from lmlab import load_model, load_tokenizer
    from lmlab.infer.generate import generate
    from lmlab.infer.options import GenerationConfig
    from lmlab.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("detect_trained")
    ckpt = tiny_checkpoint(root, max_seq_len=64)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    eos = tok.token_to_id("<|endoftext|>")
    stream = [t for s in TEXTS[:5] for t in [eos, *tok.encode(s).ids]] * 8
    data = torch.tensor(stream)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        starts = torch.randint(0, len(data) - 49, (8,)).tolist()
        x = torch.stack([data[s : s + 48] for s in starts])
        y = torch.stack([data[s + 1 : s + 49] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    saved = save_checkpoint(model, root / "trained", tokenizer_dir=root / "tok")
    # greedy continuations of each sentence's first 1 to 3 words, kept where the text
    # tokenizes back to the ids generated: the bytes this near-random model emits often
    # do not, and a detector can only score the text it is given
    machine: list[str] = []
    for k in (1, 2, 3):
        for h in HUMAN:
            ids = tok.encode(" ".join(h.split()[:k]), add_special_tokens=False).ids
            ids += generate(model, ids, GenerationConfig(max_new_tokens=20, stop_ids=[eos]))
            text = tok.decode(ids)
            if tok.encode(text, add_special_tokens=False).ids == ids and text not in machine:
                machine.append(text)
    assert len(machine) >= 5
    texts, labels = HUMAN + machine, [0] * len(HUMAN) + [1] * len(machine)
    return saved, model, tok, texts, labels


def test_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 301):
        for _ in range(5):
            labels = rng.integers(0, 2, n)
            labels[:2] = [0, 1]  # both classes present
            scores = rng.integers(0, 4, n).astype(float)  # many ties
            assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
            cont = rng.normal(size=n) + labels
            assert auroc(cont, labels) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)
    assert auroc([1.0, 1.0, 1.0], [0, 1, 1]) == 0.5
    assert auroc([0.1, 0.9], [0, 1]) == 1.0 and auroc([0.9, 0.1], [0, 1]) == 0.0
    for bad in (([0.1, 0.2], [1, 1]), ([0.1], [0, 1]), ([0.1, 0.2], [0, 2])):
        with pytest.raises(UsageError):
            auroc(*bad)
    with pytest.raises(UsageError, match="NaN"):
        auroc([math.nan, 0.2], [0, 1])


def test_logrank_and_loglik_by_hand(tiny):
    _, model, tok = tiny
    eos = tok.token_to_id("<|endoftext|>")
    texts = TEXTS[:5]
    scores = score_texts(model, tok, texts, max_tokens=200, batch_size=2)
    for text, s in zip(texts, scores, strict=True):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert s.tokens == len(ids)
        with torch.no_grad():
            logits = model(torch.tensor([[eos, *ids[:-1]]]))[0].double()
        # the rank of each observed token in a full descending argsort of the vocabulary
        order = torch.argsort(logits, dim=-1, descending=True, stable=True)
        ranks = [int((order[t] == i).nonzero()) + 1 for t, i in enumerate(ids)]
        assert s.logrank == pytest.approx(-np.mean(np.log(ranks)), abs=1e-9)
        (ll, _), *_ = score_continuations(model, [([eos], ids)])
        assert s.loglik == pytest.approx(ll / len(ids), abs=1e-5)
    # batching and padding change nothing
    alone = [score_texts(model, tok, [t])[0] for t in texts]
    for a, b in zip(alone, scores, strict=True):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-5) and a.logrank == b.logrank


def test_truncation_to_first_tokens(tiny):
    _, model, tok = tiny
    eos = tok.token_to_id("<|endoftext|>")
    text = " ".join(TEXTS[:5])
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 50
    for n in (5, 50):
        s = score_texts(model, tok, [text], max_tokens=n)[0]
        assert s.tokens == n
        (ll, lr), *_ = token_scores(model, [ids[:n]], eos)
        assert (s.loglik, s.logrank) == (ll, -lr)


def test_curvature_is_detectgpt_z(tiny):
    _, model, tok = tiny
    eos = tok.token_to_id("<|endoftext|>")
    p = Perturbation("typos", 0.1)
    texts = TEXTS[:3]
    got = score_texts(model, tok, texts, ("curvature",), perturbations=4, perturbation=p)
    for i, (text, s) in enumerate(zip(texts, got, strict=True)):
        copies = perturbations_of(text, 4, p, seed=i)
        assert len(set(copies)) > 1 and text not in copies
        lls = []
        for c in copies:
            cid = tok.encode(c, add_special_tokens=False).ids
            lls.append(score_continuations(model, [([eos], cid)])[0][0] / len(cid))
        want = (s.loglik - np.mean(lls)) / np.std(lls)
        assert s.curvature == pytest.approx(want, abs=1e-4)
    assert curvature_z(-1.0, [-2.0]) == 1.0  # one copy: the plain discrepancy


def test_greedy_text_is_detected(trained):
    _, model, tok, texts, labels = trained
    found = evaluate(model, tok, texts, labels, perturbations=4)
    assert found["auroc"]["loglik"] > 0.9
    assert found["auroc"]["logrank"] > 0.9
    assert 0 <= found["auroc"]["curvature"] <= 1
    assert found["human"] == len(HUMAN) and found["machine"] == len(texts) - len(HUMAN)


def test_cli_scores_and_auroc(trained, tmp_path, monkeypatch, capsys):
    ckpt, model, tok, texts, labels = trained
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-generated", "--model", str(ckpt), texts[0], "--json"
    )
    assert code == 0, err
    row = json.loads(out)
    want = score_texts(model, tok, [texts[0]], ("loglik", "logrank", "curvature"))[0]
    assert row["loglik"] == pytest.approx(want.loglik, abs=1e-6)
    assert row["logrank"] == pytest.approx(want.logrank, abs=1e-6)
    assert row["curvature"] == pytest.approx(want.curvature, abs=1e-4)

    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-generated", "--model", str(ckpt), "--file", str(f),
        "--method", "logrank", "--tokens", "5",
    )  # fmt: skip
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all("logrank" in x and "tokens 5" in x for x in lines)

    lab = tmp_path / "labelled.jsonl"
    lab.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)
        )
    )
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-generated", "--model", str(ckpt), "--labelled", str(lab),
        "--method", "loglik", "--method", "logrank", "--json",
    )  # fmt: skip
    assert code == 0, err
    found = json.loads(out)
    assert set(found["auroc"]) == {"loglik", "logrank"}
    assert found["auroc"]["logrank"] > 0.9
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-generated", "--model", str(ckpt), "--labelled", str(lab),
        "--method", "logrank",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[1].split() == ["AUROC", "logrank", f"{found['auroc']['logrank']:.4f}"]


@pytest.mark.parametrize(
    "args, content, message",
    [
        (["hello", "--method", "entropy"], None, "unknown method"),
        (["   "], None, "empty text"),
        ([], None, "exactly one of"),
        (["--file", "{f}"], '{"txt": "no text field"}\n', "text"),
        (["--file", "{f}"], "not json\n", "not JSON"),
        (["--labelled", "{f}"], '{"text": "a b c"}\n', "label"),
        (["--labelled", "{f}"], '{"text": "a b c", "label": 2}\n', "label"),
        (["--labelled", "{f}"], '{"text": "a b c", "label": 1}\n', "each label"),
        (["hello", "--tokens", "0"], None, "--tokens"),
        (["hello", "--perturbations", "0"], None, "perturbations"),
    ],
)
def test_cli_bad_input_exits_2(tiny, tmp_path, monkeypatch, capsys, args, content, message):
    ckpt, _, _ = tiny
    f = tmp_path / "in.jsonl"
    if content is not None:
        f.write_text(content)
    args = [a.replace("{f}", str(f)) for a in args]
    code, _, err = lmlab_here(monkeypatch, capsys, "detect-generated", "--model", str(ckpt), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1

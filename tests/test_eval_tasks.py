"""lm-eval-shaped YAML tasks run by lmlab: scores against a direct computation, and the
same task through lm-evaluation-harness (its HF backend on an exported copy) agrees."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from lmlab import load_model, load_tokenizer
from lmlab.errors import UsageError
from lmlab.eval.tasks import apply_filters, load_task, run_task
from lmlab.prompt.likelihood import prefix_token

pytestmark = pytest.mark.usefixtures("one_thread")

MC_DOCS = [
    {"q": "import", "choices": ["os", "the", "json"], "label": 0},
    {"q": "def __init__(self", "choices": [", x):", " banana", "):"], "label": 2},
    {"q": "return", "choices": [" None", " cat", " self"], "label": 0},
    {"q": "for i in", "choices": [" range(n):", " apple", " dog"], "label": 0},
    {"q": "class Foo", "choices": ["(object):", " tree", ":"], "label": 2},
]
TEXT_DOCS = [
    {"text": "def add(a, b):\n    return a + b\n"},
    {"text": "import os\nimport sys\n\n" + "x = 1\n" * 40},  # longer than one window
]
GEN_DOCS = [{"q": "import", "a": "os"}, {"q": "def", "a": "main"}]


def write_task(tmp_path, name: str, docs: list[dict], body: str) -> str:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\n{body}"
    )
    return str(path)


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_mutual_info
"""
ROLLING_BODY = """output_type: loglikelihood_rolling
doc_to_text: text
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_BODY = """output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: a
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z_]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
"""


@pytest.fixture(scope="module")
def smoke(smoke_run):
    ckpt = smoke_run / "pretrain" / "model"
    return ckpt, load_model(ckpt), load_tokenizer(ckpt)


@torch.no_grad()
def direct_ll(model, tok, ctx: str, cont: str) -> float:
    """Continuation log-prob by one plain forward pass, no batching or truncation."""
    c = tok.encode(ctx).ids if ctx else [prefix_token(tok)]
    whole = tok.encode(ctx + cont).ids if ctx else c + tok.encode(cont).ids
    k = whole[len(c) :] if ctx else whole[1:]
    logp = model(torch.tensor([whole])).float().log_softmax(-1)[0]
    return float(sum(logp[len(whole) - len(k) - 1 + j, t] for j, t in enumerate(k)))


def test_multiple_choice_scores_match_a_direct_computation(smoke, tmp_path):
    _, model, tok = smoke
    task = load_task(write_task(tmp_path, "mc", MC_DOCS, MC_BODY))
    out = run_task(model, tok, task)
    acc, acc_norm, mi = [], [], []
    for doc, rec in zip(MC_DOCS, out["records"], strict=True):
        lls = np.array([direct_ll(model, tok, doc["q"], c) for c in doc["choices"]])
        unc = np.array([direct_ll(model, tok, "", c) for c in doc["choices"]])
        np.testing.assert_allclose(rec["loglikelihoods"], lls, rtol=1e-4, atol=1e-4)
        lens = np.array([len(c) for c in doc["choices"]])
        acc.append(float(lls.argmax() == doc["label"]))
        acc_norm.append(float((lls / lens).argmax() == doc["label"]))
        mi.append(float((lls - unc).argmax() == doc["label"]))
    res = out["results"]
    assert res["acc"]["value"] == pytest.approx(np.mean(acc))
    assert res["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))
    assert res["acc_mutual_info"]["value"] == pytest.approx(np.mean(mi))
    assert res["acc"]["stderr"] >= 0 and out["n"] == 5


@torch.no_grad()
def test_rolling_perplexity_matches_explicit_windows(smoke, tmp_path):
    _, model, tok = smoke
    task = load_task(write_task(tmp_path, "roll", TEXT_DOCS, ROLLING_BODY))
    out = run_task(model, tok, task)
    max_len = model.cfg.max_seq_len
    total, words, nbytes = 0.0, 0, 0
    for doc, rec in zip(TEXT_DOCS, out["records"], strict=True):
        ids = tok.encode(doc["text"]).ids
        seq = [prefix_token(tok)] + ids
        ll, j = 0.0, 0
        while j < len(ids):  # disjoint windows of max_len predictions
            end = min(j + max_len, len(ids))
            lo = max(0, end - max_len)
            logp = model(torch.tensor([seq[lo:end]])).float().log_softmax(-1)[0]
            ll += float(sum(logp[p - lo, ids[p]] for p in range(j, end)))
            j = end
        assert rec["loglikelihood"] == pytest.approx(ll, rel=1e-5)
        total += ll
        words += len(doc["text"].split()) + (1 if doc["text"][-1].isspace() else 0)
        nbytes += len(doc["text"].encode())
    assert len(tok.encode(TEXT_DOCS[1]["text"]).ids) > max_len  # several windows were used
    res = out["results"]
    assert res["word_perplexity"]["value"] == pytest.approx(math.exp(-total / words), rel=1e-6)
    assert res["bits_per_byte"]["value"] == pytest.approx(-total / nbytes / math.log(2))


def test_generation_task_filters_and_exact_match(smoke, tmp_path):
    _, model, tok = smoke
    task = load_task(write_task(tmp_path, "gen", GEN_DOCS, GEN_BODY))
    out = run_task(model, tok, task)
    for rec in out["records"]:
        assert rec["filtered"] == apply_filters(rec["generation"], task.filters)
        assert rec["exact_match"] == float(rec["filtered"].lower() == rec["target"].lower())
    assert (
        apply_filters("The answer is 42.", [{"function": "regex", "regex_pattern": r"(\d+)"}])
        == "42"
    )
    assert (
        apply_filters("nothing", [{"function": "regex", "regex_pattern": r"(\d+)"}]) == "[invalid]"
    )


def test_bad_task_files_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\noutput_type: ranking\ndataset_path: json\n")
    with pytest.raises(UsageError, match="output_type"):
        load_task(bad)
    path = write_task(tmp_path, "m", MC_DOCS, MC_BODY.replace("acc_norm", "f1"))
    with pytest.raises(UsageError, match="f1"):
        load_task(path)


def test_lm_eval_scores_the_same_task_the_same(smoke, tmp_path):
    """The same YAML through lm-evaluation-harness (HF backend on `lmlab export`)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lmlab.model.hf import export_to_hf

    ckpt, model, tok = smoke
    hf_dir = export_to_hf(ckpt, tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = write_task(tasks, "lmlab_mc", MC_DOCS, MC_BODY)
    roll = write_task(tasks, "lmlab_roll", TEXT_DOCS, ROLLING_BODY)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=["lmlab_mc", "lmlab_roll"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4,
        device="cpu",
    )["results"]
    ours_mc = run_task(model, tok, load_task(mc))["results"]
    ours_roll = run_task(model, tok, load_task(roll))["results"]
    for m in ("acc", "acc_norm", "acc_mutual_info"):
        assert res["lmlab_mc"][f"{m},none"] == pytest.approx(ours_mc[m]["value"])
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert res["lmlab_roll"][f"{m},none"] == pytest.approx(ours_roll[m]["value"], rel=1e-4)


def test_generation_metrics_f1_bleu_chrf_rouge_match_their_references(smoke, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    _, model, tok = smoke
    body = GEN_BODY.replace(
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n",
        "metric_list:\n  - metric: f1\n  - metric: bleu\n  - metric: chrf\n  - metric: rougeL\n",
    ).replace(
        "filter_list:\n  - name: first-word\n    filter:\n      - function: regex\n"
        '        regex_pattern: "([A-Za-z_]+)"\n      - function: take_first\n',
        "",
    )
    task = load_task(write_task(tmp_path, "gen2", GEN_DOCS, body))
    out = run_task(model, tok, task)
    preds = [r["filtered"] for r in out["records"]]
    golds = [r["target"] for r in out["records"]]
    res = out["results"]
    assert res["bleu"]["value"] == pytest.approx(sacrebleu.corpus_bleu(preds, [golds]).score)
    assert res["chrf"]["value"] == pytest.approx(sacrebleu.corpus_chrf(preds, [golds]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(preds, golds, strict=True)
    ref_rouge = np.mean([scorer.score(g, p)["rougeL"].fmeasure for p, g in pairs])
    assert res["rougeL"]["value"] == pytest.approx(ref_rouge)
    assert 0 <= res["f1"]["value"] <= 1 and res["bleu"]["method"] == "bootstrap"
    roll = run_task(model, tok, load_task(write_task(tmp_path, "r2", TEXT_DOCS, ROLLING_BODY)))
    assert roll["results"]["bits_per_byte"]["stderr"] > 0  # bootstrap over documents

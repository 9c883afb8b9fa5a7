"""`lmlab eval MODEL --tasks ...`: results with standard errors, configuration, model hash,
per-item samples, and contamination against the run's own training documents."""

from __future__ import annotations

import json

from .conftest import lmlab_cmd
from .test_eval_tasks import MC_BODY, MC_DOCS, write_task


def test_eval_tasks_from_the_command_line_with_contamination(smoke_run, tmp_path):
    train = smoke_run / "data" / "documents" / "train.jsonl"
    leaked = json.loads(train.read_text().splitlines()[0])["text"]
    leaked = " ".join(leaked.split()[:40])  # a training passage used as a question
    docs = [*MC_DOCS, {"q": leaked, "choices": ["a", "b"], "label": 0}]
    task = write_task(tmp_path, "mc", docs, MC_BODY)
    out = tmp_path / "res"
    p = lmlab_cmd(
        "eval",
        str(smoke_run),
        "--tasks",
        task,
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
        check=True,
    )
    assert "| mc | acc |" in p.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["tasks"] == [task] and res["seed"] == 0 and len(res["model_hash"]) == 16
    entry = res["tasks"]["mc"]
    assert entry["n"] == 6 and entry["results"]["acc"]["stderr"] > 0
    cont = entry["contamination"]
    # the leaked passage is found; so are short items ("import os") the stdlib holds whole
    assert "mc:5" in cont["items"] and cont["contaminated"] == len(cont["items"])
    assert cont["by_subset"]["acc"]["clean"]["n"] == 6 - cont["contaminated"]
    samples = [json.loads(x) for x in (out / "samples" / "mc.jsonl").read_text().splitlines()]
    assert [s["contaminated"] for s in samples] == [s["id"] in cont["items"] for s in samples]
    assert all("loglikelihoods" in s for s in samples)
    cal = entry["calibration"]
    assert 0 <= cal["ece"] <= cal["mce"] <= 1 and 0 <= cal["brier"] <= 1
    assert (out / "calibration" / "mc.png").read_bytes()[:4] == b"\x89PNG"
    bad = lmlab_cmd("eval", str(smoke_run), "--tasks", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr


def test_eval_builtin_suites(smoke_run, tmp_path):
    out = tmp_path / "res"
    p = lmlab_cmd(
        "eval",
        str(smoke_run),
        "--tasks",
        "synthetic:addition:2",
        "--tasks",
        "code",
        "--limit",
        "2",
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
        check=True,
    )
    res = json.loads((out / "results.json").read_text())
    add = res["tasks"]["synthetic_addition_d2"]
    assert add["n"] == 2 and 0 <= add["results"]["accuracy"]["value"] <= 1
    code = res["tasks"]["code"]
    assert code["n"] == 2 and set(code["results"]) == {"pass@1", "pass@5"}
    assert sum(code["statuses"].values()) == 10  # 2 tasks x 5 samples, each run sandboxed
    assert (out / "samples" / "code.jsonl").is_file()
    assert "synthetic_addition_d2" in p.stdout
    bad = lmlab_cmd("eval", str(smoke_run), "--tasks", "synthetic:juggling", cwd=tmp_path)
    assert bad.returncode == 2 and "juggling" in bad.stderr


def test_eval_robustness_reports_template_spread_and_perturbation_drop(smoke_run, tmp_path):
    out = tmp_path / "res"
    p = lmlab_cmd(
        "eval",
        str(smoke_run),
        "--tasks",
        "synthetic:coin_flip:1",
        "--limit",
        "1",
        "--robustness",
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
        check=True,
    )
    add = json.loads((out / "results.json").read_text())["tasks"]["synthetic_coin_flip_d1"]
    rob = add["robustness"]
    assert len(rob["templates"]["templates"]) == 4 and rob["templates"]["spread"] >= 0
    assert [r["kind"] for r in rob["perturbations"]["perturbed"]] == [
        "typos",
        "random_case",
        "whitespace",
    ]
    assert "spread over 4 templates" in p.stdout


def test_eval_compare_to_another_model_and_self_consistency(smoke_run, tmp_path):
    task = write_task(tmp_path, "mc", MC_DOCS, MC_BODY)
    base, sft = tmp_path / "base", tmp_path / "sft"
    for model, out in (
        (smoke_run / "pretrain" / "model", base),
        (smoke_run / "sft" / "model", sft),
    ):
        lmlab_cmd(
            "eval",
            str(model),
            "--tasks",
            task,
            "--tasks",
            "synthetic:coin_flip:1",
            "--limit",
            "2",
            "--self-consistency",
            "2",
            "--out",
            str(out),
            "--quiet",
            *(["--compare-to", str(base)] if out == sft else []),
            cwd=tmp_path,
            check=True,
        )
    paired = json.loads((sft / "paired.json").read_text())
    assert set(paired) == {"mc", "synthetic_coin_flip_d1"}
    assert paired["mc"]["acc"]["n"] == 2 and paired["mc"]["acc"]["method"] == "paired-t"
    res = json.loads((sft / "results.json").read_text())
    assert res["config"]["self_consistency"] == 2
    samples = [
        json.loads(x)
        for x in (sft / "samples" / "synthetic_coin_flip_d1.jsonl").read_text().splitlines()
    ]
    assert all(len(s["generations"]) == 2 for s in samples)  # two samples, one vote


def test_builtin_multiple_choice_task_with_chat_and_calibration(smoke_run, tmp_path):
    out = tmp_path / "res"
    sft = smoke_run / "sft" / "model"
    lmlab_cmd(
        "eval",
        str(sft),
        "--tasks",
        "python_mc",
        "--chat",
        "--limit",
        "6",
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
        check=True,
    )
    res = json.loads((out / "results.json").read_text())["tasks"]["python_mc"]
    assert res["n"] == 6 and set(res["results"]) == {"acc", "acc_norm", "acc_mutual_info"}
    assert (out / "calibration" / "python_mc.png").is_file()
    first = json.loads((out / "samples" / "python_mc.jsonl").read_text().splitlines()[0])
    assert first["context"].startswith("<|user|>") and first["context"].endswith("<|assistant|>")

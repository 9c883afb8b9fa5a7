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
    bad = lmlab_cmd("eval", str(smoke_run), "--tasks", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr

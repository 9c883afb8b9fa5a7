"""End-to-end behaviour of `lmlab run`: stage outputs, manifest, caching, --force, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

from lmlab import load_model, load_tokenizer
from lmlab.utils import sha256_file

from .conftest import lmlab_cmd

STAGES = ["data", "tokenizer", "pretrain", "sft", "align", "eval", "report"]


def test_every_stage_writes_its_files(smoke_run):
    assert (smoke_run / "data/documents/train.jsonl").stat().st_size > 0
    assert (smoke_run / "data/documents/val.jsonl").stat().st_size > 0
    stats = json.loads((smoke_run / "data/stats.json").read_text())
    src = stats["sources"]["stdlib"]
    sampled = src["read"] - src["sampled_out"]  # smoke keeps a fixed 5% of the modules
    assert 0.02 * src["read"] < sampled < 0.1 * src["read"]
    assert [s["name"] for s in stats["steps"]][:2] == ["normalize", "code_quality"]
    assert (smoke_run / "data/card.html").is_file()
    assert (smoke_run / "tokenizer/tokenizer.json").is_file()
    shards = json.loads((smoke_run / "tokenizer/tokens/manifest.json").read_text())
    assert shards["splits"]["train"]["tokens"] > 10_000
    for stage in ("pretrain", "sft"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (smoke_run / stage / "model" / f).is_file()
        rows = [
            json.loads(x) for x in (smoke_run / stage / "metrics.jsonl").read_text().splitlines()
        ]
        assert any("val_loss" in r for r in rows)
        assert all(
            {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
            for r in rows
            if "loss" in r
        )
    pre = [json.loads(x) for x in (smoke_run / "pretrain/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in pre if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, "pretraining should reduce the loss"
    assert (smoke_run / "report.md").is_file() and (smoke_run / "report.html").is_file()


def test_manifest_records_config_versions_timings_and_hashes(smoke_run):
    m = json.loads((smoke_run / "manifest.json").read_text())
    assert m["recipe"]["name"] == "smoke" and m["seed"] == 0
    assert {"python", "torch", "lmlab"} <= m["versions"].keys()
    assert list(m["stages"]) == STAGES
    for stage, rec in m["stages"].items():
        assert rec["status"] in ("done", "cached") and rec["seconds"] >= 0
        assert rec["outputs"] or stage == "align", stage  # smoke aligns nothing: no files
    assert m["stages"]["pretrain"]["outputs"]["model/model.safetensors"] == sha256_file(
        smoke_run / "pretrain/model/model.safetensors"
    )
    assert set(m["stages"]["sft"]["inputs"]) == {"data", "tokenizer", "pretrain"}


def test_each_stage_reads_only_stages_before_it():
    """A stage's cache key holds the output hashes of the stages it reads: they run first."""
    from lmlab.run.runner import PIPELINE

    assert [s.name for s in PIPELINE] == STAGES
    for i, stage in enumerate(PIPELINE):
        assert set(stage.reads) <= {s.name for s in PIPELINE[:i]}, stage.name
    assert [s.name for s in PIPELINE if s.all_ranks] == ["pretrain", "sft", "align"]


def test_eval_results(smoke_run):
    res = json.loads((smoke_run / "eval/results.json").read_text())
    assert res["config"]["name"] == "smoke"
    for name in ("base", "sft"):
        lm = res["lm"][name]
        assert math.isclose(lm["perplexity"], math.exp(lm["loss"]), rel_tol=1e-9)
        bpb = lm["loss"] * lm["tokens"] / (math.log(2) * lm["bytes"])
        assert math.isclose(lm["bits_per_byte"], bpb, rel_tol=1e-9)
        assert 0 <= res["qa"][name]["rouge_l"] <= 1
    assert res["qa"]["base"]["n"] == 4
    samples = (smoke_run / "eval/samples.jsonl").read_text().splitlines()
    assert len(samples) == 4


def test_report_has_plot_tables_and_samples(smoke_run):
    md = (smoke_run / "report.md").read_text()
    for heading in (
        "Loss curves",
        "Learning rate and throughput",
        "Data",
        "Stage timings",
        "Language modelling",
        "Held-out questions",
        "Sample answers",
        "Verdict",
        "Evaluation tasks (± standard error)",
    ):
        assert f"## {heading}" in md
    assert (smoke_run / "report/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (smoke_run / "report/schedule.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (smoke_run / "report.html").read_text()


def test_load_model_and_tokenizer_from_run(smoke_run):
    model, tok = load_model(smoke_run), load_tokenizer(smoke_run)
    ids = tok.encode("def f(x):\n    return x").ids
    import torch

    logits = model(torch.tensor([ids, ids]))
    assert logits.shape == (2, len(ids), tok.get_vocab_size())
    assert tok.decode(ids) == "def f(x):\n    return x"


def test_second_run_is_cached_and_force_redoes_later_stages(smoke_run, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(smoke_run, runs / "smoke")
    weights = runs / "smoke/pretrain/model/model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.monotonic()
    p = lmlab_cmd("run", "smoke", cwd=tmp_path, check=True)
    assert time.monotonic() - t0 < 30
    m = json.loads((runs / "smoke/manifest.json").read_text())
    assert [m["stages"][s]["status"] for s in STAGES] == ["cached"] * 7
    assert weights.stat().st_mtime_ns == before
    assert "report.html" in p.stdout
    lmlab_cmd("run", "smoke", "--force", "sft", "--quiet", cwd=tmp_path, check=True)
    m = json.loads((runs / "smoke/manifest.json").read_text())
    assert [m["stages"][s]["status"] for s in STAGES] == ["cached"] * 3 + ["done"] * 4
    assert weights.stat().st_mtime_ns == before
    # a changed SFT setting reruns SFT and what follows, not pre-training
    lmlab_cmd("run", "smoke", "--set", "sft.train.lr=0.002", "--quiet", cwd=tmp_path, check=True)
    m = json.loads((runs / "smoke/manifest.json").read_text())
    assert [m["stages"][s]["status"] for s in STAGES] == ["cached"] * 3 + ["done"] * 4


def _wait_for_step(state_file, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state_file.is_file():
            try:
                if json.loads(state_file.read_text())["step"] >= step:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        assert proc.poll() is None, "training finished before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_interrupted_training_resumes_to_identical_result(tmp_path):
    args = [
        "run",
        "smoke",
        "--quiet",
        "--set",
        "pretrain.max_steps=140",  # Ctrl-C after step 40, kill -9 after 80
        "--set",
        "pretrain.checkpoint_every=20",
        "--set",
        "sft.train.max_steps=2",
        "--set",
        "eval.questions=1",
    ]
    lmlab_cmd(*args, "--name", "reference", cwd=tmp_path, check=True)

    cmd = [sys.executable, "-m", "lmlab.cli", *args, "--name", "broken"]
    state = tmp_path / "runs/broken/pretrain/last/trainer_state.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C: the loop saves a checkpoint at the current step and exits with 130
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_step(state, 40, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    # kill -9: nothing runs on the way out; resume uses the last periodic checkpoint
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_step(state, 80, proc)
    proc.kill()
    proc.communicate(timeout=60)
    lmlab_cmd(*args, "--name", "broken", cwd=tmp_path, check=True)
    m = json.loads((tmp_path / "runs/broken/manifest.json").read_text())
    assert m["stages"]["data"]["status"] == "cached"
    assert m["stages"]["pretrain"]["status"] == "done"

    def losses(name):
        rows = (tmp_path / f"runs/{name}/pretrain/metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm"))
            for r in map(json.loads, rows)
        ]

    assert losses("broken") == losses("reference")
    assert sha256_file(tmp_path / "runs/broken/pretrain/model/model.safetensors") == sha256_file(
        tmp_path / "runs/reference/pretrain/model/model.safetensors"
    )


def test_held_out_modules_never_appear_in_sft_data(smoke_run):
    def rows(name):
        text = (smoke_run / f"sft/pairs/{name}.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines()]

    train, held = rows("train"), rows("heldout")
    assert train and held
    train_mods = {r["module"] for r in train}
    assert not train_mods & {r["module"] for r in held}
    asked = {
        json.loads(x)["name"] for x in (smoke_run / "eval/samples.jsonl").read_text().splitlines()
    }
    assert asked <= {r["name"] for r in held}
    assert all(r["question"].startswith("What does `") for r in held)


def test_partial_training_is_not_resumed_after_an_upstream_change(tmp_path):
    args = [
        "pretrain",
        "smoke",
        "--set",
        "pretrain.max_steps=100",  # interrupted after step 40
        "--set",
        "pretrain.checkpoint_every=20",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(tmp_path / "runs/smoke/pretrain/last/trainer_state.json", 40, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    # different data, same vocabulary size and training config: the partial run is stale
    p = lmlab_cmd(*args, "--set", "data.val_fraction=0.2", cwd=tmp_path, check=True)
    assert "resuming from step" not in p.stderr
    rows = [
        json.loads(r)
        for r in (tmp_path / "runs/smoke/pretrain/metrics.jsonl").read_text().splitlines()
    ]
    assert rows[0]["step"] == 1
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps))  # one line per logged step, no leftovers

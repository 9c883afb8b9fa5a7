"""The data pipeline end to end: steps, reasons, stats, card, resume, executors, mixtures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import pipeline
from lmlab.data.mixture import phase_at
from lmlab.data.pipeline import cli_config, load_config, prepare
from lmlab.errors import UsageError
from lmlab.tokenizer import save_tokenizer
from lmlab.tokenizer.train import train_bpe
from tests.conftest import lmlab_cmd
from tests.data_corpus import page, web_corpus, write_jsonl


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".jsonl", ".bin", ".npy"} and "work" not in p.parts
    }


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    corpus = web_corpus(root / "in")
    cfg = cli_config(
        [str(f) for f in corpus["files"]], None, overrides={"workers": 1, "task_mb": 0.001}
    )
    stats = prepare(cfg, root / "out")
    return corpus, root / "out", stats


def test_default_web_pipeline_keeps_ids_and_records_every_drop(web):
    corpus, out, stats = web
    kept = _rows(out / "documents" / "train.jsonl")
    removed = {r["id"]: r["metadata"]["reason"] for r in _rows(out / "removed" / "removed.jsonl")}
    ids = {r["id"] for r in kept}
    assert {f"web-{i}" for i in range(len(corpus["pages"]))} <= ids  # input ids are kept
    assert removed["copy-exact"] == "dedup_exact:duplicate"
    assert removed["copy-near"] == "minhash:near_duplicate"
    assert removed["fr-1"].startswith("language:")
    assert removed["junk-1"].split(":")[0] in {"gopher_repetition", "gopher_quality"}
    # the HTML page was turned into text and kept; the PII page was kept but redacted
    html = next(r for r in kept if r["id"] == "html-1")
    assert "<p>" not in html["text"] and "var x" not in html["text"]
    pii = next(r for r in kept if r["id"] == "pii-1")
    assert "<EMAIL>" in pii["text"] and "jane.doe" not in pii["text"]
    assert "<PHONE>" in pii["text"]
    assert stats["pii"]["email"] >= 1 and stats["pii"]["phone"] >= 1
    # every document is accounted for: read = kept + removed
    assert stats["read"]["documents"] == len(kept) + len(removed)
    assert stats["removed"] == len(removed)


def test_stats_and_card(web):
    _, out, _ = web
    stats = json.loads((out / "stats.json").read_text())
    names = [s["name"] for s in stats["steps"]]
    assert names[:3] == ["normalize", "html_to_text", "language"]
    for s in stats["steps"]:
        assert s["docs_out"] <= s["docs_in"] and s["seconds"] >= 0
        assert s["docs_in"] - s["docs_out"] == sum(s["dropped"].values())
    card = (out / "card.md").read_text()
    assert "Why documents were removed" in card and "minhash:near_duplicate" in card
    assert "jane.doe@example.com" not in card  # examples are shown with PII masked
    html = (out / "card.html").read_text()
    assert "data:image/png;base64," in html
    assert not (out / "work").exists()  # intermediate files are cleaned up


def test_resume_redoes_only_unfinished_tasks_and_output_is_identical(tmp_path, monkeypatch):
    corpus = web_corpus(tmp_path / "in")
    files = [str(f) for f in corpus["files"]]
    cfg = cli_config(files, None, overrides={"workers": 1, "keep_work": True, "task_mb": 0.001})
    prepare(cfg, tmp_path / "ref")

    real = pipeline.phase_apply
    calls: list[int] = []

    def crash_on_second(job):
        calls.append(job.index)
        if job.index == 1:
            raise KeyboardInterrupt  # as a kill would: task 0 finished, task 1 did not
        return real(job)

    monkeypatch.setattr(pipeline, "phase_apply", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "out")
    work = tmp_path / "out" / "work"
    assert (work / "apply" / "00000.done.json").exists()
    assert not (work / "apply" / "00001.done.json").exists()
    done_before = (work / "filter" / "00000.done.json").stat().st_mtime_ns
    apply_before = (work / "apply" / "00000.done.json").stat().st_mtime_ns

    calls.clear()
    filtered: list[int] = []
    real_filter = pipeline.phase_filter
    monkeypatch.setattr(pipeline, "phase_apply", lambda j: calls.append(j.index) or real(j))
    monkeypatch.setattr(
        pipeline, "phase_filter", lambda j: filtered.append(j.index) or real_filter(j)
    )
    prepare(cfg, tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")
    # finished tasks are not redone: their markers (written last) are untouched
    assert (work / "filter" / "00000.done.json").stat().st_mtime_ns == done_before
    assert (work / "apply" / "00000.done.json").stat().st_mtime_ns == apply_before
    assert calls == [0, 1] and filtered == [0, 1]


def test_changed_config_discards_stale_work(tmp_path):
    corpus = web_corpus(tmp_path / "in", n=10)
    files = [str(f) for f in corpus["files"]]
    cfg = cli_config(files, None, overrides={"workers": 1, "keep_work": True, "task_mb": 0.001})
    prepare(cfg, tmp_path / "out")
    key1 = json.loads((tmp_path / "out" / "work" / "key.json").read_text())["key"]
    cfg2 = cli_config(files, None, overrides={"workers": 1, "keep_work": True, "profile": "code"})
    prepare(cfg2, tmp_path / "out")
    key2 = json.loads((tmp_path / "out" / "work" / "key.json").read_text())["key"]
    assert key1 != key2


def test_parallel_workers_give_the_same_output(tmp_path):
    corpus = web_corpus(tmp_path / "in", n=20)
    files = [str(f) for f in corpus["files"]]
    prepare(cli_config(files, None, overrides={"workers": 1, "task_mb": 0.001}), tmp_path / "one")
    prepare(cli_config(files, None, overrides={"workers": 2, "task_mb": 0.001}), tmp_path / "two")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    corpus = web_corpus(tmp_path / "in", n=12)
    files = [str(f) for f in corpus["files"]]
    prepare(cli_config(files, None, overrides={"workers": 1, "task_mb": 0.001}), tmp_path / "local")
    cfg = cli_config(files, None, overrides={"workers": 2, "executor": "ray", "task_mb": 0.001})
    prepare(cfg, tmp_path / "ray")
    assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")


def test_span_dedup_and_perplexity_percentile(tmp_path):
    rng = random.Random(3)
    footer = "Copyright notice: this page belongs to the river council and the museum."
    rows = [{"id": f"d{i}", "text": page(rng) + "\n" + footer} for i in range(12)]
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"text": page(rng)} for _ in range(30)])
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    steps = [
        {"perplexity": {"reference": [str(ref)], "order": 3, "keep_percentile": 50}},
        {"dedup_spans": {"unit": "line"}},
    ]
    cfg = load_config(
        {
            "sources": [{"name": "x", "paths": [str(src)]}],
            "steps": steps,
            "workers": 1,
            "task_mb": 0.001,
        },
        "test",
    )
    stats = prepare(cfg, tmp_path / "out")
    kept = _rows(tmp_path / "out" / "documents" / "train.jsonl")
    with_footer = [r["id"] for r in kept if footer in r["text"]]
    assert with_footer == [kept[0]["id"]]  # only the first kept document keeps the line
    assert 5 <= len(kept) <= 7  # half the documents are above the median perplexity
    ppl = next(s for s in stats["steps"] if s["name"] == "perplexity")
    assert ppl["dropped"]["above_percentile"] == 12 - len(kept)
    assert all(r["metadata"]["perplexity"] <= ppl["extra"]["cutoff"] for r in kept)
    assert sum(stats["histograms"]["perplexity"]) == len(kept)  # the card's quality histogram
    assert (tmp_path / "out" / "card" / "perplexity.png").is_file()


def test_decontamination_flags_and_reports(tmp_path):
    rng = random.Random(5)
    question = (
        "which famous river crossed the quiet village before the council measured "
        "the distant harbor and the wooden bridge near the old museum"
    )
    docs = [{"id": f"d{i}", "text": page(rng)} for i in range(6)]
    docs[2]["text"] += "\n" + question.capitalize() + "? Nobody knew the answer then."
    src = write_jsonl(tmp_path / "train.jsonl", docs)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"id": "q-7", "question": question, "answer": "x"}])
    cfg = cli_config(
        [str(src)], None, [str(ev)], "drop", overrides={"workers": 1, "task_mb": 0.001}
    )
    stats = prepare(cfg, tmp_path / "out")
    removed = {
        r["id"]: r["metadata"]["reason"] for r in _rows(tmp_path / "out/removed/removed.jsonl")
    }
    assert removed.get("d2") == "decontaminate:overlap"
    assert [(f["item"], f["doc"]) for f in stats["contamination"]] == [("q-7", "d2")]
    assert "q-7" in (tmp_path / "out" / "card.md").read_text()


def test_mixture_weights_schedule_and_curriculum(tmp_path):
    rng = random.Random(7)
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": page(rng)} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": page(rng)} for i in range(10)])
    tok = train_bpe((page(rng) for _ in range(50)), 400, 2)
    save_tokenizer(tok, tmp_path / "tok")
    cfg = load_config(
        {
            "sources": [
                {"name": "general", "paths": [str(a)], "weight": 2.0},
                {"name": "code", "paths": [str(b)], "weight": 0.5},
            ],
            "steps": [],
            "schedule": ["code", "general"],
            "workers": 1,
        },
        "test",
    )
    stats = prepare(cfg, tmp_path / "out", tokenizer=tmp_path / "tok")
    manifest = json.loads((tmp_path / "out" / "tokens" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert manifest["curriculum"] is True
    assert [p["source"] for p in train["phases"]] == ["code", "general"]
    src = train["sources"]
    assert src["general"]["epochs"] == 2.0 and src["code"]["epochs"] == 1.0
    assert src["general"]["tokens_in_split"] == 2 * src["general"]["tokens"]
    assert stats["sources"]["code"]["sampled_out"] + src["code"]["documents"] == 10
    tokens = np.fromfile(tmp_path / "out" / "tokens" / "train.bin", dtype=np.uint16)
    assert len(tokens) == train["tokens"]
    g = train["phases"][1]
    half = (g["end"] - g["start"]) // 2
    assert np.array_equal(
        tokens[g["start"] : g["start"] + half], tokens[g["start"] + half : g["end"]]
    )
    # training walks the phases in order as tokens are consumed
    assert phase_at(manifest, 0)["source"] == "code"
    assert phase_at(manifest, train["phases"][0]["end"] + 1)["source"] == "general"


def test_dedup_against_an_existing_dataset(tmp_path):
    rng = random.Random(9)
    old = [{"id": f"old{i}", "text": page(rng)} for i in range(8)]
    new = [{"id": f"new{i}", "text": page(rng)} for i in range(4)] + [
        {"id": "again", "text": old[3]["text"]}
    ]
    old_f = write_jsonl(tmp_path / "old.jsonl", old)
    new_f = write_jsonl(tmp_path / "new.jsonl", new)
    n = pipeline.build_dedup_index(cli_config([str(old_f)], None), tmp_path / "idx.npz")
    assert n == 8
    cfg = load_config(
        {
            "sources": [{"name": "new", "paths": [str(new_f)]}],
            "steps": [{"dedup_index": {"path": str(tmp_path / "idx.npz")}}],
            "workers": 1,
        },
        "t",
    )
    prepare(cfg, tmp_path / "out")
    removed = _rows(tmp_path / "out" / "removed" / "removed.jsonl")
    assert [r["id"] for r in removed] == ["again"]
    assert removed[0]["metadata"]["reason"].startswith("dedup_index:")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"steps": ["gopher_qualty"]}, "steps[0]: unknown step 'gopher_qualty'"),
        ({"steps": [{"gopher_quality": {"min_doc_words": -3}}]}, "steps[0].gopher_quality"),
        ({"steps": [{"fineweb": {"nonsense": 1}}]}, "steps[0].fineweb.nonsense"),
        ({"steps": ["minhash", "pii", "dedup_exact"]}, "must be consecutive"),
        ({"schedule": ["nope"]}, "schedule"),
        (
            {
                "steps": [
                    "minhash",
                    {"perplexity": {"reference": [__file__], "keep_percentile": 50}},
                ]
            },
            "must come right before",
        ),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, data, fragment):
    data = {"sources": [{"name": "x", "paths": [str(tmp_path)]}], **data}
    with pytest.raises(UsageError) as e:
        load_config(data, "cfg.yaml")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_cli_prepare_with_tokenizer_writes_shards_and_card(tmp_path):
    corpus = web_corpus(tmp_path / "in", n=12)
    tok = train_bpe((p for p in corpus["pages"]), 400, 2)
    save_tokenizer(tok, tmp_path / "tok")
    proc = lmlab_cmd(
        "data", "prepare", *map(str, corpus["files"]), "--out", str(tmp_path / "out"),
        "--tokenizer", str(tmp_path / "tok"), "--workers", "1", "--val-fraction", "0.2",
        cwd=tmp_path, check=True,
    )  # fmt: skip
    assert "card.html" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "tokens" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["documents"] > 0
    assert (tmp_path / "out" / "card.md").read_text().count("Tokens per source") == 1


@pytest.mark.parametrize(
    "config, args, fragment",
    [
        ("steps: [gopher_qualty]\n", [], "unknown step 'gopher_qualty'"),
        ("steps:\n  - c4: {min_words_per_line: -1}\n", [], "steps[0].c4.min_words_per_line"),
        ("profile: poetry\n", [], "profile"),
        ("steps: [\n", [], "not valid YAML"),
        (None, ["does-not-exist.jsonl"], "does-not-exist.jsonl does not exist"),
        (None, [], "give INPUT files"),
    ],
)
def test_cli_bad_config_or_input_exits_2_with_one_line(tmp_path, config, args, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    cmd = ["data", "prepare", *(args or ([str(src)] if config else [])), "--out", "o"]
    if config is not None:
        (tmp_path / "p.yaml").write_text(config)
        cmd += ["--config", "p.yaml"]
    proc = lmlab_cmd(*cmd, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli_steps_lists_every_step_with_its_options():
    out = lmlab_cmd("data", "steps", "--profile", "code", cwd=Path.cwd(), check=True).stdout
    for name in ("gopher_quality", "minhash", "decontaminate", "pii", "code_quality"):
        assert f"{name}:" in out
    assert "  bands: 20" in out and "  label_only: True" in out  # the code profile's values


def test_sigkill_mid_run_then_relaunch_gives_identical_output(tmp_path):
    """A real kill (SIGKILL of the CLI's process group), not an exception."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(11)
    files = [
        str(write_jsonl(tmp_path / "in" / f"p{i}.jsonl", [{"text": page(rng)} for _ in range(60)]))
        for i in range(6)
    ]
    cfg_file = tmp_path / "tasks.yaml"
    cfg_file.write_text("task_mb: 0.001\n")  # one task per file
    args = ["data", "prepare", *files, "--workers", "1", "--quiet", "--config", str(cfg_file)]
    lmlab_cmd(*args, "--out", str(tmp_path / "ref"), cwd=tmp_path, check=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.cli", *args, "--out", str(out)],
        cwd=tmp_path,
        start_new_session=True,
    )
    marker = out / "work" / "filter" / "00001.done.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "stats.json").exists()  # killed mid-run
    finished = marker.stat().st_mtime_ns
    cfg_file.write_text("task_mb: 0.001\nkeep_work: true\n")  # keep_work is not in the key
    lmlab_cmd(*args, "--out", str(out), cwd=tmp_path, check=True)
    assert _tree(out) == _tree(tmp_path / "ref")
    assert marker.stat().st_mtime_ns == finished  # the finished task was not redone


def test_small_files_are_packed_into_tasks_without_changing_the_output(tmp_path):
    rng = random.Random(13)
    files = [
        str(write_jsonl(tmp_path / "in" / f"f{i:02d}.jsonl", [{"text": page(rng)}]))
        for i in range(12)
    ]
    stats = prepare(cli_config(files, None, overrides={"workers": 1}), tmp_path / "packed")
    assert sum(s["tasks"] for s in stats["sources"].values()) == 1
    one_each = cli_config(files, None, overrides={"workers": 1, "task_mb": 0.001})
    stats = prepare(one_each, tmp_path / "one_each")
    assert sum(s["tasks"] for s in stats["sources"].values()) == 12
    assert _tree(tmp_path / "packed") == _tree(tmp_path / "one_each")


# --- a killed run takes its workers with it --------------------------------------------


def _descendants(pid: int) -> dict[int, int]:
    """Live descendants of `pid` and their parents, from /proc."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent_of[int(entry.name)] = int(fields[1])
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found.update(dict.fromkeys(kids, p))
        frontier += kids
    return found


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has exited: it only waits to be reaped)."""
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(pid)
    return left


def _signal_when(proc, kill, ready) -> tuple[list[int], str, str]:
    """Once `ready()`, `kill(pid)` the main process. Returns the processes it had started
    that are still running 5 s later, and its stdout and stderr. Those are then killed by
    pid, so the test leaks nothing."""
    import os
    import time

    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # the pool's workers are the fork server's children, not the main process's; on a busy
    # machine they start later than the main process says it is ready
    deadline = time.monotonic() + 30
    tree = _descendants(proc.pid)
    while not any(p != proc.pid for p in tree.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        tree = _descendants(proc.pid)
    time.sleep(0.5)  # the workers have taken their first tasks
    assert proc.poll() is None, proc.communicate()[1]
    tree = _descendants(proc.pid)
    assert any(parent != proc.pid for parent in tree.values()), tree
    kill(proc.pid)
    proc.wait()
    deadline = time.monotonic() + 5
    while _alive(list(tree)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(list(tree))
    for pid in left:
        os.kill(pid, 9)
    out, err = proc.communicate(timeout=30)
    return left, out, err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_workers_die_with_a_killed_parent_without_tracebacks(sig):
    """Tasks that would run 60 s: the workers must not outlive the killed parent."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import time\n"
        "from lmlab.data.executor import run_tasks\n"
        "run_tasks(time.sleep, [60.0] * 6, workers=3)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    left, _, err = _signal_when(
        proc,
        lambda pid: os.kill(pid, getattr(signal, sig)),
        lambda: len(_descendants(proc.pid)) >= 5,  # resource tracker, fork server, 3 workers
    )
    assert left == []
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    if sig == "SIGTERM":  # stopped like Ctrl-C: the pool is torn down, nothing is printed
        assert proc.returncode == 128 + signal.SIGTERM and err == ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_of_data_prepare_leaves_no_worker_behind(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    rng = random.Random(12)
    files = [
        str(write_jsonl(tmp_path / "in" / f"p{i}.jsonl", [{"text": page(rng)} for _ in range(150)]))
        for i in range(8)
    ]
    cfg_file = tmp_path / "tasks.yaml"
    cfg_file.write_text("task_mb: 0.001\n")  # one task per file
    out = tmp_path / "out"
    args = ["data", "prepare", *files, "--workers", "2", "--config", str(cfg_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.cli", *args, "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / "work" / "filter" / "00000.done.json"
    left, _, err = _signal_when(proc, lambda pid: os.kill(pid, signal.SIGKILL), marker.exists)
    assert not (out / "stats.json").exists()  # killed mid-run
    assert left == []
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_is_handled_once_by_the_parent():
    """Ctrl-C signals the whole process group; only the parent may react to it."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import time\n"
        "from lmlab.data.executor import run_tasks\n"
        "try:\n"
        "    run_tasks(time.sleep, [60.0] * 6, workers=3)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )

    def as_from_a_shell() -> None:
        # a shell starts a command with Ctrl-C at its default and unblocked; a disposition
        # the test process was left with (seen: ignored) would carry over the exec, and the
        # child would sleep through the signal and pass without testing anything
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_shell,
    )
    left, out, err = _signal_when(
        proc,
        lambda pid: os.killpg(pid, signal.SIGINT),
        lambda: len(_descendants(proc.pid)) >= 5,
    )
    assert left == [] and proc.returncode == 0
    assert out == "interrupted\n", out  # the parent did get the Ctrl-C
    # no KeyboardInterrupt traceback from any worker (a slow machine may show progress)
    assert not [ln for ln in err.splitlines() if "ETA" not in ln], err

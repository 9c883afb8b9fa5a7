"""The code sandbox against what generated code must not do (loop forever, allocate without
bound, open sockets, write outside its directory, start processes), and pass@k scoring:
the estimator against the exact formula, the built-in tasks end to end, a real model's
samples through `evaluate_code`."""

from __future__ import annotations

import json
import os
import socket
from fractions import Fraction
from math import comb

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.eval.code import (
    STOP_SEQUENCES,
    evaluate_code,
    extract_completion,
    load_tasks,
    pass_at_k,
    sample_completions,
    score_completions,
)
from lmlab.eval.sandbox import STATUSES, run_code, run_many

pytestmark = pytest.mark.usefixtures("one_thread")

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


# --- outcomes of ordinary code ------------------------------------------------------------


def test_correct_passes_wrong_fails_broken_errors():
    ok = run_code(ADD, ADD_TESTS)
    assert (ok.passed, ok.status, ok.exit_code) == (True, "passed", 0)
    wrong = run_code("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError" in wrong.stderr_tail and "bootstrap" not in wrong.stderr_tail
    broken = run_code("def add(a, b) return a + b\n", ADD_TESTS)
    assert (broken.passed, broken.status) == (False, "error")
    assert "SyntaxError" in broken.stderr_tail


@pytest.mark.parametrize("leave", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_early_is_not_a_pass(leave):
    r = run_code(ADD + leave, "assert False\n")
    assert not r.passed and r.status == "error"


def test_output_and_files_inside_the_temp_dir_are_allowed():
    code = (
        "import os, tempfile\n"
        "print('hello from the sandbox')\n"
        "open('notes.txt', 'w').write('kept')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')\n"
        "fd, p = tempfile.mkstemp(); os.close(fd); os.remove(p)\n"
    )
    r = run_code(code, "assert open('sub/notes.txt').read() == 'kept'\n")
    assert r.status == "passed", r.stderr_tail
    assert "hello from the sandbox" in r.stdout_tail


# --- limits ---------------------------------------------------------------------------------


def test_infinite_loop_times_out_and_the_process_is_gone():
    r = run_code("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n", "", 1)
    assert r.status == "timeout" and not r.passed
    assert 1.0 <= r.seconds < 10
    pid = int(r.stdout_tail.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_sleeping_past_the_wall_clock_times_out():
    r = run_code("import time\ntime.sleep(60)\n", "", timeout_s=1)
    assert r.status == "timeout" and r.seconds < 10


def test_unbounded_allocation_hits_the_memory_limit():
    r = run_code("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n", "", 10, 256)
    assert r.status == "memory" and not r.passed
    one_shot = run_code("x = bytearray(2 ** 33)\n", "", 10, 256)
    assert one_shot.status == "memory"


def test_bad_limits_are_usage_errors():
    with pytest.raises(UsageError, match="timeout_s"):
        run_code(ADD, ADD_TESTS, timeout_s=0)
    with pytest.raises(UsageError, match="memory_mb"):
        run_code(ADD, ADD_TESTS, memory_mb=1)
    with pytest.raises(UsageError, match="workers"):
        run_many([(ADD, ADD_TESTS)], workers=0)


# --- what is forbidden ----------------------------------------------------------------------


def test_connecting_to_localhost_is_forbidden_and_nothing_arrives():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'x')\n",
            # swallowing the error does not help: the process ends at the first attempt
            f"import socket\ntry:\n    socket.socket().connect(('127.0.0.1', {port}))\n"
            "except BaseException:\n    pass\n",
        ):
            r = run_code(code, "")
            assert r.status == "forbidden" and "socket" in r.stderr_tail
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_writing_outside_the_temp_dir_is_forbidden(tmp_path):
    target, keep = tmp_path / "escaped.txt", tmp_path / "keep.txt"
    keep.write_text("original")
    attempts = {
        "open": f"open({str(target)!r}, 'w').write('x')\n",
        "os.open": f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
        "append": f"open({str(keep)!r}, 'a').write('x')\n",
        "remove": f"import os\nos.remove({str(keep)!r})\n",
        "rename": f"import os\nos.rename({str(keep)!r}, 'mine.txt')\n",
        "rmtree": f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        "symlink": f"import os\nos.symlink({str(keep)!r}, 'link')\nopen('link', 'w').write('x')\n",
        "dir_fd": f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)\n",
        "caught": f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept BaseException:\n"
        "    pass\n",
    }
    for name, code in attempts.items():
        r = run_code(code, "")
        assert r.status == "forbidden", (name, r.status, r.stderr_tail)
    assert not target.exists()
    assert keep.read_text() == "original"


def test_reading_is_allowed(tmp_path):
    (tmp_path / "data.txt").write_text("42")
    r = run_code(f"value = open({str(tmp_path / 'data.txt')!r}).read()\n", "assert value == '42'")
    assert r.status == "passed", r.stderr_tail


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import os\nos.execv('/bin/true', ['true'])\n",
        "import os\nif os.fork() == 0:\n    os._exit(0)\n",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()\n",
        "import os\nos.kill(os.getppid(), 0)\n",
        "import ctypes\n",
    ],
    ids=["subprocess", "system", "exec", "fork", "fork_exec", "kill", "ctypes"],
)
def test_starting_processes_and_ctypes_are_forbidden(code):
    r = run_code(code, "")
    assert r.status == "forbidden", r.stderr_tail


# --- many at once ---------------------------------------------------------------------------


def test_parallel_runs_do_not_interfere():
    """Every run writes the same file name in its cwd and reads it back after the others
    have started: each has its own directory. Statuses come back in input order."""
    jobs = [
        (
            f"import time\nopen('same.txt', 'w').write('{i}')\ntime.sleep(0.3)\n",
            f"assert open('same.txt').read() == '{i}'\n",
        )
        for i in range(6)
    ]
    jobs += [(ADD, "assert add(1, 1) == 3\n"), ("while True:\n    pass\n", ""), (ADD, ADD_TESTS)]
    results = run_many(jobs, workers=4, timeout_s=2)
    statuses = [r.status for r in results]
    assert statuses == ["passed"] * 6 + ["failed", "timeout", "passed"], [
        r.stderr_tail for r in results
    ]


# --- pass@k and code scoring ----------------------------------------------------------------


def test_pass_at_k_matches_the_exact_formula():
    for n in (1, 2, 5, 10, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert 0 < pass_at_k(2000, 3, 100) < 1  # large n: no overflow
    with pytest.raises(UsageError, match="pass_at_k"):
        pass_at_k(5, 2, 6)
    with pytest.raises(UsageError, match="pass_at_k"):
        pass_at_k(5, 6, 1)


def test_extract_completion_stops_at_a_new_top_level_statement():
    body = "    x = 1\n    if x:\n        return x\n    # inner comment\n    print(x)\n"
    for tail in (
        "\ndef other():\n",
        "\nclass A:\n",
        "\nif __name__ == '__main__':\n",
        "\nprint(f(1))\n",
        "\n# done\n",
        "\n```\n",
    ):
        assert extract_completion(body + tail) == body.rstrip()
    assert extract_completion(body) == body.rstrip()


def test_builtin_tasks_canonical_solutions_pass_and_broken_ones_fail():
    tasks = load_tasks()
    assert len(tasks) >= 15 and len({t.task_id for t in tasks}) == len(tasks)
    res = score_completions(tasks, [[t.canonical_solution] for t in tasks], k=(1,))
    assert res["pass@1"] == 1.0 and res["statuses"] == {"passed": len(tasks)}
    # the tests are not vacuous: a body that returns None fails every task
    res = score_completions(tasks, [["    return None\n"] for _ in tasks], k=(1,))
    assert res["pass@1"] == 0.0 and res["statuses"] == {"failed": len(tasks)}


def test_score_completions_per_task_pass_at_k():
    tasks = load_tasks()[:2]
    good = [t.canonical_solution + "\n\ndef unrelated():\n    raise SystemExit\n" for t in tasks]
    completions = [
        [good[0], good[0], "    return None\n", "    while True:\n        pass\n"],
        ["    return None\n", "  bad indent\n x", "    return None\n", good[1]],
    ]
    res = score_completions(tasks, completions, k=(1, 2, 4), timeout_s=1, workers=4)
    t0, t1 = res["tasks"]
    assert [s["status"] for s in t0["samples"]] == ["passed", "passed", "failed", "timeout"]
    assert [s["status"] for s in t1["samples"]] == ["failed", "error", "failed", "passed"]
    assert (t0["correct"], t1["correct"]) == (2, 1)
    assert t0["pass@1"] == pytest.approx(0.5) and t1["pass@1"] == pytest.approx(0.25)
    assert t0["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert t0["pass@4"] == t1["pass@4"] == 1.0
    assert res["pass@1"] == pytest.approx(0.375) and res["pass@1_se"] == pytest.approx(0.125)
    with pytest.raises(UsageError, match="k must be in 1..n"):
        score_completions(tasks, completions, k=(5,))


def test_load_tasks_rejects_bad_files(tmp_path):
    good = {
        "task_id": "t/0",
        "prompt": "def f():\n",
        "canonical_solution": "    return 1\n",
        "test": "assert f() == 1\n",
        "entry_point": "f",
    }
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert load_tasks(path)[0].entry_point == "f"
    for bad, msg in (
        ("{not json", r"tasks.jsonl:2: not valid JSON"),
        (json.dumps({**good, "test": 3}), r"tasks.jsonl:2: 'test' must be a non-empty string"),
        (json.dumps(good), r"tasks.jsonl:2: duplicate task_id 't/0'"),
    ):
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(UsageError, match=msg):
            load_tasks(path)
    with pytest.raises(UsageError, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")


def test_evaluate_code_with_a_real_model():
    """A random tiny model through generate_batch: n samples per task, cut at the stop
    sequences, each run in the sandbox; seeded, so sampling twice gives the same text."""
    from lmlab.model import ModelConfig, Transformer
    from lmlab.tokenizer import train_bpe

    tasks = load_tasks()[:3]
    tok = train_bpe([t.prompt + t.canonical_solution for t in load_tasks()] * 4, 400)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(), n_layers=1, d_model=32, n_heads=2, max_seq_len=512
    )
    model = Transformer(cfg).eval()
    res = evaluate_code(model, tok, tasks, n=3, k=(1, 3), max_new_tokens=24, timeout_s=2)
    assert res["num_tasks"] == 3 and res["k"] == [1, 3] and res["config"]["n"] == 3
    assert [t["task_id"] for t in res["tasks"]] == [t.task_id for t in tasks]
    for row in res["tasks"]:
        assert len(row["samples"]) == 3
        for s in row["samples"]:
            assert s["status"] in STATUSES
            assert not any(stop in s["completion"] for stop in STOP_SEQUENCES)
    assert sum(res["statuses"].values()) == 9
    assert 0.0 <= res["pass@1"] <= res["pass@3"] <= 1.0
    again = sample_completions(model, tok, tasks, n=3, seed=0, max_new_tokens=24)
    assert [[extract_completion(c) for c in cs] for cs in again] == [
        [s["completion"] for s in row["samples"]] for row in res["tasks"]
    ]

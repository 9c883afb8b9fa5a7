"""Where a decode step's time goes (`profile_decode`) and the thread count chosen by
measurement (`choose_threads`, `--threads auto`)."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.infer.bench import apply_threads, choose_threads, format_profile, profile_decode

from .conftest import lmlab_cmd
from .test_quant import tiny


def test_profile_accounts_for_the_step():
    model = tiny()
    p = profile_decode(model, batch=2, prompt_len=8, steps=4)
    groups = p["groups"]
    assert p["step_ms"] > 0 and groups["matmul"] > 0
    # every linear of the 2 blocks and the head runs once per step: 2 × 7 + 1 matmuls
    mm = sum(o["calls"] for o in p["top_ops"] if o["op"] in ("aten::mm", "aten::addmm"))
    assert mm >= 2 * 4 + 1
    # the groups split the wall time (the profiler's own cost may push the sum above it)
    assert sum(groups.values()) >= p["step_ms"] * 0.999
    assert "Python and dispatch" in groups and all(v >= 0 for v in groups.values())
    table = format_profile(p)
    assert "| matmul |" in table and "calls/step" in table
    with pytest.raises(UsageError, match="max_seq_len"):
        profile_decode(model, prompt_len=30, steps=8)


def test_choose_threads_measures_each_candidate_and_restores():
    model = tiny()
    before = torch.get_num_threads()
    best, timings = choose_threads(model, [1, 2], steps=2)
    assert set(timings) == {1, 2} and best in (1, 2)
    assert timings[best] == min(timings.values()) and all(t > 0 for t in timings.values())
    assert torch.get_num_threads() == before
    with pytest.raises(UsageError, match="candidates"):
        choose_threads(model, [0])


def test_apply_threads_values():
    model = tiny()
    before = torch.get_num_threads()
    try:
        assert apply_threads("1", model) == 1 == torch.get_num_threads()
        seen = []
        n = apply_threads("auto", model, seen.append)
        assert n == torch.get_num_threads() and seen and seen[0].startswith(f"threads: {n} ")
        assert apply_threads(None, model) == torch.get_num_threads()
        for bad in ("many", "0"):
            with pytest.raises(UsageError, match="--threads"):
                apply_threads(bad, model)
    finally:
        torch.set_num_threads(before)


def test_bench_profile_from_the_command_line(smoke_run, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "infer", str(smoke_run), "--batch", "1", "--prompt-len", "8"]
    args += ["--new-tokens", "4", "--repeats", "1", "--profile", "--threads", "auto"]
    p = lmlab_cmd(*args, "--json", str(out), cwd=tmp_path, check=True)
    assert "Python and dispatch" in p.stdout and "threads: " in p.stderr
    report = json.loads(out.read_text())
    assert report["profiles"][0]["batch"] == 1 and report["profiles"][0]["groups"]["matmul"] > 0
    bad = lmlab_cmd("bench", "infer", str(smoke_run), "--threads", "lots", cwd=tmp_path)
    assert bad.returncode == 2 and "--threads" in bad.stderr

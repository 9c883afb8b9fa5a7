"""Shared fixtures: one `smoke` run per test session, reused by the tests that only read it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def lmlab_cmd(
    *args: str, cwd: Path, timeout: float = 300, check: bool = False, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (exit codes and stderr are part of the contract)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.cli", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lmlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is far faster than two fighting over a busy
    machine. Restored afterwards, so other test modules are not affected. A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A finished `lmlab run smoke`, shared read-only by many tests."""
    root = tmp_path_factory.mktemp("smoke")
    lmlab_cmd("run", "smoke", "--quiet", cwd=root, check=True)
    return root / "runs" / "smoke"

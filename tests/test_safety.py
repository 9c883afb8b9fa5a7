"""No command destroys what it did not write; one writer per run directory; recipes fail
before any stage runs; interrupts that fit the command."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.utils import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_path,
    check_name,
    claim_output_dir,
    dir_lock,
    output_kind,
)
from tests.conftest import lmlab_cmd, lmlab_in

here = lmlab_in  # `lmlab ARGS` in this process, from a directory


def user_folder(path: Path) -> Path:
    """A folder holding a user's file, which no command may touch."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    return path


def intact(path: Path) -> bool:
    return (path / "thesis.txt").read_text() == "three years of work" and len(os.listdir(path)) == 1


# --- the shared helper ----------------------------------------------------------------


def test_claim_output_dir_refuses_what_is_not_its_own(tmp_path):
    assert claim_output_dir(tmp_path / "new", "export-hf") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", "export-hf")
    keep = user_folder(tmp_path / "keep")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="not an lmlab output"):
            claim_output_dir(keep, "export-hf", overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        claim_output_dir(tmp_path / "file", "export-hf")
    with atomic_dir(tmp_path / "mine", kind="export-hf") as d:
        (d / "a.txt").write_text("a")
    assert output_kind(tmp_path / "mine") == "export-hf"
    with pytest.raises(UsageError, match="--overwrite"):
        claim_output_dir(tmp_path / "mine", "export-hf")
    claim_output_dir(tmp_path / "mine", "export-hf", overwrite=True)
    claim_output_dir(tmp_path / "mine", "export-hf", resume=True)
    with pytest.raises(UsageError, match="lmlab export-hf output"):  # another kind's
        claim_output_dir(tmp_path / "mine", "quantize", overwrite=True)
    assert intact(keep)


def test_atomic_dir_fills_an_empty_directory_in_place(tmp_path, monkeypatch):
    target = tmp_path / "here"
    target.mkdir()
    inode = target.stat().st_ino
    monkeypatch.chdir(target)
    with atomic_dir(".", kind="eval") as d:  # `--out .` in an empty folder
        (d / "results.json").write_text("{}")
    assert target.stat().st_ino == inode  # the shell's working directory is still there
    assert sorted(os.listdir(target)) == [OUTPUT_MARKER, "results.json"]


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    if old != 0o022:
        pytest.skip(f"the test expects umask 022, this process has {old:03o}")
    with atomic_path(tmp_path / "f.txt") as p:
        p.write_text("x")
    with atomic_dir(tmp_path / "d") as d:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "model.safetensors").stat().st_mode) == 0o644


def test_names_are_single_path_components():
    for bad in ("../escaped", "a/b", "..", ".", "", ".hidden", " x"):
        with pytest.raises(UsageError, match="one directory name"):
            check_name(bad)
    assert check_name("tiny-2") == "tiny-2"


# --- every writer, against a user's folder -----------------------------------------------


def test_library_writers_refuse_a_users_folder(smoke_run, tmp_path):
    from lmlab.data.pipeline import NamedSource, PipelineConfig, build_dedup_index, prepare
    from lmlab.eval.harness import evaluate
    from lmlab.infer.gguf import export_gguf
    from lmlab.infer.quantize import quantize_checkpoint
    from lmlab.model.hf import convert_from_hf, export_to_hf

    ckpt = smoke_run / "pretrain" / "model"
    hf = export_to_hf(ckpt, tmp_path / "hf")
    keep = user_folder(tmp_path / "keep")
    writers = {
        "export-hf": lambda: export_to_hf(ckpt, keep, overwrite=True),
        "convert": lambda: convert_from_hf(hf, keep, overwrite=True),
        "quantize": lambda: quantize_checkpoint(ckpt, keep, "int8", overwrite=True),
        "eval": lambda: evaluate(ckpt, ["synthetic:addition:1"], keep, limit=2, overwrite=True),
        "data": lambda: prepare(
            PipelineConfig(sources=[NamedSource(name="x", paths=[str(hf)])]), keep
        ),
    }
    for name, write in writers.items():
        with pytest.raises(UsageError, match="refusing"):
            write()
        assert intact(keep), name
    notes = keep / "thesis.txt"
    with pytest.raises(UsageError, match="not a GGUF file"):
        export_gguf(ckpt, notes, overwrite=True)
    with pytest.raises(UsageError, match="not a de-duplication index"):
        build_dedup_index(PipelineConfig(sources=[NamedSource(name="x", paths=[str(hf)])]), notes)
    assert intact(keep)


def test_export_replaces_only_its_own_output_with_overwrite(smoke_run, tmp_path):
    keep = user_folder(tmp_path / "keep")
    p = lmlab_cmd("export", str(smoke_run), "--to", "hf", "--out", str(keep), cwd=tmp_path)
    assert p.returncode == 2 and "refusing" in p.stderr and "Traceback" not in p.stderr
    assert intact(keep)
    p = lmlab_cmd("export", str(smoke_run), "--to", "hf", "--out", ".", cwd=keep)
    assert p.returncode == 2 and "refusing" in p.stderr and "Traceback" not in p.stderr
    assert intact(keep)
    out = tmp_path / "hf"
    lmlab_cmd("export", str(smoke_run), "--out", str(out), cwd=tmp_path, check=True)
    again = lmlab_cmd("export", str(smoke_run), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    lmlab_cmd("export", str(smoke_run), "--out", str(out), "--overwrite", cwd=tmp_path, check=True)
    assert (out / "model.safetensors").is_file() and output_kind(out) == "export-hf"


def test_export_refuses_a_checkpoint_without_a_tokenizer(smoke_run, tmp_path):
    import shutil

    from lmlab.model.hf import export_to_hf

    bare = tmp_path / "bare"
    shutil.copytree(smoke_run / "pretrain" / "model", bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match="--no-tokenizer"):
        export_to_hf(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export_to_hf(bare, tmp_path / "out", tokenizer=False)
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()


def test_run_names_and_run_directories(tmp_path, monkeypatch, capsys):
    p = lmlab_cmd("run", "smoke", "--name", "../escaped", cwd=tmp_path)  # a real process
    assert p.returncode == 2 and "one directory name" in p.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()
    user_folder(tmp_path / "runs" / "mine")
    code, _, err = here(monkeypatch, capsys, tmp_path, "tokenizer", "smoke", "--name", "mine")
    assert code == 2 and "not a run directory" in err
    assert intact(tmp_path / "runs" / "mine")


# --- one writer per run directory --------------------------------------------------------

HOLD = "import sys, time; from lmlab.utils import dir_lock\nwith dir_lock(sys.argv[1]):\n"
HOLD += "    print('held', flush=True); time.sleep(60)\n"


def test_a_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"PID {holder.pid}"), dir_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with dir_lock(tmp_path):  # the kernel released the dead holder's lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_two_runs_of_one_directory(smoke_run, tmp_path, monkeypatch, capsys):
    first = subprocess.Popen(
        [sys.executable, "-m", "lmlab.cli", "tokenizer", "smoke", "--name", "same", "--quiet"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "runs" / "same" / ".lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # in this process: no interpreter start, so it meets the lock while the first still
    # holds it (a subprocess could start after the first had finished)
    code, _, err = here(monkeypatch, capsys, tmp_path, "tokenizer", "smoke", "--name", "same")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert code == 2 and f"PID {first.pid}" in err
    # the run that ran is exactly a solo run: same documents, tokenizer and token shards
    solo = json.loads((smoke_run / "manifest.json").read_text())["stages"]
    got = json.loads((tmp_path / "runs" / "same" / "manifest.json").read_text())["stages"]
    for stage in ("data", "tokenizer"):  # the files that carry data, not timings
        same = {k: v for k, v in got[stage]["outputs"].items() if k.startswith(("doc", "tok"))}
        assert same and same.items() <= solo[stage]["outputs"].items(), stage


# --- recipes fail before any stage runs --------------------------------------------------


def test_cross_stage_and_type_errors_come_before_any_work(tmp_path, monkeypatch, capsys):
    from lmlab.run.recipe import load_recipe

    with pytest.raises(UsageError, match=r"pretrain.seq_len: 128 exceeds model.max_seq_len=64"):
        load_recipe("smoke", ["pretrain.seq_len=128"])
    with pytest.raises(UsageError, match="sft.epochs: expected a number, got true"):
        load_recipe("smoke", ["sft.epochs=true"])
    with pytest.raises(UsageError, match="prefix decoder"):
        load_recipe("smoke", ["pretrain.objective.prefix=1"])
    load_recipe("smoke", ["pretrain.objective.prefix=1", "model.family=prefix"])
    # through the command, in this process (quicker; a real process's exit status 2 for a bad
    # recipe is checked in test_recipe and test_compare)
    code, _, err = here(
        monkeypatch, capsys, tmp_path, "run", "smoke", "--set", "pretrain.seq_len=128"
    )
    assert code == 2 and not (tmp_path / "runs").exists(), err


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(smoke_run, tmp_path):
    import shutil

    from lmlab import load_model
    from lmlab.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(smoke_run / "pretrain" / "model", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["d_model"] *= 2
    cfg["model"].pop("head_dim", None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"tensor 'embed_tokens.weight' has shape \[\d+, 64\]"
    ):
        load_model(ckpt)


# --- interrupts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(smoke_run, tmp_path_factory) -> Path:
    """A random model with a long context: it talks until told to stop."""
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.config import ModelConfig
    from lmlab.model.encdec import build_model

    torch.manual_seed(0)
    tok_dir = smoke_run / "tokenizer"
    vocab = json.loads((smoke_run / "pretrain/model/config.json").read_text())["model"]
    cfg = ModelConfig(
        vocab_size=vocab["vocab_size"], n_layers=2, d_model=64, n_heads=2, max_seq_len=4096
    )
    return save_checkpoint(build_model(cfg), tmp_path_factory.mktemp("slow") / "m", tok_dir)


def test_interrupted_batches_keep_the_rows_that_finished(slow_model):
    from lmlab import load_model, load_tokenizer
    from lmlab.infer.generate import generate_batch
    from lmlab.infer.options import GenerationConfig

    model, tok = load_model(slow_model), load_tokenizer(slow_model)
    prompts = [tok.encode("def f(x):").ids, tok.encode("import os").ids]
    alone = [
        generate_batch(model, [p], GenerationConfig(max_new_tokens=40))[0].tokens for p in prompts
    ]
    stop = next(t for t in alone[0][1:] if t not in alone[1])  # ends row 0 only
    cfg = GenerationConfig(max_new_tokens=40, stop_ids=[stop])
    out: list = []

    def interrupt(i: int, _t: int) -> None:
        if i == 1 and len(out[1].tokens) == 39:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_batch(model, prompts, cfg, on_token=interrupt, out=out)
    assert out[0].finish_reason == "stop" and out[0].tokens == alone[0][: alone[0].index(stop)]
    assert out[1].finish_reason is None and out[1].tokens == alone[1][:39]  # still going


class Terminal:
    """Reads a pseudo-terminal up to the next occurrence of a marker, in order."""

    def __init__(self, fd: int) -> None:
        self.fd, self.seen, self.pos = fd, bytearray(), 0

    def expect(self, marker: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (i := self.seen.find(marker, self.pos)) < 0:
            tail = bytes(self.seen)[-500:]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in {tail!r}")
            # wait at most until the deadline: a read that blocks would never time out
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue  # the deadline check above reports what was seen
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"closed before {marker!r}: {tail!r}")
            self.seen += chunk
        self.pos = i + len(marker)


def test_ctrl_c_in_chat_stops_the_reply_and_keeps_the_conversation(slow_model, tmp_path):
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: lmlab chat on the pseudo-terminal
        # a shell starts a command with Ctrl-C at its default and unblocked; a disposition
        # the test process was left with by earlier tests must not carry over the exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.chdir(tmp_path)
        argv = [sys.executable, "-m", "lmlab.cli", "chat", str(slow_model)]
        os.execv(sys.executable, [*argv, "--max-new-tokens", "3000"])  # greedy: no stop id
    term = Terminal(fd)
    try:
        term.expect(b"you> ")
        os.write(fd, b"hello there\n")
        term.expect(b"model> ")
        time.sleep(0.5)  # some way into a 3000-token reply
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it
        term.expect(b"[stopped]")
        term.expect(b"you> ")
        os.write(fd, b"/history\n")
        term.expect(b"[assistant]")
        term.expect(b"you> ")
        os.write(fd, b"\x03")  # at the prompt: leave
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(fd)
    text = bytes(term.seen).decode(errors="replace")
    assert "[user] hello there" in text
    assert os.WEXITSTATUS(status) == 0 and "Traceback" not in text, text
    assert "resume" not in text

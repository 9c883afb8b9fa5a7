"""Small shared helpers: atomic writes that honour the umask, output directories that never
replace what lmlab did not write, the one-writer lock of a run directory, hashing, JSON
lines, environment facts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmlab.errors import UsageError
from lmlab.version import __version__


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: os.umask can only be read by setting it
OUTPUT_MARKER = ".lmlab-output.json"  # says which lmlab command wrote a directory


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    A reader never sees a half-written file, and a crash leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600; the file should look like any other
            os.chmod(tmp_path, 0o666 & ~UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only on success.

    The old directory is moved aside, the new one renamed in, then the old one removed, so
    a crash leaves either the old directory or the new one under the name (or `.NAME.old`
    between the two renames, which readers such as the trainer recover). An existing empty
    directory is filled in place instead (it may be the shell's working directory). `kind`
    writes the output marker that `claim_output_dir` recognises; callers that replace a
    directory they did not create must call `claim_output_dir` first."""
    out = Path(path).resolve()  # `.` and `x/..` have no name to put a sibling beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it 0700
    try:
        yield tmp
        if kind is not None:
            mark_output(tmp, kind)
        _honour_umask(tmp)
        if out.is_dir() and not any(out.iterdir()):
            # the marker first: a fill killed half-way is still this command's output, which
            # the next run may replace (with --overwrite) rather than refuse as a stranger's
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name != OUTPUT_MARKER):
                os.replace(entry, out / entry.name)
            return
        old = out.with_name(f".{out.name}.old")
        if old.exists():  # left by a replace killed before its clean-up; `tmp` supersedes it
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _honour_umask(root: Path) -> None:
    """Give the files under `root` the modes the umask allows: writers that go through a
    temporary file (safetensors among them) leave 0600."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~UMASK)


def mark_output(path: str | Path, kind: str) -> None:
    """Mark the directory `path` as lmlab's `kind` output, so a later run of the same
    command may resume or (asked to) replace it, and no other command may."""
    write_json(Path(path) / OUTPUT_MARKER, {"kind": kind, "written_by": f"lmlab {__version__}"})


def output_kind(path: str | Path) -> str | None:
    """The kind of lmlab output `path` is (its marker's `kind`), or None."""
    try:
        kind = read_json(Path(path) / OUTPUT_MARKER).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def claim_output_dir(
    path: str | Path, kind: str, overwrite: bool = False, resume: bool = False, flag: str = "--out"
) -> Path:
    """Check that a command may write the directory `path`, before it does any work.

    Allowed: a path that does not exist, an empty directory, and the command's own earlier
    output of the same `kind` (marker file) when `overwrite` (replace it) or `resume`
    (continue it) is set. Anything else, a user's folder above all, is refused with a
    UsageError that names it; nothing is touched. Returns the absolute path."""
    out = Path(path).resolve()
    where = f"{flag} {path}"
    if not out.exists():
        return out
    if not out.is_dir():
        raise UsageError(f"{where}: exists and is not a directory; choose another path")
    if not any(out.iterdir()):
        return out
    found = output_kind(out)
    if found != kind:
        what = f"an lmlab {found} output" if found else "not empty and not an lmlab output"
        raise UsageError(
            f"{where}: exists and is {what}; refusing to replace it (choose a new or empty "
            f"directory)"
        )
    if resume:
        return out
    if not overwrite:
        raise UsageError(f"{where}: holds an earlier {kind} output; pass --overwrite to replace it")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UsageError(f"{where}: is the current directory (or holds it); run from elsewhere")
    return out


def claim_output_file(
    path: str | Path,
    kind: str,
    is_own: Callable[[Path], bool],
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """`claim_output_dir` for a single output file: a new path, or (with `overwrite`) a file
    that `is_own` recognises as this kind of output. Returns the absolute path."""
    out = Path(path).resolve()
    where = f"{flag} {path}"
    if not out.exists():
        return out
    if out.is_dir():
        raise UsageError(f"{where}: is a directory; {flag} names the {kind} file to write")
    if not is_own(out):
        raise UsageError(f"{where}: exists and is not a {kind} file; refusing to replace it")
    if not overwrite:
        raise UsageError(f"{where}: an earlier {kind} file exists; pass --overwrite to replace it")
    return out


def json_with(*keys: str) -> Callable[[Path], bool]:
    """A test for `claim_output_file`: the file is a JSON object holding these keys."""

    def test(path: Path) -> bool:
        try:
            obj = read_json(path)
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)

    return test


def check_name(name: str, what: str = "run name") -> str:
    """A name used as one directory under another: a single path component."""
    bad = not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
    if bad or name != name.strip() or name.startswith("."):
        raise UsageError(
            f"{what} {name!r}: must be one directory name (no '/', not starting with '.')"
        )
    return name


LOCK_FILE = ".lock"
_HELD: set[str] = set()  # directories this process has locked


@contextlib.contextmanager
def dir_lock(path: str | Path, what: str = "run directory") -> Iterator[None]:
    """Hold an advisory lock on the directory `path` (created if missing) for the block.

    One writer at a time: a second holder fails at once with a UsageError naming the PID
    that holds it. The lock is the kernel's (`flock`), so a killed holder releases it and
    the next run takes it over; the PID in the file is only for the message."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    if key in _HELD:  # this process holds it already (a sweep runs the runner inside)
        yield
        return
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(
                f"{what} {d} is in use by another lmlab process (PID {holder}); wait for it "
                "or choose another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonl_objects(
    path: str | Path, not_object: str = "expected a JSON object"
) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file, read strictly: a line
    that is not JSON, or not an object, is a UsageError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{where}: {not_object}")
            yield where, obj


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Stream rows to a JSONL file atomically; returns the number of rows written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `path` (relative names), skipping hidden files."""
    root = Path(path)
    if root.is_file():
        return {root.name: sha256_file(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = sha256_file(p)
    return out


def hash_obj(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (used for stage cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import numpy
    import tokenizers
    import torch

    return {
        "lmlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def call_with_stack_room(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` from a Python frame that reserves 64 KiB of CPython's frame
    stack: for the work a decode loop does each step (a forward, a compiled step, a
    scheduler step).

    CPython keeps Python frames in chunks (16 KiB unless a frame needs more) and unmaps a
    chunk as soon as the frame that opened it returns. When a frame that calls many
    functions in a loop ends near a chunk's end (a compiled graph's large wrapper frame, or
    a layer loop in eager mode), every one of those calls maps, faults in and unmaps a
    fresh chunk. Measured on SmolLM2 decoding: up to ~40% slower, depending only on how
    deep the caller's stack happens to be. This frame never fits a 16 KiB chunk, so it
    opens a 128 KiB one (CPython sizes a new chunk for the frame plus 1,000 slots, to a
    power of two), leaving ~60 KiB of room after it: one chunk per call, at any depth."""
    return fn(*args, **kwargs)


call_with_stack_room.__code__ = call_with_stack_room.__code__.replace(co_stacksize=8192)

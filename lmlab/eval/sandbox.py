"""Run untrusted generated code against its tests in a separate, limited Python process.

Code synthesis is scored by executing what the model wrote (Zhao et al. §7.1.1, HumanEval's
pass@k), and that code must not be able to hang the harness, eat the machine, reach the
network or change files. `run_code(code, tests)` runs `code` then `tests` in one namespace
in a child `python -I` and returns a `Result` with one of six statuses: passed, failed (the
tests raised), error (the code itself did not run, or the process died), timeout, memory,
forbidden.

What the child gets, in the order it is set up (the bootstrap below, before any user code):

- a fresh temporary directory as its cwd (also $TMPDIR and $HOME), an otherwise empty
  environment, isolated mode (`-I`: no PYTHON* variables, no user site, no script dir on
  sys.path), stdin at end of file; its own session, so the harness kills the whole group;
- a new network namespace (`unshare(CLONE_NEWNET)`, or with a user namespace when not
  root) when the kernel permits it: no interface but a down loopback. Silently skipped
  where not permitted (`network_namespace_available()` says which), so this is a second
  layer only; the audit hook is the guarantee;
- resource limits (`setrlimit`, soft = hard so the code cannot raise them): RLIMIT_CPU
  (timeout + 1 s), RLIMIT_AS (`memory_mb` of address space, so allocation fails with
  MemoryError), RLIMIT_FSIZE (16 MiB per file, stdout included), RLIMIT_CORE 0.
  RLIMIT_NPROC is not set: it counts every process of the user (so a per-run cap breaks
  parallel runs or means nothing) and root ignores it; process creation is denied by the
  audit hook instead. The limits are set by the child itself as its first statements
  rather than in `preexec_fn`, which the subprocess docs call unsafe with threads, and
  `run_many` runs sandboxes from a thread pool;
- a `sys.addaudithook` hook (it cannot be removed once added) that ends the process with
  status "forbidden" on: any `socket.*` event; opening a file for writing, or opening a
  directory (a dir_fd would let relative paths escape), outside the temp dir; os.remove/
  rename/replace/rmdir/mkdir/chmod/chown/link/symlink/truncate/utime/xattr and shutil
  copy/move/rmtree/archive events outside it (and any such call with a dir_fd); sqlite3
  databases outside it; subprocess.Popen, os.system, os.exec*, os.spawn*, os.posix_spawn,
  os.fork/forkpty, os.kill/killpg; ctypes (import or use); resource.setrlimit; and
  `_posixsubprocess.fork_exec` (which raises no event: the bootstrap replaces it and
  forbids re-importing the module).

What an audit-hook sandbox does NOT do, honestly: the hook runs in the same interpreter as
the code, so it stops accidents and careless model output, not a determined attacker.
Code can read any file the user can read; a C extension already importable (numpy, torch)
can make system calls that raise no audit event; introspection (gc, frames) can reach the
harness's objects; and the process runs as the calling user. The result protocol is
forgery-resistant only against accidents: "passed" needs exit code 0 and a per-run random
token that the bootstrap prints after the tests, so an early `sys.exit(0)` or
`os._exit(0)` is an error, not a pass. For hostile code, run this inside a container or
VM (gVisor, Firecracker, nsjail) with a read-only filesystem; this module is the layer
that makes code evaluation safe on a laptop by default.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lmlab.errors import UsageError

STATUSES = ("passed", "failed", "timeout", "memory", "error", "forbidden")
FSIZE_MB = 16  # the largest file (stdout and stderr included) the code may write
TAIL = 2000  # characters of stdout / stderr kept in a Result

# exit codes of the bootstrap; a pass is 0 plus the run's token on stdout
EXIT_FAILED, EXIT_ERROR, EXIT_MEMORY, EXIT_FORBIDDEN = 101, 102, 103, 104
_BY_CODE = {EXIT_FAILED: "failed", EXIT_ERROR: "error", EXIT_MEMORY: "memory"}
_BY_CODE[EXIT_FORBIDDEN] = "forbidden"


@dataclass
class Result:
    """One sandboxed run. `passed` is `status == "passed"`; `seconds` is wall-clock time."""

    passed: bool
    status: str  # one of STATUSES
    stderr_tail: str
    seconds: float
    stdout_tail: str = ""
    exit_code: int | None = None  # negative: killed by that signal


# The child's program. It runs before any user code, reads its settings from argv and the
# run's token from stdin, and is kept free of anything user code could have changed.
BOOTSTRAP = r"""
import os, sys

EXIT_FAILED, EXIT_ERROR, EXIT_MEMORY, EXIT_FORBIDDEN = 101, 102, 103, 104


def _netns():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.unshare(0x40000000) == 0  # CLONE_NEWNET (root)
        if not ok:  # unprivileged: a user namespace first (CLONE_NEWUSER | CLONE_NEWNET)
            ok = libc.unshare(0x10000000 | 0x40000000) == 0
    except Exception:
        ok = False
    for m in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[m]  # a fresh `import ctypes` then raises an audited import
    return ok


def main():
    outer, work, cpu, mem_mb, fsize_mb, net = sys.argv[1:7]
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, at end of file
    sys.stdin = open(0, closefd=False)
    netns = _netns() if net == "1" else False
    import resource
    for lim, val in (
        (resource.RLIMIT_CPU, int(cpu)),
        (resource.RLIMIT_AS, int(mem_mb) << 20),
        (resource.RLIMIT_FSIZE, int(fsize_mb) << 20),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(lim, (val, val))
    with open(os.path.join(outer, "code.py"), encoding="utf-8") as f:
        code = f.read()
    with open(os.path.join(outer, "tests.py"), encoding="utf-8") as f:
        tests = f.read()
    import _posixsubprocess, traceback  # noqa: E401  (loaded before the hook forbids it)

    def no_fork_exec(*a, **k):
        deny("_posixsubprocess.fork_exec", a[:1])

    _posixsubprocess.fork_exec = no_fork_exec
    work = os.path.realpath(work)
    _install_hook(work)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    phase = "code"
    try:
        exec(compile(code, "<solution>", "exec"), ns)
        phase = "tests"
        exec(compile(tests, "<tests>", "exec"), ns)
    except MemoryError:
        _finish(EXIT_MEMORY, "sandbox: MemoryError (memory limit %s MB)\n" % mem_mb)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the run did not finish
        try:  # the traceback from the user's frames on (this bootstrap's frame dropped)
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        _finish(EXIT_FAILED if phase == "tests" else EXIT_ERROR)
    _finish(0, token=token)


def _finish(code, message="", token=None):
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass
    try:
        if message:
            os.write(2, message.encode())
        if token is not None:
            os.write(1, ("\n" + token + "\n").encode())
    except BaseException:
        code = code or EXIT_ERROR
    os._exit(code)


def deny(event, args):
    try:
        os.write(2, ("\nsandbox: forbidden: %s %r\n" % (event, args))[:500].encode())
    finally:
        os._exit(EXIT_FORBIDDEN)


def _install_hook(work):
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, isdir, fspath, fsdecode = (
        os.path.realpath, os.path.isdir, os.fspath, os.fsdecode)
    prefix = work + os.sep
    # events denied outright, by name or by prefix before the first dot
    DENY = {
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "resource.setrlimit", "resource.prlimit",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "pty.spawn",
    }
    DENY_PREFIX = ("socket.", "ctypes.")
    NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess"}
    # events whose path arguments must stay inside the temp dir: the argument positions
    # of the paths, and of a dir_fd that must be absent (-1 or None)
    PATHS = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.replace": ((0, 1), (2, 3)),
        "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()),
        "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.lchmod": ((0,), ()),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
        "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()),
        "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()),
        "shutil.move": ((0, 1), ()), "shutil.rmtree": ((0,), (1,)),
        "shutil.chown": ((0,), ()), "shutil.make_archive": ((0,), ()),
        "shutil.unpack_archive": ((1,), ()), "sqlite3.connect": ((0,), ()),
    }

    def inside(p):
        if isinstance(p, int):
            return True  # an fd: it was opened through a checked event
        try:
            p = fsdecode(fspath(p))
        except TypeError:
            return False
        if p in (":memory:", "") or p.startswith("file::memory:"):
            return True
        r = realpath(p)
        return r == work or r.startswith(prefix)

    busy = []

    def hook(event, args):
        if busy:  # events raised by the hook's own calls
            return
        busy.append(1)
        try:
            check(event, args)
        finally:
            busy.pop()

    def check(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            if isinstance(flags, int):
                writing = bool(flags & WRITE)
            else:
                writing = any(c in (mode or "") for c in "wax+")
            if (writing or isdir(path)) and not inside(path):
                deny(event, args)
        elif event == "import":
            if args[0].split(".")[0] in NO_IMPORT:
                deny(event, args[:1])
        elif event in DENY or event.startswith(DENY_PREFIX):
            deny(event, args)
        elif event in PATHS:
            paths, fds = PATHS[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in fds):
                deny(event, args)
            if not all(inside(args[i]) for i in paths if i < len(args)):
                deny(event, args)

    sys.addaudithook(hook)


main()
"""


@cache
def network_namespace_available() -> bool:
    """Whether the sandbox's child gets its own (empty) network namespace here."""
    probe = (
        "import ctypes, sys; c = ctypes.CDLL(None, use_errno=True); "
        "sys.exit(0 if c.unshare(0x40000000) == 0 or c.unshare(0x50000000) == 0 else 1)"
    )
    try:
        r = subprocess.run([sys.executable, "-I", "-c", probe], env={}, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4 * TAIL))
            return f.read().decode("utf-8", "replace")[-TAIL:]
    except OSError:
        return ""


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise UsageError(f"sandbox: timeout_s must be > 0 seconds, got {timeout_s}")
    if memory_mb < 64:
        raise UsageError(f"sandbox: memory_mb must be >= 64 (Python needs it), got {memory_mb}")


def run_code(
    code: str, tests: str, timeout_s: float = 5, memory_mb: int = 512, network_ns: bool = True
) -> Result:
    """Run `code` then `tests` (asserts) in one namespace in a sandboxed child process.

    `timeout_s` is wall-clock (the whole process group is killed at it; CPU time is capped
    one second later); `memory_mb` caps the address space. `network_ns=False` skips the
    network namespace (the audit hook still denies sockets)."""
    _check_limits(timeout_s, memory_mb)
    outer = Path(tempfile.mkdtemp(prefix="lmlab-sandbox-"))
    try:
        work = outer / "work"
        work.mkdir()
        (outer / "code.py").write_text(code, encoding="utf-8")
        (outer / "tests.py").write_text(tests, encoding="utf-8")
        (outer / "bootstrap.py").write_text(BOOTSTRAP, encoding="utf-8")
        token = secrets.token_hex(16)
        cpu = int(timeout_s) + 1
        argv = [sys.executable, "-I", str(outer / "bootstrap.py"), str(outer), str(work)]
        argv += [str(cpu), str(memory_mb), str(FSIZE_MB), "1" if network_ns else "0"]
        env = {"TMPDIR": str(work), "HOME": str(work), "LC_ALL": "C.UTF-8", "PATH": os.defpath}
        out_path, err_path = outer / "stdout", outer / "stderr"
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, killed as a whole
                close_fds=True,
            )
            timed_out = False
            try:
                try:
                    proc.stdin.write(token.encode() + b"\n")
                    proc.stdin.close()
                except OSError:  # it died before reading
                    pass
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        seconds = time.perf_counter() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
        rc = proc.returncode
        status = _status(rc, timed_out, token in stdout)
        if status == "error" and rc == -signal.SIGXFSZ:
            stderr += f"\nsandbox: file size limit ({FSIZE_MB} MiB) exceeded"
        elif status == "error" and rc == 0:
            stderr += "\nsandbox: the process exited before the tests finished"
        stdout = stdout.replace(f"\n{token}\n", "")
        return Result(status == "passed", status, stderr[-TAIL:], seconds, stdout, rc)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL the child's process group (itself and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _status(rc: int, timed_out: bool, token_seen: bool) -> str:
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == 0:
        return "passed" if token_seen else "error"
    if rc == -signal.SIGKILL:  # not ours (we only kill after a timeout): the OOM killer
        return "memory"
    return _BY_CODE.get(rc, "error")


def run_many(
    jobs: Sequence[tuple[str, str]],
    workers: int = 4,
    timeout_s: float = 5,
    memory_mb: int = 512,
    network_ns: bool = True,
) -> list[Result]:
    """Run (code, tests) pairs, `workers` sandboxes at a time; results in input order.

    Threads suffice: each worker only waits on its child process."""
    if workers < 1:
        raise UsageError(f"sandbox: workers must be >= 1, got {workers}")
    _check_limits(timeout_s, memory_mb)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(run_code, code, tests, timeout_s, memory_mb, network_ns)
            for code, tests in jobs
        ]
        return [f.result() for f in futures]

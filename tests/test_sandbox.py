"""The code sandbox against what generated code must not do, careless or hostile: loop
forever, allocate or write without bound, open sockets, write outside its folder, start or
kill processes, read the host's secrets, switch the audit hook off, or forge a pass. Escape
tests run in both isolation modes where they apply; those needing bubblewrap skip, saying
why, only where it cannot run. Then pass@k scoring: the estimator against the exact formula,
the built-in tasks end to end, a real model's samples through `evaluate_code`."""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from math import comb
from pathlib import Path

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
from lmlab.prompt import sandbox
from lmlab.prompt.sandbox import (
    STATUSES,
    bwrap_argv,
    isolation_available,
    resolve_isolation,
    run_code,
    run_many,
)
from tests.conftest import lmlab_cmd

pytestmark = pytest.mark.usefixtures("one_thread")

AVAILABLE, WHY = isolation_available()
needs_bwrap = pytest.mark.skipif(not AVAILABLE, reason=f"bubblewrap cannot run here: {WHY}")
MODES = [pytest.param("os", marks=needs_bwrap), "weak"]
ISO = "os" if AVAILABLE else "weak"  # for what does not depend on the isolation

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def pid_namespace_members(ns: str) -> list[int]:
    """Host processes in the PID namespace `ns` ("pid:[inode]")."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/pid") == ns:
                    out.append(int(d))
            except OSError:
                pass
    return out


def gone(alive, seconds: float = 5) -> bool:
    """Whether `alive()` turns false within `seconds` (a killed process takes a moment)."""
    end = time.monotonic() + seconds
    while alive():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- outcomes of ordinary code ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_correct_passes_wrong_fails_broken_errors(mode):
    ok = run_code(ADD, ADD_TESTS, isolation=mode)
    assert (ok.passed, ok.status, ok.exit_code) == (True, "passed", 0), ok.stderr_tail
    wrong = run_code("def add(a, b):\n    return a - b\n", ADD_TESTS, isolation=mode)
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError" in wrong.stderr_tail and "assert add(2, 3)" in wrong.stderr_tail
    broken = run_code("def add(a, b) return a + b\n", ADD_TESTS, isolation=mode)
    assert (broken.passed, broken.status) == (False, "error")
    assert "SyntaxError" in broken.stderr_tail


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leave", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_early_is_not_a_pass(leave, mode):
    r = run_code(ADD + leave, "assert False\n", isolation=mode)
    assert not r.passed and r.status == "error"


@pytest.mark.parametrize("mode", MODES)
def test_output_and_files_inside_the_work_folder_are_allowed(mode):
    code = (
        "import os, tempfile\n"
        "print('hello from the sandbox')\n"
        "open('notes.txt', 'w').write('kept')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')\n"
        "fd, p = tempfile.mkstemp(); os.close(fd); os.remove(p)\n"
        "def shout(s):\n    print(s.upper())\n    return len(s)\n"
    )
    tests = "assert open('sub/notes.txt').read() == 'kept'\nassert shout('hi') == 2\n"
    r = run_code(code, tests, isolation=mode)
    assert r.status == "passed", r.stderr_tail
    assert "hello from the sandbox" in r.stdout_tail and "HI" in r.stdout_tail


def test_values_cross_as_plain_data_and_changes_come_back():
    """Results keep their types (tuple, set, bytes, big ints, NaN); subclasses of plain
    types cross as the plain type; in-place changes to arguments reach the tests' objects;
    exceptions keep their builtin type and message; modules the code imported are there."""
    code = (
        "import math\n"
        "from collections import Counter, namedtuple\n"
        "LIMIT = 10\n"
        "Point = namedtuple('Point', 'x y')\n"
        "def values():\n"
        "    return (1, 2.5, None, True, b'x', bytearray(b'y'), {3}, frozenset([4]), 1j,\n"
        "            10 ** 5000, float('nan'), {(1, 2): [3]}, 'caf\\u00e9')\n"
        "def count(s):\n    return Counter(s)\n"
        "def point():\n    return Point(1, 2)\n"
        "def grow(xs, d, *, s):\n    xs.append(len(xs)); xs[0].append('in'); d['k'] = 1\n"
        "    s.add(9)\n"
        "def check(x):\n    if x < 0:\n        raise ValueError('negative: %d' % x)\n"
        "    return math.sqrt(x)\n"
        "def gen():\n    yield 1\n"
        "def twice(f, x):\n    return f(f(x))\n"
        "def inc(x):\n    return x + 1\n"
    )
    tests = (
        "v = values()\n"
        "assert v[:10] == (1, 2.5, None, True, b'x', bytearray(b'y'), {3}, frozenset([4]),"
        " 1j, 10 ** 5000)\n"
        "assert type(v[5]) is bytearray and v[10] != v[10] and v[11:] == ({(1, 2): [3]},"
        " 'caf\\u00e9')\n"
        "assert count('aab') == {'a': 2, 'b': 1} and type(count('a')) is dict\n"
        "assert point() == (1, 2)\n"
        "inner = []\n"
        "xs, d, s = [inner], {}, set()\n"
        "assert grow(xs, d, s=s) is None\n"
        "assert xs == [['in'], 1] and xs[0] is inner and d == {'k': 1} and s == {9}\n"
        "assert math.isclose(check(2.0), 1.4142135623730951) and LIMIT == 10\n"
        "try:\n    check(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative: -1'\n"
        "else:\n    raise AssertionError('no ValueError')\n"
        "assert twice(inc, 1) == 3\n"
    )
    r = run_code(code, tests, isolation=ISO)
    assert r.status == "passed", r.stderr_tail
    r = run_code(code, "assert list(gen()) == [1]\n", isolation=ISO)
    assert r.status == "failed" and "cannot leave its process" in r.stderr_tail
    r = run_code(code, "assert inc(lambda: 1)\n", isolation=ISO)
    assert r.status == "failed" and "not plain data" in r.stderr_tail


# --- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out_and_nothing_survives(mode):
    code = (
        "import os\nprint(os.readlink('/proc/self/ns/pid'), os.getpid(), flush=True)\n"
        "while True:\n    pass\n"
    )
    before = set(Path(tempfile.gettempdir()).glob("lmlab-sandbox-*"))
    r = run_code(code, "", timeout_s=1, isolation=mode)
    assert r.status == "timeout" and not r.passed
    assert 1.0 <= r.seconds < 10
    ns, pid = r.stdout_tail.split()
    if mode == "os":
        assert ns != os.readlink("/proc/self/ns/pid")  # its own PID namespace
        assert gone(lambda: pid_namespace_members(ns))
    else:
        assert gone(lambda: pid_alive(int(pid)))
    assert set(Path(tempfile.gettempdir()).glob("lmlab-sandbox-*")) <= before


def test_sleeping_past_the_wall_clock_times_out():
    r = run_code("import time\ntime.sleep(60)\n", "", timeout_s=1, isolation=ISO)
    assert r.status == "timeout" and r.seconds < 10


@pytest.mark.parametrize("mode", MODES)
def test_a_payload_larger_than_the_pipe_buffer_passes(mode):
    """Megabytes of code and tests reach the sandbox whole (written while it reads)."""
    table = "TABLE = [\n" + "".join(f"    {i},\n" for i in range(300_000)) + "]\n"
    tests = "assert len(TABLE) == 300_000 and TABLE[-1] == 299_999\n" + "# pad\n" * 200_000
    assert len(table) + len(tests) > 3_000_000
    r = run_code(table, tests, timeout_s=30, isolation=mode)
    assert r.status == "passed", r.stderr


def test_a_sandbox_that_never_reads_its_input_still_times_out(monkeypatch):
    """The wall clock covers handing over the code: a supervisor (or bwrap) stalled before
    reading, with more to read than a pipe buffers, is killed at the timeout."""
    monkeypatch.setattr(sandbox, "SUPERVISOR", "import time\ntime.sleep(60)\n")
    r = run_code("x = 1\n" * 200_000, "", timeout_s=1, isolation="weak")
    assert r.status == "timeout" and r.seconds < 10


@pytest.mark.parametrize("mode", MODES)
def test_unbounded_allocation_hits_the_memory_limit(mode):
    r = run_code("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n", "", 10, 256, mode)
    assert r.status == "memory" and not r.passed
    one_shot = run_code("x = bytearray(2 ** 33)\n", "", 10, 256, mode)
    assert one_shot.status == "memory"
    in_a_call = run_code("def grab():\n    return bytearray(2 ** 33)\n", "grab()\n", 10, 256, mode)
    assert in_a_call.status == "memory"


FILL = """
import os
def fill():
    chunk, written = b"x" * (8 << 20), 0
    try:
        for i in range(128):  # 1 GiB in 8 MiB writes, two per file
            with open("f%d" % i, "wb") as f:
                for _ in range(2):
                    f.write(chunk)
                    written += len(chunk)
                    print(written, flush=True)
    except OSError as e:
        return e.errno
"""


@pytest.mark.parametrize("mode", MODES)
def test_filling_the_work_folder_is_stopped_well_short(mode):
    """1 GiB of writes: the tmpfs of `disk_mb` says ENOSPC (os), the supervisor's watch
    kills the run (weak); either way far short of the gigabyte."""
    r = run_code(FILL, "import errno\nassert fill() == errno.ENOSPC\n", 20, isolation=mode)
    written = int(r.stdout_tail.split()[-1])
    if mode == "os":
        assert r.status == "passed", r.stderr_tail
        assert written <= 64 << 20
    else:
        assert r.status == "error" and "work folder went over 64 MiB" in r.stderr_tail
        assert written <= 160 << 20  # what it wrote between two looks
    assert r.seconds < 15


@pytest.mark.parametrize("mode", MODES)
def test_too_many_files_stop_the_run(mode, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_FILES", 100)
    code = "def many():\n    for i in range(100000):\n        open('e%d' % i, 'w').close()\n"
    r = run_code(code, "many()\n", timeout_s=30, isolation=mode)
    assert r.status == "error" and "100 entries" in r.stderr_tail


def test_bad_limits_are_usage_errors():
    with pytest.raises(UsageError, match="timeout_s"):
        run_code(ADD, ADD_TESTS, timeout_s=0, isolation=ISO)
    with pytest.raises(UsageError, match="memory_mb"):
        run_code(ADD, ADD_TESTS, memory_mb=1, isolation=ISO)
    with pytest.raises(UsageError, match="disk_mb"):
        run_code(ADD, ADD_TESTS, disk_mb=0, isolation=ISO)
    with pytest.raises(UsageError, match="workers"):
        run_many([(ADD, ADD_TESTS)], workers=0, isolation=ISO)
    with pytest.raises(UsageError, match="isolation must be one of"):
        run_code(ADD, ADD_TESTS, isolation="none")
    with pytest.raises(UsageError, match="audit_hook=False needs isolation 'os'"):
        run_code(ADD, ADD_TESTS, isolation="weak", audit_hook=False)


# --- what the audit hook forbids --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_connecting_to_localhost_is_forbidden_and_nothing_arrives(mode):
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
            r = run_code(code, "", isolation=mode)
            assert r.status == "forbidden" and "socket" in r.stderr_tail
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_writing_outside_the_work_folder_is_forbidden(mode, tmp_path):
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
        "dir_fd": "import os\nd = os.open('/usr', os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)\n",
        "subdir_fd": "import os\nos.mkdir('a')\nd = os.open('a', os.O_RDONLY)\n",
        "chdir": "import os\nos.chdir('/')\n",
        "caught": f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept BaseException:\n"
        "    pass\n",
        "proc_mem": "open('/proc/self/mem', 'r+b')\n",
    }
    for name, code in attempts.items():
        r = run_code(code, "", isolation=mode)
        assert r.status == "forbidden", (name, r.status, r.stderr_tail)
    assert not target.exists()
    assert keep.read_text() == "original"


@pytest.mark.parametrize("mode", MODES)
def test_reading_the_interpreter_is_allowed(mode):
    path = os.path.join(os.path.dirname(os.__file__), "heapq.py")
    code = f"text = open({path!r}).read()\nimport heapq, json\n"
    r = run_code(code, "assert 'def heappush' in text\n", isolation=mode)
    assert r.status == "passed", r.stderr_tail


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import os\nos.execv('/bin/true', ['true'])\n",
        "import os\nif os.fork() == 0:\n    os._exit(0)\n",
        "import _posixsubprocess\n",
        "import os\nos.kill(os.getppid(), 0)\n",
        "import ctypes\n",
        "import gc\ngc.get_objects()\n",
        "import sys\nsys.settrace(lambda *a: None)\n",
        "import importlib.util as u\nu.module_from_spec(u.find_spec('_posixsubprocess'))\n",
    ],
    ids=[
        "subprocess",
        "system",
        "exec",
        "fork",
        "fork_exec",
        "kill",
        "ctypes",
        "gc",
        "trace",
        "by_spec",
    ],
)
def test_starting_processes_ctypes_and_introspection_are_forbidden(code, mode):
    r = run_code(code, "", isolation=mode)
    assert r.status == "forbidden", r.stderr_tail


# --- escapes that worked against the audit-hook-only sandbox --------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_patching_the_hooks_names_does_not_switch_it_off(mode):
    """The old hook looked `deny` up in __main__ at call time; this one binds everything."""
    patches = (
        "import __main__, builtins\n"
        "for name in dir(__main__):\n"
        "    if callable(getattr(__main__, name)) and not isinstance("
        "getattr(__main__, name), type):\n"
        "        setattr(__main__, name, lambda *a, **k: None)\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.type = lambda *a: str\n"
        "builtins.len = lambda *a: 0\n"
    )
    for then in (
        "import os\nos.system('true')\n",
        "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(30)\n",
        "import os\nos.kill(os.getppid(), 9)\n",
    ):
        r = run_code(patches + then, "", isolation=mode)
        assert r.status == "forbidden", r.stderr_tail


@pytest.mark.parametrize("mode", MODES)
def test_a_signal_handler_that_grabs_the_hooks_frame_cannot_disarm_it(mode):
    """A Python signal handler can run inside the hook and see its frame; what it finds
    there is immutable, or a function whose code and defaults the hook guards."""
    code = (
        "import os, signal\n"
        "found = []\n"
        "def grab(sig, frame):\n"
        "    while frame is not None:\n"
        "        if frame.f_code.co_name == 'hook':\n"
        "            found.append(frame.f_locals)\n"
        "        frame = frame.f_back\n"
        "signal.signal(signal.SIGALRM, grab)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)\n"
        "for i in range(200000):\n"
        "    os.close(os.open(os.devnull, os.O_RDONLY))\n"
        "    if found:\n"
        "        break\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "assert found, 'the handler never ran inside the hook'\n"
        "for name, value in found[0].items():\n"
        "    if callable(value) and hasattr(value, '__defaults__'):\n"
        "        value.__defaults__ = None\n"
        "os.system('true')\n"
    )
    r = run_code(code, "", timeout_s=20, isolation=mode)
    assert r.status == "forbidden" and "__defaults__" in r.stderr_tail, r.stderr_tail


@pytest.mark.parametrize("mode", MODES)
def test_the_code_cannot_kill_its_caller(mode):
    """os.kill is audited; pidfd_send_signal is not, and meets seccomp (and, with bubblewrap,
    a PID namespace where the caller does not exist)."""
    r = run_code("import os\nos.kill(os.getppid(), 9)\n", "", isolation=mode)
    assert r.status == "forbidden"
    pidfd = (
        "import os, signal\n"
        "try:\n"
        "    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n"
        "    outcome = 'sent'\n"
        "except OSError as e:\n"
        "    outcome = e.errno\n"
    )
    r = run_code(pidfd, "import errno\nassert outcome == errno.EPERM, outcome\n", isolation=mode)
    assert r.status == "passed", r.stderr_tail  # the supervisor is alive to give the verdict


@needs_bwrap
def test_without_the_hook_the_os_layer_still_holds():
    """What the audit hook would have stopped, with the hook left out: processes, threads,
    exec, signals, sockets, ptrace and ctypes' raw system calls all fail, and the supervisor,
    PID 1 of the sandbox, survives `kill(-1)` and `kill(1)` to give its verdict."""
    code = (
        "import ctypes, errno, os, signal, socket, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def attempt(f):\n"
        "    try:\n"
        "        r = f()\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "    except RuntimeError as e:\n"
        "        return str(e)\n"
        "    return ctypes.get_errno() if r == -1 else 'ran'\n"
        "outcomes = {\n"
        "    'fork': attempt(os.fork),\n"
        "    'thread': attempt(threading.Thread(target=print).start),\n"
        "    'system ran': os.system('true') == 0,\n"
        "    'exec': attempt(lambda: os.execv('/usr/bin/true', ['true'])),\n"
        "    'kill -1': attempt(lambda: os.kill(-1, signal.SIGKILL)),\n"
        "    'kill 1': attempt(lambda: libc.kill(1, signal.SIGKILL)),\n"
        "    'pidfd': attempt(lambda: os.pidfd_open(1)),\n"
        "    'socket': attempt(socket.socket),\n"
        "    'libc fork': attempt(libc.fork),\n"
        "    'setsid': attempt(os.setsid),\n"
        "    'ptrace': attempt(lambda: libc.ptrace(16, 1, 0, 0)),\n"
        "    'unshare': attempt(lambda: libc.unshare(0x10000000)),\n"
        "}\n"
    )
    tests = (
        "expected = {k: errno.EPERM for k in outcomes}\n"
        "expected['thread'] = \"can't start new thread\"\n"
        "expected['system ran'] = False\n"
        "assert outcomes == expected, outcomes\n"
    )
    r = run_code(code, "import errno\n" + tests, isolation="os", audit_hook=False)
    assert r.status == "passed", r.stderr_tail + r.stdout_tail


@pytest.mark.parametrize("mode", MODES)
def test_calls_the_hook_never_sees_meet_seccomp(mode):
    """Threads, pidfds and new sessions raise no audit event; the seccomp filter refuses
    them in both modes (and, with it, any process the code could leave behind)."""
    code = (
        "import os, threading\n"
        "def attempt(f):\n"
        "    try:\n"
        "        f()\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "    except RuntimeError as e:\n"
        "        return str(e)\n"
        "    return 'ran'\n"
        "outcomes = [attempt(threading.Thread(target=print).start),\n"
        "            attempt(lambda: os.pidfd_open(os.getppid())), attempt(os.setsid)]\n"
    )
    tests = (
        'import errno\nassert outcomes == ["can\'t start new thread", errno.EPERM, errno.EPERM]\n'
    )
    r = run_code(code, tests, isolation=mode)
    assert r.status == "passed", r.stderr_tail


@needs_bwrap
def test_processes_left_behind_die_with_the_sandbox():
    """The namespaces alone (no hook, no seccomp: a plain command under `bwrap_argv`): a
    forked child in a new session outlives its parent only until the sandbox's PID 1 ends."""
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(os.readlink('/proc/self/ns/pid'), flush=True)\n"
    )
    argv = bwrap_argv(shutil.which("bwrap")) + [
        os.path.realpath(sys.executable),
        "-I",
        "-S",
        "-c",
        code,
    ]
    p = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ns = p.stdout.strip()
    assert ns.startswith("pid:[") and ns != os.readlink("/proc/self/ns/pid")
    assert gone(lambda: pid_namespace_members(ns))


FORGERIES = {
    # the old pass token sat in a caller's frame; there is none now, and the verdict's
    # descriptor is not among the code's
    "frames and descriptors": (
        "import os, sys\n"
        "f = sys._getframe(0)\n"
        "while f is not None:\n"
        "    print(f.f_code.co_name, {k: repr(v)[:80] for k, v in f.f_locals.items()})\n"
        "    f = f.f_back\n"
        "print('passed', flush=True)\n"
        "for fd in range(3, 1024):\n"
        "    try:\n"
        "        os.write(fd, b'passed')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    "supervisor's descriptors": (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    for pid in (1, os.getppid()):\n"
        "        try:\n"
        "            os.write(os.open('/proc/%d/fd/%d' % (pid, fd), os.O_WRONLY), b'passed')\n"
        "        except OSError:\n"
        "            pass\n"
        "def add(a, b):\n    return a - b\n"
    ),
    "patched exec": (
        "import builtins\n"
        "builtins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
        "def add(a, b):\n    return a - b\n"
    ),
    "always equal": (
        "def add(a, b):\n"
        "    class Same:\n"
        "        def __eq__(self, other):\n            return True\n"
        "    return Same()\n"
    ),
    "equal int": (
        "def add(a, b):\n"
        "    class Same(int):\n"
        "        def __eq__(self, other):\n            return True\n"
        "        __hash__ = int.__hash__\n"
        "    return Same(0)\n"
    ),
    "shadowed builtin": (
        "def add(a, b):\n    return 0\n"
        "def isinstance(*a):\n    return True\n"
        "def abs(x):\n    return 5\n"
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FORGERIES))
def test_failing_code_cannot_forge_a_pass(name, mode):
    tests = "assert abs(add(2, 3)) == 5 and isinstance(add(2, 3), int)\n"
    r = run_code(FORGERIES[name], tests, isolation=mode)
    assert not r.passed and r.status in ("failed", "error", "forbidden"), r.stderr_tail
    if name == "supervisor's descriptors" and mode == "os":
        r = run_code(FORGERIES[name], tests, isolation="os", audit_hook=False)
        assert r.status == "failed", r.stderr_tail


LEAK = """
import os
def read(p):
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        return type(e).__name__
print("ENV", sorted(os.environ))
print("SHADOW", repr(read("/etc/shadow")))
print("HOME", sorted(os.listdir(HOME)) if os.path.isdir(HOME) else [])
environs = b""
for d in os.listdir("/proc"):
    if d.isdigit():
        r = read("/proc/%s/environ" % d)
        environs += r if isinstance(r, bytes) else b""
print("ENVIRONS", environs.hex())
print("PARENT", repr(read("/proc/%d/environ" % os.getppid())))
"""


@needs_bwrap
def test_the_hosts_secrets_are_out_of_sight(tmp_path):
    """Run from a process whose environment holds a secret: the code sees a minimal
    environment, no /etc/shadow, nothing of the home folder but the way to the interpreter,
    and no process environment with the secret (its parent, PID 1, is not readable)."""
    secret = "lmlab-secret-" + secrets.token_hex(8)
    home = str(Path.home())
    code = f"HOME = {home!r}\n" + LEAK
    script = (
        "import sys\nfrom lmlab.prompt.sandbox import run_code\n"
        f"r = run_code({code!r}, '', isolation='os')\n"
        "sys.stdout.write(r.status + '\\n' + r.stdout_tail)\n"
    )
    env = {**os.environ, "LMLAB_TEST_SECRET": secret}
    p = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert secret not in p.stdout
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines()[1:])
    assert set(ast.literal_eval(lines["ENV"])) <= {"HOME", "TMPDIR", "PATH", "LC_ALL", "PWD"}
    assert ast.literal_eval(lines["SHADOW"]) == "FileNotFoundError"
    assert secret.encode().hex() not in lines["ENVIRONS"]
    assert ast.literal_eval(lines["PARENT"]) == "PermissionError"
    prefix = Path(os.path.realpath(sys.base_prefix))
    way = {prefix.relative_to(home).parts[0]} if prefix.is_relative_to(home) else set()
    assert set(ast.literal_eval(lines["HOME"])) <= way


# --- without bubblewrap -----------------------------------------------------------------


def test_without_bubblewrap_generated_code_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    monkeypatch.delenv("LMLAB_UNSAFE_SANDBOX", raising=False)
    ok, why = isolation_available()
    assert not ok and "bwrap was not found on PATH" in why
    for run in (
        lambda: run_code(ADD, ADD_TESTS),
        lambda: run_many([(ADD, ADD_TESTS)]),
        lambda: score_completions(load_tasks()[:1], [["    return 1\n"]]),
    ):
        with pytest.raises(UsageError) as e:
            run()
        assert "apt-get install bubblewrap" in str(e.value)
        assert "LMLAB_UNSAFE_SANDBOX=1" in str(e.value)
    monkeypatch.setenv("LMLAB_UNSAFE_SANDBOX", "1")  # the opt-in: the weak mode
    assert resolve_isolation() == "weak"
    assert run_code(ADD, ADD_TESTS).status == "passed"
    with pytest.raises(UsageError, match="bwrap was not found"):
        run_code(ADD, ADD_TESTS, isolation="os")


def test_without_bubblewrap_eval_refuses_and_a_recipe_skips_the_code_task(
    smoke_run, tmp_path, monkeypatch
):
    """`lmlab eval --tasks code` refuses (exit 2, one line saying how to enable it) before
    any model time; a recipe's eval stage skips the code task with one warning line, and
    the other tasks still run."""
    from lmlab.eval.harness import evaluate

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LMLAB_UNSAFE_SANDBOX", raising=False)
    out = tmp_path / "res"
    args = ["eval", str(smoke_run), "--tasks", "code", "--tasks", "synthetic:addition:1"]
    p = lmlab_cmd(*args, "--limit", "1", "--out", str(out), "--quiet", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "bubblewrap" in p.stderr and "--unsafe-sandbox" in p.stderr
    assert not out.exists()
    warnings: list[str] = []
    monkeypatch.setattr("lmlab.eval.harness.warn", warnings.append)
    res = evaluate(
        smoke_run,
        ["code", "synthetic:addition:1"],
        out,
        limit=1,
        skip_unsandboxed=True,
    )
    assert set(res["tasks"]) == {"synthetic_addition_d1"}
    assert len(warnings) == 1 and "code task skipped" in warnings[0]
    assert "bubblewrap" in warnings[0] and "LMLAB_UNSAFE_SANDBOX=1" in warnings[0]


# --- many at once ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_parallel_runs_do_not_interfere(mode):
    """Every run writes the same file name in its folder and reads it back after the others
    have started: each has its own. Statuses come back in input order."""
    jobs = [
        (
            f"import time\nopen('same.txt', 'w').write('{i}')\ntime.sleep(0.3)\n",
            f"assert open('same.txt').read() == '{i}'\n",
        )
        for i in range(6)
    ]
    jobs += [(ADD, "assert add(1, 1) == 3\n"), ("while True:\n    pass\n", ""), (ADD, ADD_TESTS)]
    results = run_many(jobs, workers=4, timeout_s=2, isolation=mode)
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
    res = score_completions(tasks, [[t.canonical_solution] for t in tasks], k=(1,), isolation=ISO)
    assert res["pass@1"] == 1.0 and res["statuses"] == {"passed": len(tasks)}, res["tasks"]
    # the tests are not vacuous: a body that returns None fails every task
    res = score_completions(tasks, [["    return None\n"] for _ in tasks], k=(1,), isolation=ISO)
    assert res["pass@1"] == 0.0 and res["statuses"] == {"failed": len(tasks)}
    # nor blind to changes made in place: a rotate_left that also rotates its argument
    rotate = next(t for t in tasks if t.entry_point == "rotate_left")
    mutating = "    k %= max(len(items), 1)\n    items[:] = items[k:] + items[:k]\n"
    mutating += "    return list(items)\n"
    res = score_completions([rotate], [[mutating]], k=(1,), isolation=ISO)
    assert res["statuses"] == {"failed": 1}


def test_score_completions_per_task_pass_at_k():
    tasks = load_tasks()[:2]
    good = [t.canonical_solution + "\n\ndef unrelated():\n    raise SystemExit\n" for t in tasks]
    completions = [
        [good[0], good[0], "    return None\n", "    while True:\n        pass\n"],
        ["    return None\n", "  bad indent\n x", "    return None\n", good[1]],
    ]
    res = score_completions(tasks, completions, k=(1, 2, 4), timeout_s=1, workers=4, isolation=ISO)
    t0, t1 = res["tasks"]
    assert [s["status"] for s in t0["samples"]] == ["passed", "passed", "failed", "timeout"]
    assert [s["status"] for s in t1["samples"]] == ["failed", "error", "failed", "passed"]
    assert (t0["correct"], t1["correct"]) == (2, 1)
    assert t0["pass@1"] == pytest.approx(0.5) and t1["pass@1"] == pytest.approx(0.25)
    assert t0["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert t0["pass@4"] == t1["pass@4"] == 1.0
    assert res["pass@1"] == pytest.approx(0.375) and res["pass@1_se"] == pytest.approx(0.125)
    with pytest.raises(UsageError, match="k must be in 1..n"):
        score_completions(tasks, completions, k=(5,), isolation=ISO)


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
    from lmlab.tokenizer.train import train_bpe

    tasks = load_tasks()[:3]
    tok = train_bpe([t.prompt + t.canonical_solution for t in load_tasks()] * 4, 400)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(), n_layers=1, d_model=32, n_heads=2, max_seq_len=512
    )
    model = Transformer(cfg).eval()
    res = evaluate_code(
        model, tok, tasks, n=3, k=(1, 3), max_new_tokens=24, timeout_s=2, isolation=ISO
    )
    assert res["num_tasks"] == 3 and res["k"] == [1, 3] and res["config"]["n"] == 3
    assert res["config"]["isolation"] == ISO
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

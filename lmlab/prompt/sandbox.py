"""Run untrusted generated code against its tests, isolated by the operating system.

Code synthesis is scored by executing what the model wrote (Zhao et al. §7.1.1, HumanEval's
pass@k), so the harness runs code that may be careless or hostile. `run_code(code, tests)`
returns a `Result` with one of six statuses: passed, failed (the tests raised), error (the
code did not load, broke the protocol, or its process died or overfilled its folder),
timeout, memory, forbidden (the audit hook stopped it).

Isolation "os" (the default) runs everything inside bubblewrap (`bwrap`):

- new user, PID, mount, network, IPC, UTS and cgroup namespaces, no nested user namespaces,
  uid/gid 65534 with every capability dropped, a new session, death with the harness;
- a filesystem of read-only binds of /usr (/bin, /lib*) and of this interpreter's prefix with
  its site-packages hidden, a /proc of the new PID namespace, a minimal read-only /dev and a
  writable /work tmpfs of `disk_mb` (ENOSPC past it); the root itself is read-only, and
  nothing of /root, /home, /etc or the host's processes is there;
- an environment of HOME, TMPDIR, PATH, LC_ALL (and bwrap's PWD); no network.

Inside, a trusted supervisor runs as PID 1: when it ends, the kernel kills everything left in
the namespace, and the code's signals do not reach it. It reads the code from stdin, makes
itself non-dumpable (the code cannot read its memory, environment or descriptors through
/proc), forks the code's process, and only then reads the tests, so they are never in that
process's memory. The code's process closes every descriptor but its two pipes, takes its
limits (address space `memory_mb`, CPU time, 16 MiB per file, 64 open files, no new
processes, no core dumps), installs a seccomp filter (x86_64, aarch64: EPERM for fork,
clone, exec, signals, pidfds, sockets, ptrace, namespaces, mounts, keyrings, bpf, io_uring,
changing limits; RLIMIT_NPROC alone does not bind a user mapped to root) and then the audit
hook, and only then compiles the code. The supervisor stops it when /work holds more than
`MAX_FILES` entries.

The verdict is the supervisor's. It runs the tests in its own process, where each top-level
function of the code is a proxy: a call sends the arguments as plain data (None, bool, int,
float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset; a small tagged
binary encoding, decoded without eval or pickle) to the code's process, which calls the
function and sends back the result and the arguments as they are after the call (in-place
changes are copied onto the tests' objects), or the exception, re-raised by its builtin type.
The code can only ever hand the tests plain values, which a correct function could have
computed: an object whose `__eq__` always returns True, a patched `builtins`, output, an
early `os._exit(0)` or scribbling on descriptors cannot make failing code pass. The verdict
reaches the harness through a descriptor that the code's process never holds.

Supported tests (HumanEval/MBPP style): statements, typically asserts, that call the code's
top-level functions with plain data, or with those functions themselves, and compare plain
results; they may use the code's top-level plain values, standard modules it imported under
their own names (`import math`), and files it wrote in its folder. Not supported: passing
other callables, using objects the code returns (instances, generators), seeing later changes
to the code's globals, aliasing between arguments (each crosses as a copy), and a function
named like a builtin (`sorted`, `abs`): the tests keep the real builtins, so the code cannot
change what the tests compute. The tests are trusted as tests: they run in the supervisor,
inside the sandbox but without the hook and filter.

The audit hook, a second layer here, ends the process as "forbidden" on sockets, ctypes,
starting or signalling processes, writes or directory descriptors outside the folder, chdir,
gc and tracing introspection, code-object construction, and changes to its own functions.
Everything it uses is bound when it is made (default arguments: immutable values, or its own
functions, whose code and defaults it guards), and it calls no object of the code, so
patching names (`__main__.deny`, `builtins.isinstance`) or reading its frame from a signal
handler does not switch it off. It remains a check inside the code's own interpreter: a
crafted code object or an unaudited C path could still get past it, which is why it is not
the boundary.

Not isolated, honestly: the kernel (namespaces and the allowed system calls are attack
surface; a kernel exploit escapes), CPU side channels, and what is visible read-only (the
interpreter, /usr). Memory is bounded per process (the supervisor and the code each get
`memory_mb`), and /work's tmpfs pages, up to `disk_mb`, count against the host's memory.

Isolation "weak" (`isolation="weak"`, or LMLAB_UNSAFE_SANDBOX=1 where bubblewrap cannot run)
keeps the supervisor, the verdict channel, the limits, seccomp and the hook, and runs the
code's process as nobody when the harness is root and nobody can read the interpreter, but
has no namespaces: the code sees the host's filesystem and processes, can read whatever its
user can (with the same user as the harness, /proc/<pid>/environ of the harness too), and only
the in-process hook keeps it from writing outside its folder. /work is a host temporary
folder whose size the supervisor polls every 20 ms, not a bounded tmpfs. Trusted models only.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from lmlab.errors import UsageError

STATUSES = ("passed", "failed", "timeout", "memory", "error", "forbidden")
ISOLATIONS = ("os", "weak")
UNSAFE_ENV = "LMLAB_UNSAFE_SANDBOX"  # "1": without bubblewrap, fall back to the weak mode
FSIZE_MB = 16  # the largest file (stdout and stderr included) the code may write
MAX_FILES = 2048  # entries in the work folder
TAIL = 2000  # characters of stdout / stderr kept in a Result
NOBODY = 65534
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
    "bubblewrap; where unprivileged user namespaces are restricted, as on Ubuntu 24.04, allow "
    f"them for bwrap), or set {UNSAFE_ENV}=1 (`lmlab eval --unsafe-sandbox`; in Python, "
    "isolation='weak') to run generated code "
    "in the weaker audit-hook sandbox, which does not hold against hostile code"
)


@dataclass
class Result:
    """One sandboxed run. `passed` is `status == "passed"`; `seconds` is wall-clock time."""

    passed: bool
    status: str  # one of STATUSES
    stderr_tail: str
    seconds: float
    stdout_tail: str = ""
    exit_code: int | None = None  # of the sandbox's supervisor; negative: killed by that signal


# The program run in the sandbox (`python -I -S -c SUPERVISOR ...`): the supervisor, and, after
# its fork, the code's process. Settings come in argv, the code and tests on stdin.
SUPERVISOR = r'''
import builtins, errno, os, select, signal, struct, sys

EXIT = {"passed": 0, "failed": 101, "error": 102, "memory": 103, "forbidden": 104, "timeout": 105}
NOBODY = 65534
MAX_MESSAGE = 64 << 20
POLL_S = 0.02
# system calls the code's process may not make: (x86_64, aarch64) numbers, None: absent
SYSCALLS = {
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None),
    "execve": (59, 221), "execveat": (322, 281), "kill": (62, 129), "tkill": (200, 130),
    "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "pidfd_send_signal": (424, 424), "pidfd_open": (434, 434), "pidfd_getfd": (438, 438),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "socket": (41, 198), "socketpair": (53, 199), "unshare": (272, 97), "setns": (308, 268),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "kcmp": (312, 272),
    "personality": (135, 92), "setrlimit": (160, 164), "setsid": (112, 157),
    "setpgid": (109, 154),
}
PRLIMIT64 = (302, 261)  # allowed only to read the process's own limits
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
# modules the code imported that the tests see too (as HumanEval's shared namespace did)
STDLIB = sys.stdlib_module_names - {"antigravity", "this", "__hello__", "__phello__"}


class Gone(BaseException):
    """The code's process ended, broke the protocol or was stopped: no test can pass now."""


def read_exact(fd, n):
    parts = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def read_line(fd):
    out = b""
    while not out.endswith(b"\n"):
        b = os.read(fd, 1)
        if not b:
            raise EOFError
        out += b
    return out


def print_error(e, name, source):
    """The traceback from the user's frames on (this program's first frame dropped)."""
    try:
        import linecache, traceback
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    except BaseException:
        pass


def flush():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


# --- plain data across the pipes: a tag byte, then the value; lengths are 4 bytes ----------

LEN, FLOAT = struct.Struct("<I"), struct.Struct("<d")
SEQS = ((list, b"l"), (tuple, b"t"), (set, b"S"), (frozenset, b"Z"))


class Remote:
    """A function of the code, called in the code's process."""

    __slots__ = ("name", "call")

    def __init__(self, name, call):
        self.name, self.call = name, call

    def __call__(self, *args, **kwargs):
        return self.call(self.name, args, kwargs)

    def __repr__(self):
        return "<function %s of the code under test>" % self.name


def enc(x, out):
    """Append `x` to the bytearray `out`. Subclasses of the plain types (a Counter, a
    namedtuple) go as the plain type; anything else raises TypeError."""
    if x is None or x is True or x is False:
        out += b"N" if x is None else b"T" if x else b"F"
    elif isinstance(x, int):
        b = int.to_bytes(x, (int.bit_length(x) + 8) // 8, "little", signed=True)
        out += b"i" + LEN.pack(len(b)) + b
    elif isinstance(x, float):
        out += b"f" + FLOAT.pack(x)
    elif isinstance(x, complex):
        out += b"c" + FLOAT.pack(x.real) + FLOAT.pack(x.imag)
    elif isinstance(x, (str, bytes, bytearray, Remote)):
        if isinstance(x, Remote):
            tag, b = b"p", x.name.encode()
        elif isinstance(x, str):
            tag, b = b"s", str.encode(x, "utf-8", "surrogatepass")
        else:
            tag, b = b"Y" if isinstance(x, bytearray) else b"y", bytes(x)
        out += tag + LEN.pack(len(b)) + b
    elif isinstance(x, dict):
        items = list(dict.items(x))
        out += b"d" + LEN.pack(len(items))
        for k, v in items:
            enc(k, out)
            enc(v, out)
    else:
        for t, tag in SEQS:
            if isinstance(x, t):
                items = list(x)
                out += tag + LEN.pack(len(items))
                for v in items:
                    enc(v, out)
                return
        raise TypeError("a %s is not plain data" % type(x).__name__)


def dec(data, function):
    """The value in `data`; only plain builtin types come out. Raises on malformed data."""
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("truncated")
        pos += n
        return data[pos - n:pos]

    def one():
        tag = take(1)
        if tag in (b"N", b"T", b"F"):
            return None if tag == b"N" else tag == b"T"
        if tag == b"f":
            return FLOAT.unpack(take(8))[0]
        if tag == b"c":
            return complex(FLOAT.unpack(take(8))[0], FLOAT.unpack(take(8))[0])
        n = LEN.unpack(take(4))[0]
        if tag == b"i":
            return int.from_bytes(take(n), "little", signed=True)
        if tag == b"s":
            return take(n).decode("utf-8", "surrogatepass")
        if tag == b"y":
            return bytes(take(n))
        if tag == b"Y":
            return bytearray(take(n))
        if tag == b"p":
            return function(take(n).decode())
        if tag == b"d":
            d = {}
            for _ in range(n):
                k = one()
                d[k] = one()
            return d
        for t, tg in SEQS:
            if tag == tg:
                return t([one() for _ in range(n)])
        raise ValueError("unknown tag")

    value = one()
    if pos != len(data):
        raise ValueError("trailing bytes")
    return value


def frame(msg):
    body = bytearray(4)
    enc(msg, body)
    body[:4] = LEN.pack(len(body) - 4)
    return body


def send(fd, data):
    data = memoryview(data if isinstance(data, bytearray) else frame(data))
    while data:
        data = data[os.write(fd, data):]


def plain_or_none(x):
    try:
        enc(x, bytearray())
        return x
    except (Exception, RecursionError):
        return None


# --- the supervisor -------------------------------------------------------------------------

def main():
    verdict_fd, cpu, mem_mb, fsize_mb, disk_mb, max_files, hook = map(int, sys.argv[1:8])
    work = os.getcwd()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    n_code, n_tests = map(int, read_line(0).split())
    code = read_exact(0, n_code).decode("utf-8", "surrogatepass")
    import resource
    for lim, val in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, mem_mb << 20),
        (resource.RLIMIT_FSIZE, fsize_mb << 20),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(lim, (val, val))
    libc = None
    if sys.platform == "linux":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/1/fd, /proc/1/mem, ptrace
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the harness
    # weak mode as root: the code's process runs as nobody, where nobody can read the stdlib
    drop = os.getuid() == 0 and world_readable(os.path.dirname(os.__file__))
    if drop:
        os.chown(work, NOBODY, NOBODY)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            candidate(code, req_r, resp_w, parent, libc, mem_mb, hook, work, drop)
        finally:
            os._exit(EXIT["error"])
    os.close(req_r)
    os.close(resp_w)
    try:  # only now: the tests were never in the code's process
        tests = read_exact(0, n_tests).decode("utf-8", "surrogatepass")
    except EOFError:
        finish(verdict_fd, "error", "sandbox: the tests did not arrive")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    status, detail = supervise(pid, tests, req_w, resp_r, work, disk_mb, max_files, mem_mb)
    finish(verdict_fd, status, detail)


def finish(verdict_fd, status, detail=""):
    flush()
    if detail:
        os.write(2, ("\n" + detail + "\n").encode())
    os.write(verdict_fd, status.encode())
    os._exit(EXIT[status])


def supervise(pid, tests, wfd, rfd, work, disk_mb, max_files, mem_mb):
    """Run the tests against proxies of the code's functions: (status, detail)."""
    state = {"buf": bytearray(), "gone": None}
    names = {}

    def gone(why):
        state["gone"] = state["gone"] or why
        raise Gone(why)

    def check_work():
        files, size, stack = 0, 0, [work]
        try:
            while stack:
                try:
                    entries = list(os.scandir(stack.pop()))
                except FileNotFoundError:  # removed meanwhile
                    continue
                for e in entries:
                    try:
                        size += e.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        continue
                    files += 1
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    if files > max_files or size > disk_mb << 20:
                        raise OverflowError
        except (OSError, OverflowError):  # over, or hidden from the count (chmod 000)
            os.kill(pid, signal.SIGKILL)
            gone("sandbox: the work folder went over %d MiB or %d entries, or could not be "
                 "measured; the code was stopped" % (disk_mb, max_files))

    def recv():
        """The next message from the code's process, polling the work folder meanwhile."""
        buf = state["buf"]
        while len(buf) < 4 or len(buf) < 4 + LEN.unpack(buf[:4])[0]:
            if len(buf) >= 4 and LEN.unpack(buf[:4])[0] > MAX_MESSAGE:
                gone("protocol")
            if not select.select([rfd], [], [], POLL_S)[0]:
                check_work()
                continue
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                gone("exited")
            buf += chunk
        n = 4 + LEN.unpack(buf[:4])[0]
        body = bytes(buf[4:n])
        del buf[:n]
        try:
            msg = dec(body, names.__getitem__)
        except (Exception, RecursionError):
            gone("protocol")
        if type(msg) is not tuple or not msg:
            gone("protocol")
        return msg

    def call(name, args, kwargs):
        if state["gone"]:
            raise Gone(state["gone"])
        msg = ("call", name, list(args), kwargs)
        try:
            send(wfd, msg)  # TypeError here: an argument that is not plain data
        except OSError:
            gone("exited")
        reply = recv()
        if reply[0] == "raise" and len(reply) == 3:
            exc = getattr(builtins, reply[1], None) if type(reply[1]) is str else None
            if not (isinstance(exc, type) and issubclass(exc, Exception)):
                exc = RuntimeError
            try:
                error = exc(str(reply[2]))
            except Exception:
                error = RuntimeError(str(reply[2]))
            raise error
        if reply[0] != "ret" or len(reply) != 4:
            gone("protocol")
        _, result, after, after_kw = reply
        if type(after) is list and len(after) == len(args):
            for old, new in zip(args, after):
                sync(old, new)  # the callee's in-place changes to its arguments
        if type(after_kw) is dict:
            for k, old in kwargs.items():
                if k in after_kw:
                    sync(old, after_kw[k])
        return result

    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        loaded = recv()
        if loaded[0] != "loaded":
            return "error", ""
        for name, d in loaded[1].items():
            if type(name) is not str or name.startswith("__") or hasattr(builtins, name):
                continue  # the tests keep the real builtins
            if d[0] == "f":
                ns[name] = names[name] = Remote(name, call)
            elif d[0] == "v":
                ns[name] = d[1]
            elif d[0] == "m" and d[1] == name and name in STDLIB:
                ns[name] = __import__(name)
        try:
            exec(compile(tests, "<tests>", "exec"), ns)
        except Gone:
            raise
        except MemoryError:
            return "memory", "sandbox: MemoryError in the tests (memory limit %d MB)" % mem_mb
        except BaseException as e:
            if state["gone"]:
                raise Gone(state["gone"]) from None
            print_error(e, "<tests>", tests)
            return "failed", ""
        if state["gone"]:  # the tests swallowed it
            raise Gone(state["gone"])
        return "passed", ""
    except Gone:
        return ended(pid, state["gone"])
    except (Exception, RecursionError):  # a malformed first message
        return ended(pid, "protocol")


def sync(old, new):
    """Make `old` equal `new` in place, keeping nested containers; False where it cannot."""
    if type(old) is not type(new):
        return False
    if type(old) is list:
        for i in range(min(len(old), len(new))):
            if not sync(old[i], new[i]):
                old[i] = new[i]
        del old[len(new):]
        old.extend(new[len(old):])
    elif type(old) is dict:
        for k in [k for k in old if k not in new]:
            del old[k]
        for k, v in new.items():
            if k not in old or not sync(old[k], v):
                old[k] = v
    elif type(old) is set:
        old.clear()
        old.update(new)
    elif type(old) is bytearray:
        old[:] = new
    elif type(old) is tuple:
        return len(old) == len(new) and all(sync(a, b) for a, b in zip(old, new))
    else:
        return old == new
    return True


def ended(pid, why):
    """The status of a run whose code's process is gone (or has to be stopped)."""
    if why == "protocol":
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "error", "sandbox: the code's process broke the call protocol"
    if why != "exited":
        os.waitpid(pid, 0)
        return "error", why
    for _ in range(50):  # it closed its pipe: give it a moment to exit
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        select.select([], [], [], 0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "error", "sandbox: the code closed its channel before the tests finished"
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        if sig == signal.SIGXCPU:
            return "timeout", ""
        if sig == signal.SIGKILL:
            return "memory", "sandbox: the code's process was killed (out of memory?)"
        return "error", "sandbox: the code's process was killed by signal %d" % sig
    code = os.WEXITSTATUS(st)
    if code in (EXIT["forbidden"], EXIT["memory"]):
        return ("forbidden" if code == EXIT["forbidden"] else "memory"), ""
    return "error", "sandbox: the code's process exited (%d) before the tests finished" % code


# --- the code's process ----------------------------------------------------------------------

def world_readable(path):
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def candidate(code, rfd, wfd, parent, libc, mem_mb, hook, work, drop):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # not the supervisor's stdin, where the tests are
    keep = sorted({0, 1, 2, rfd, wfd})
    for lo, hi in zip(keep, keep[1:] + [1 << 20]):
        os.closerange(lo + 1, hi)  # the verdict's descriptor among them
    import resource
    if drop:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    for lim, val in (
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_NPROC, 1),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ):
        resource.setrlimit(lim, (val, val))
    if libc is not None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the supervisor
        if os.getppid() != parent:
            os._exit(EXIT["error"])
        seccomp(libc)
    libc = None
    for m in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[m]  # a new `import ctypes` raises an audited import
    if hook:
        install_hook(work)
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, "<solution>", "exec"), ns)
    except MemoryError:
        out_of_memory(mem_mb)
    except BaseException as e:
        print_error(e, "<solution>", code)
        flush()
        send(wfd, ("error",))
        os._exit(EXIT["error"])
    flush()
    send(wfd, ("loaded", describe(ns)))
    serve(ns, rfd, wfd, code, mem_mb)


def out_of_memory(mem_mb):
    flush()
    os.write(2, b"\nsandbox: MemoryError (memory limit %d MB)\n" % mem_mb)
    os._exit(EXIT["memory"])


def describe(ns):
    """The code's top-level names: functions ("f"), modules ("m") and plain data ("v")."""
    out = {}
    for name, v in list(ns.items()):
        if name.startswith("__"):
            continue
        if isinstance(v, type(sys)):
            out[name] = ("m", v.__name__)
        elif callable(v):
            out[name] = ("f",)
        else:
            try:
                enc(v, bytearray())
                out[name] = ("v", v)
            except (Exception, RecursionError):
                pass
    return out


def builtin_name(e):
    for c in type(e).__mro__:
        if getattr(builtins, c.__name__, None) is c:
            return c.__name__
    return "Exception"


def serve(ns, rfd, wfd, code, mem_mb):
    while True:
        try:
            n = LEN.unpack(read_exact(rfd, 4))[0]
            _, name, args, kwargs = dec(read_exact(rfd, n), ns.__getitem__)
        except EOFError:  # the tests are done
            flush()
            os._exit(0)
        try:
            result = ns[name](*args, **kwargs)
            # the arguments as they are now, for in-place changes (None: not plain data)
            after = [plain_or_none(a) for a in args]
            after_kw = {k: plain_or_none(v) for k, v in kwargs.items()}
            try:
                reply = frame(("ret", result, after, after_kw))
            except (Exception, RecursionError) as e:
                raise TypeError(
                    "sandbox: %s returned what cannot leave its process (%s)" % (name, e)
                ) from None
        except MemoryError:
            out_of_memory(mem_mb)
        except BaseException as e:
            print_error(e, "<solution>", code)
            try:
                message = str(e)[:2000]
            except BaseException:
                message = ""
            reply = ("raise", builtin_name(e), message)
        flush()
        send(wfd, reply)


def seccomp(libc):
    """EPERM for SYSCALLS and for changing limits; other architectures' calls kill."""
    import ctypes
    arch = ARCHES.get(os.uname().machine)
    if arch is None:
        return
    col, audit_arch = arch
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    prog = [(LD, 0, 0, 4), (JEQ, 0, "kill", audit_arch), (LD, 0, 0, 0)]
    prog.append((JGE, "deny", 0, 0x40000000))  # x32 system calls
    prog += [(JEQ, "deny", 0, n[col]) for n in SYSCALLS.values() if n[col] is not None]
    prog += [  # prlimit64(0, NULL, old): reading its own limits only
        (JEQ, 0, "allow", PRLIMIT64[col]), (LD, 0, 0, 16), (JEQ, 0, "deny", 0),
        (LD, 0, 0, 24), (JEQ, 0, "deny", 0), (LD, 0, 0, 28), (JEQ, "allow", "deny", 0),
    ]
    end = {"allow": len(prog), "deny": len(prog) + 1, "kill": len(prog) + 2}
    prog += [(RET, 0, 0, 0x7FFF0000), (RET, 0, 0, 0x50000 | errno.EPERM), (RET, 0, 0, 0x80000000)]
    raw = b"".join(
        struct.pack("HBBI", c, end[t] - i - 1 if t else 0, end[f] - i - 1 if f else 0, k)
        for i, (c, t, f, k) in enumerate(prog)
    )
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Prog(len(prog), ctypes.addressof(buf))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


def install_hook(work):
    sys.addaudithook(make_hook(work))


def make_hook(work):
    """The audit hook. Everything it uses is bound in default arguments now: no global or
    builtin name is looked up when it runs, no object of the code is called, and it keeps no
    mutable state, so neither patching names nor reading its frame changes what it does."""
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    DENY = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "os.chdir", "resource.setrlimit",
        "resource.prlimit", "sqlite3.enable_load_extension", "sqlite3.load_extension",
        "pty.spawn", "signal.pthread_kill", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys.addaudithook", "code.__new__",
        "_posixsubprocess.fork_exec",
    })
    DENY_PREFIX = ("socket.", "ctypes.", "gc.")
    NO_IMPORT = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"})
    # events whose path arguments must stay inside the folder: argument positions of the
    # paths, and of a dir_fd that must be absent (-1 or None)
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
    PATH_EVENTS = frozenset(PATHS)
    PATHS = tuple((k, *v) for k, v in PATHS.items())

    def resolve(p, getcwd=os.getcwd, lstat=os.lstat, readlink=os.readlink, str_=str,
                bytes_=bytes, type_=type, os_error=OSError):
        """`p` made absolute with every symlink followed (None: not a plain path)."""
        if type_(p) is bytes_:
            p = bytes_.decode(p, "utf-8", "surrogateescape")
        elif type_(p) is not str_:
            return None
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        todo, out, links = p.split("/")[::-1], "", 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                out = out.rpartition("/")[0]
                continue
            nxt = out + "/" + name
            try:
                st = lstat(nxt)
            except os_error:
                out = nxt  # not there (yet)
                continue
            if st.st_mode & 0o170000 == 0o120000:
                links += 1
                if links > 40:
                    return None
                target = readlink(nxt)
                if target.startswith("/"):
                    out = ""
                todo.extend(target.split("/")[::-1])
            else:
                out = nxt
        return out or "/"

    def inside(p, resolve=resolve, work=work, prefix=work + "/", type_=type, int_=int,
               str_=str):
        if type_(p) is int_:
            return True  # a descriptor, opened through a checked event
        if type_(p) is str_ and (p in (":memory:", "") or p.startswith("file::memory:")):
            return True
        r = resolve(p)
        return r is not None and (r == work or r.startswith(prefix) or r == "/dev/null")

    def other_dir(p, stat=os.stat, resolve=resolve, work=work, type_=type, str_=str,
                  bytes_=bytes, os_error=OSError):
        """Whether `p` is a directory other than the work folder (whose descriptor, as a
        dir_fd, would let relative paths escape the checks)."""
        if type_(p) is not str_ and type_(p) is not bytes_:
            return True
        try:
            if stat(p).st_mode & 0o170000 != 0o040000:
                return False
        except os_error:
            return False
        return resolve(p) != work

    def deny(event, args, exit_=os._exit, write=os.write, type_=type, str_=str, int_=int,
             bytes_=bytes, repr_=repr, base_exc=BaseException):
        try:
            shown = []
            for a in args:  # only plain values: repr of the code's objects would run its code
                t = type_(a)
                shown.append(repr_(a)[:200] if t is str_ or t is int_ or t is bytes_ else "...")
            write(2, ("\nsandbox: forbidden: %s (%s)\n" % (event, ", ".join(shown))).encode())
        except base_exc:
            pass
        exit_(104)

    # the code objects of this function's nested functions, whose defaults may not change
    code_type = type(make_hook.__code__)
    OURS = frozenset(c for c in make_hook.__code__.co_consts if type(c) is code_type)

    def hook(event, args, deny=deny, inside=inside, other_dir=other_dir, DENY=DENY,
             DENY_PREFIX=DENY_PREFIX, NO_IMPORT=NO_IMPORT, OURS=OURS, PATHS=PATHS,
             PATH_EVENTS=PATH_EVENTS, WRITE=WRITE, type_=type, str_=str, int_=int, len_=len,
             function=type(make_hook), base_exc=BaseException, mem_error=MemoryError,
             exit_=os._exit):
        try:
            if event == "open":
                path, mode, flags = args
                if type_(path) is int_ or path is None:
                    return
                if type_(flags) is not int_ or flags & WRITE:
                    if not inside(path):
                        deny(event, args)
                # builtin open (a mode string) refuses directories; os.open does not
                if mode is None and other_dir(path):
                    deny(event, args)
            elif event == "import":
                name = args[0]
                if type_(name) is not str_ or name.partition(".")[0] in NO_IMPORT:
                    deny(event, args[:1])
            elif event == "object.__setattr__" or event == "object.__delattr__":
                if type_(args[0]) is function and args[0].__code__ in OURS:
                    deny(event, args[1:2])
            elif event in DENY or event.startswith(DENY_PREFIX):
                deny(event, args)
            elif event in PATH_EVENTS:
                for name, paths, fds in PATHS:
                    if name == event:
                        for i in fds:
                            a = args[i] if i < len_(args) else None
                            if a is not None and not (type_(a) is int_ and a == -1):
                                deny(event, args)
                        for i in paths:
                            if i < len_(args) and not inside(args[i]):
                                deny(event, args)
        except mem_error:
            exit_(103)
        except base_exc:
            deny(event, ())

    return hook


if __name__ == "__main__":
    main()
'''


def _python() -> list[str]:
    """This interpreter, isolated (-I) and without site-packages (-S)."""
    return [os.path.realpath(sys.executable), "-I", "-S"]


@cache
def _hidden_dirs(root: str) -> list[str]:
    """The site-packages folders under a bound root, hidden in the sandbox."""
    out = []
    for scheme in ("purelib", "platlib"):
        for base in {sys.base_prefix, sys.prefix}:
            p = os.path.realpath(sysconfig.get_path(scheme, vars={"base": base, "platbase": base}))
            if (p + "/").startswith(root.rstrip("/") + "/") and os.path.isdir(p) and p not in out:
                out.append(p)
    return out


@cache
def _bwrap_argv(bwrap: str, disk_mb: int) -> tuple[str, ...]:
    return tuple(bwrap_argv(bwrap, disk_mb))


def bwrap_argv(bwrap: str, disk_mb: int = 64) -> list[str]:
    """The bubblewrap command line of a sandbox (the command to run follows it): the
    namespaces, the read-only view of the system and this interpreter, /work, the env."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    argv += ["--new-session", "--as-pid-1", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    argv += ["--cap-drop", "ALL", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    roots = ["/usr"]
    for prefix in (sys.base_prefix, os.path.dirname(os.path.dirname(_python()[0]))):
        prefix = os.path.realpath(prefix)
        if not any((prefix + "/").startswith(r + "/") for r in roots):
            argv += ["--ro-bind", prefix, prefix]
            roots.append(prefix)
    hidden = [d for r in roots for d in _hidden_dirs(r)]
    for d in hidden:
        argv += ["--tmpfs", d, "--remount-ro", d]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb << 20), "--tmpfs", "/work"]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/work", "--clearenv"]
    for key, value in _env("/work").items():
        argv += ["--setenv", key, value]
    return argv + ["--"]


def _env(work: str) -> dict[str, str]:
    return {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


@cache
def _probe(bwrap: str) -> tuple[bool, str]:
    argv = bwrap_argv(bwrap) + _python() + ["-c", "pass"]
    try:
        r = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{bwrap} could not run ({e})"
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"exit code {r.returncode}"]
        return False, f"{bwrap} cannot create the sandbox here ({lines[-1]})"
    return True, bwrap


def isolation_available() -> tuple[bool, str]:
    """Whether bubblewrap can run the sandbox here: (True, its path) or (False, why not)."""
    if sys.platform != "linux":
        return False, f"bubblewrap needs Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "bwrap was not found on PATH"
    return _probe(bwrap)


def resolve_isolation(isolation: str | None = None) -> str:
    """The isolation a run gets: "os" (bubblewrap) or "weak". None means "os", or "weak"
    where bubblewrap cannot run and LMLAB_UNSAFE_SANDBOX=1. Raises UsageError, saying how
    to install bubblewrap, rather than run generated code without it unasked."""
    if isolation not in (None, *ISOLATIONS):
        raise UsageError(f"sandbox: isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "weak":
        return "weak"
    ok, why = isolation_available()
    if ok:
        return "os"
    if isolation is None and os.environ.get(UNSAFE_ENV) == "1":
        return "weak"
    raise UsageError(f"sandbox: refusing to run generated code: {why}; {INSTALL_HINT}")


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * TAIL))
    return f.read().decode("utf-8", "replace")[-TAIL:]


def _check_limits(timeout_s: float, memory_mb: int, disk_mb: int) -> None:
    if not timeout_s > 0:
        raise UsageError(f"sandbox: timeout_s must be > 0 seconds, got {timeout_s}")
    if memory_mb < 64:
        raise UsageError(f"sandbox: memory_mb must be >= 64 (Python needs it), got {memory_mb}")
    if disk_mb < 1:
        raise UsageError(f"sandbox: disk_mb must be >= 1, got {disk_mb}")


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `proc` to exit, at most `timeout_s`; whether it did. A pidfd wakes at the
    exit itself (Popen.wait with a timeout polls with sleeps of up to 50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        exited = bool(poll.poll(timeout_s * 1000))
    finally:
        os.close(fd)
    if exited:
        proc.wait()
    return exited


def _feed(stdin, payload: bytes) -> None:
    """Write the code and tests to the sandbox, from a thread: a payload larger than the
    pipe buffer blocks until the sandbox reads it, and if bwrap or the supervisor stalls
    first, the wall-clock timeout must still run (and kill it, which ends the write)."""
    try:
        stdin.write(payload)
    except OSError:  # it died, or was killed, before reading it all
        pass
    finally:
        with contextlib.suppress(OSError):
            stdin.close()


def run_code(
    code: str,
    tests: str,
    timeout_s: float = 5,
    memory_mb: int = 512,
    isolation: str | None = None,
    disk_mb: int = 64,
    audit_hook: bool = True,
) -> Result:
    """Run `code`, then `tests` against it (see the module docstring), in a sandbox.

    `timeout_s` is wall-clock (CPU time is capped one second later); `memory_mb` caps each
    process's address space; `disk_mb` the work folder. `isolation` as `resolve_isolation`.
    `audit_hook=False` leaves the audit hook out, so tests can check what the operating
    system's layer holds on its own; only with isolation "os"."""
    mode = resolve_isolation(isolation)
    _check_limits(timeout_s, memory_mb, disk_mb)
    if not audit_hook and mode != "os":
        raise UsageError("sandbox: audit_hook=False needs isolation 'os' (bubblewrap)")
    cpu = int(timeout_s) + 1
    with contextlib.ExitStack() as stack:
        out, err, verdict = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        settings = [verdict.fileno(), cpu, memory_mb, FSIZE_MB, disk_mb, MAX_FILES]
        settings.append(int(audit_hook))
        command = _python() + ["-c", SUPERVISOR, *map(str, settings)]
        if mode == "os":
            bwrap = isolation_available()[1]
            argv, cwd, env = [*_bwrap_argv(bwrap, disk_mb), *command], None, {}
        else:
            work = tempfile.mkdtemp(prefix="lmlab-sandbox-")
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            argv, cwd, env = command, work, _env(work)
        code_b, tests_b = (t.encode("utf-8", "surrogatepass") for t in (code, tests))
        payload = f"{len(code_b)} {len(tests_b)}\n".encode() + code_b + tests_b
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            pass_fds=(verdict.fileno(),),
            start_new_session=True,  # its own process group, killed as a whole
        )
        timed_out = True
        feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        try:
            feeder.start()
            timed_out = not _wait(proc, timeout_s)
        finally:
            if timed_out:  # (or interrupted) the group: bwrap, and with it the sandbox
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            feeder.join(1)  # the reader is gone, so its write has failed or finished
        seconds = time.perf_counter() - start
        verdict.seek(0)
        status = verdict.read(64).decode("ascii", "replace")
        stdout, stderr = _tail(out), _tail(err)
        if status not in STATUSES:
            status = "timeout" if timed_out else "error"
            if status == "error":
                stderr += f"\nsandbox: no verdict (the sandbox exited with {proc.returncode})"
        return Result(status == "passed", status, stderr[-TAIL:], seconds, stdout, proc.returncode)


def run_many(
    jobs: Sequence[tuple[str, str]],
    workers: int = 4,
    timeout_s: float = 5,
    memory_mb: int = 512,
    isolation: str | None = None,
    disk_mb: int = 64,
) -> list[Result]:
    """Run (code, tests) pairs, `workers` sandboxes at a time; results in input order.

    Threads suffice: each worker only waits on its sandbox's process."""
    if workers < 1:
        raise UsageError(f"sandbox: workers must be >= 1, got {workers}")
    _check_limits(timeout_s, memory_mb, disk_mb)
    isolation = resolve_isolation(isolation)  # refused once, before any job starts
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(run_code, code, tests, timeout_s, memory_mb, isolation, disk_mb)
            for code, tests in jobs
        ]
        return [f.result() for f in futures]

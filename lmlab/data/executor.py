"""Executors: run one function over many independent tasks, with task-level resume.

The pipeline is separate from where it runs (as in datatrove): a task is a picklable
value, the function writes its own outputs atomically and then a completion marker, and
an executor only decides *where* each unfinished task runs. So a relaunch after a kill
skips every task whose marker exists and matches the pipeline's key, and the result is
the same as an uninterrupted run. `local` uses a process pool on this machine; `ray`
submits the same function to a Ray cluster (or starts a local Ray instance).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from lmlab.console import progress
from lmlab.errors import UsageError
from lmlab.utils import read_json, write_json

Executor = Literal["local", "ray"]


def marker_path(work: Path, phase: str, task: int) -> Path:
    return work / phase / f"{task:05d}.done.json"


def is_done(work: Path, phase: str, task: int, key: str) -> bool:
    """A task is done only if its marker exists and was written by the same pipeline key."""
    p = marker_path(work, phase, task)
    try:
        return read_json(p).get("key") == key
    except (OSError, ValueError):
        return False


def mark_done(work: Path, phase: str, task: int, key: str, info: dict | None = None) -> None:
    write_json(marker_path(work, phase, task), {"key": key, **(info or {})})


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    workers: int,
    executor: Executor = "local",
    desc: str = "tasks",
    ray_address: str | None = None,
) -> list[Any]:
    """Run `fn(task)` for every task; results in task order. Exceptions propagate."""
    if not tasks:
        return []
    if executor == "ray":
        return _run_ray(fn, tasks, workers, desc, ray_address)
    results: list[Any] = [None] * len(tasks)
    with progress(desc, total=len(tasks), unit="tasks") as bar:
        if workers <= 1 or len(tasks) == 1:
            for i, t in enumerate(tasks):
                results[i] = fn(t)
                bar.update(advance=1)
            return results
        # Not plain fork: this process runs threads (the progress bar), and a fork copies
        # their locks mid-use. A fork server starts once, imports the pipeline, then forks.
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([fn.__module__])
        else:
            ctx = mp.get_context("spawn")
        # The workers get the read end; this process keeps the only write end, which the
        # kernel closes when it dies, however it dies (see _exit_with_parent).
        alive_r, alive_w = ctx.Pipe(duplex=False)
        try:
            with (
                _sigterm_exits(),
                ctx.Pool(min(workers, len(tasks)), _init_worker, (alive_r,)) as pool,
            ):
                jobs = [(fn, i, t) for i, t in enumerate(tasks)]
                for i, res in pool.imap_unordered(_indexed, jobs):
                    results[i] = res
                    bar.update(advance=1)
        finally:
            alive_r.close()
            alive_w.close()
    return results


def _init_worker(parent: Connection) -> None:
    """Pool initializer: workers leave Ctrl-C to the parent and die quietly when it does.

    Ctrl-C reaches the whole process group; the parent alone handles it and stops the
    pool, instead of every worker printing a KeyboardInterrupt traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker that finishes a task just as the parent dies writes its result into a
    # pipe nobody reads. With SIGPIPE at its default it then dies quietly, as a Unix
    # pipeline stage does, instead of printing a BrokenPipeError traceback.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    watch = threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True)
    watch.start()


def _exit_with_parent(parent: Connection) -> None:
    """Exit quietly as soon as the parent process is gone.

    A killed parent (SIGKILL, or SIGTERM) would otherwise leave its workers running
    until their current task ends, then failing to send the result with BrokenPipeError
    tracebacks on the terminal. PR_SET_PDEATHSIG does not help here: the workers are
    children of the fork server, which stays up as long as they hold its "alive" pipe.
    The parent holds the only write end of `parent`, so a read returns EOF exactly when
    no process can write to it any more.
    """
    with suppress(EOFError, OSError):
        parent.recv_bytes()
    os._exit(1)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM stops the run the way Ctrl-C does: the pool is torn down on the way out.

    Left to the default action, SIGTERM kills this process at once; the workers follow
    (see _exit_with_parent), but the pool's semaphores are left for multiprocessing's
    resource tracker, which warns about them on the terminal. A handler set by the
    caller, or a run off the main thread, is left alone.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _indexed(args: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, i, task = args
    return i, fn(task)


def _run_ray(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int,
    desc: str,
    address: str | None,
) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise UsageError("executor 'ray' needs ray: pip install 'lmlab[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False}  # workers' warnings reach us
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers
        ray.init(**kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(t): i for i, t in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        pending = list(refs)
        with progress(desc + " (ray)", total=len(tasks), unit="tasks") as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    results[refs[ref]] = ray.get(ref)
                    bar.update(advance=1)
        return results
    finally:
        if started:
            ray.shutdown()

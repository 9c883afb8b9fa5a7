"""Console output and progress: one place decides what is shown, so `--quiet` works everywhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_state: dict = {"quiet": False}
console = Console(stderr=True, highlight=False)


RESUME_HINT = "interrupted; run the same command again to resume"
_state["interrupt_hint"] = "interrupted"


def resumable() -> None:
    """Say that the running command resumes when run again, so an interrupt says so (and
    only then: a hint to rerun where nothing resumes would mislead)."""
    _state["interrupt_hint"] = RESUME_HINT


def interrupt_hint() -> str:
    return _state["interrupt_hint"]


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def log(msg: str) -> None:
    """A status line on stderr (stdout is kept for results such as generated text)."""
    if not _state["quiet"]:
        console.print(msg)


def warn(msg: str) -> None:
    # escaped: messages quote user data ("[x]" is not markup); soft_wrap keeps file:line whole
    console.print(f"[yellow]warning:[/yellow] {escape(msg)}", soft_wrap=True)


@contextmanager
def progress(
    description: str, total: float | None, unit: str = "", disable: bool = False
) -> Iterator[ProgressBar]:
    """A progress bar (or, when output is not a terminal, a line every ~10 s); `disable`
    keeps it silent (the non-zero ranks of a distributed run)."""
    bar = ProgressBar(description, total, unit, disable)
    try:
        yield bar
    finally:
        bar.close()


class ProgressBar:
    def __init__(
        self, description: str, total: float | None, unit: str, disable: bool = False
    ) -> None:
        self.description = description
        self._disabled = disable
        self.total = total
        self.done = 0.0
        self._status = ""
        self._interactive = console.is_terminal and not _state["quiet"] and not disable
        self._last_line = time.monotonic()
        self._start = time.monotonic()
        self._progress: Progress | None = None
        if self._interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn()
                if unit == ""
                else TextColumn(f"{{task.completed:.0f}} {unit}"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, status="")

    def update(
        self, advance: float = 0.0, completed: float | None = None, status: str = ""
    ) -> None:
        self.done = completed if completed is not None else self.done + advance
        if status:
            self._status = status
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, status=self._status)
        elif not _state["quiet"] and not self._disabled and time.monotonic() - self._last_line > 10:
            self._last_line = time.monotonic()
            frac = eta = ""
            if self.total:
                share = self.done / self.total
                frac = f" {100 * share:.0f}%"
                if share > 0:
                    left = (time.monotonic() - self._start) * (1 - share) / share
                    eta = f" ETA {int(left // 60)}:{int(left % 60):02d}"
            print(f"  {self.description}{frac} {self._status}{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

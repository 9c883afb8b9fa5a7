"""Prometheus text exposition of a server's state, written by hand (the format is a few
lines of text; a client library would be a dependency for nothing).

Counters only grow, gauges are read when scraped, histograms keep cumulative bucket
counts, a sum and a count, as Prometheus expects (`_bucket{le=...}`, `_sum`, `_count`)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

# seconds: from a fast decode step on a small model to a long queue on a busy laptop
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.total += x
        self.n += 1


class Metrics:
    """Counters and histograms per served model, updated from the engine threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.histograms: dict[tuple[str, str], Histogram] = {}
        self.gauges: dict[str, tuple[str, Callable[[], dict[str, float]]]] = {}

    def inc(self, name: str, model: str, by: float = 1.0) -> None:
        with self.lock:
            self.counters[name, model] = self.counters.get((name, model), 0.0) + by

    def observe(self, name: str, model: str, x: float) -> None:
        with self.lock:
            self.histograms.setdefault((name, model), Histogram()).observe(x)

    def gauge(self, name: str, help: str, read: Callable[[], dict[str, float]]) -> None:
        """A value per model, read at scrape time."""
        self.gauges[name] = (help, read)

    def counter(self, name: str, model: str) -> float:
        with self.lock:
            return self.counters.get((name, model), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for name, (help, read) in self.gauges.items():
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{model="{_esc(m)}"}} {_num(v)}' for m, v in read().items()]
        with self.lock:
            names = sorted({n for n, _ in self.counters})
            for name in names:
                lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
                for (n, m), v in sorted(self.counters.items()):
                    if n == name:
                        lines.append(f'{name}{{model="{_esc(m)}"}} {_num(v)}')
            for name in sorted({n for n, _ in self.histograms}):
                lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} histogram"]
                for (n, m), h in sorted(self.histograms.items()):
                    if n != name:
                        continue
                    label = f'model="{_esc(m)}"'
                    running = 0
                    for le, c in zip((*h.buckets, float("inf")), h.counts, strict=True):
                        running += c
                        lines.append(f'{name}_bucket{{{label},le="{_num(le)}"}} {running}')
                    lines.append(f"{name}_sum{{{label}}} {_num(h.total)}")
                    lines.append(f"{name}_count{{{label}}} {h.n}")
        return "\n".join(lines) + "\n"


HELP = {
    "lmlab_requests_total": "Requests finished (all their samples done, or aborted).",
    "lmlab_requests_aborted_total": "Requests dropped before the end (client gone, timeout).",
    "lmlab_prompt_tokens_total": "Prompt tokens of admitted requests.",
    "lmlab_generation_tokens_total": "Tokens generated.",
    "lmlab_time_to_first_token_seconds": "From arrival to the first generated token.",
    "lmlab_inter_token_latency_seconds": "Between two tokens of one sequence.",
}


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))

"""Error bars and paired comparisons for evaluation metrics.

Every reported number gets a standard error and a 95% interval: analytic where one exists (a
mean, a proportion), a seeded bootstrap over items otherwise (corpus BLEU, median, pass@k
averages). Two models scored on the same items are compared *paired* (Kaddour et al.'s
brittle evaluations: the item-to-item variance cancels, so far smaller differences are
detectable than by comparing two independent error bars).

The Student-t distribution is computed here (regularised incomplete beta function) so that
scipy is not a dependency; the tests check it against scipy when it is installed.

Typical use::

    summarize(correct)                                   # accuracy, analytic
    summarize(correct, metric="proportion")              # with a Wilson interval
    summarize(list(zip(preds, refs)), metric=bleu_of)    # corpus BLEU, bootstrap
    paired_t_test(base_scores, sft_scores).p_value       # per-item scores, same items
    paired_bootstrap(base_items, sft_items, metric=bleu_of)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from lmlab.errors import UsageError

Metric = str | Callable[[Any], float]
""""mean", "median", or a function of a list of items (an ndarray for numeric input)."""

_CHUNK_CELLS = 2_000_000  # resampled cells held at once: bounds bootstrap memory (~16 MB)


# --- the Student-t distribution --------------------------------------------------------


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(confidence: float, df: float) -> float:
    """The t such that P(|T| <= t) = confidence (e.g. 12.71 for 95% at df = 1)."""
    alpha = 1.0 - confidence
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# --- analytic standard errors ------------------------------------------------------------


def _numeric(values: Any, fn: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{fn}: values must be numbers") from None
    if arr.ndim != 1:
        raise UsageError(f"{fn}: values must be a flat list of numbers, got shape {arr.shape}")
    return arr


def stderr_mean(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); NaN if n < 2."""
    arr = _numeric(values, "stderr_mean")
    if len(arr) < 2:
        return float("nan")
    return float(arr.std(ddof=1) / math.sqrt(len(arr)))


def stderr_proportion(successes: int, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of a success rate p = successes / n."""
    if n < 1 or not 0 <= successes <= n:
        raise UsageError(f"stderr_proportion: need 0 <= successes <= n, n >= 1 ({successes}/{n})")
    p = successes / n
    return math.sqrt(p * (1.0 - p) / n)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike p +- z*se it stays inside [0, 1] and
    is not degenerate at 0% or 100% accuracy, which small eval sets hit often."""
    if n < 1 or not 0 <= successes <= n:
        raise UsageError(f"wilson_interval: need 0 <= successes <= n, n >= 1 ({successes}/{n})")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact at the ends, where rounding would otherwise leave bounds like 1e-17
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


# --- bootstrap ---------------------------------------------------------------------------


@dataclass
class BootstrapResult:
    value: float  # the metric on all items
    stderr: float  # standard deviation of the resampled metric
    ci: tuple[float, float]  # percentile interval
    n: int
    n_boot: int
    p_value: float | None = None  # paired bootstrap only: H0 "no difference"


def _check_boot(n: int, n_boot: int, confidence: float, fn: str) -> None:
    if n < 1:
        raise UsageError(f"{fn}: no items")
    if n_boot < 2:
        raise UsageError(f"{fn}: n_boot must be at least 2, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise UsageError(f"{fn}: confidence must be in (0, 1), got {confidence}")


def _index_chunks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Resampling indices, (rows, n) at a time. A fixed chunk size, so the stream of indices
    depends only on (n, n_boot, seed): every metric on the same seed sees the same resamples."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _metric_fns(
    metric: Metric, vectorized: bool, fn: str
) -> tuple[Callable[[Any], float], Callable[[np.ndarray], np.ndarray] | None]:
    """(metric on one item list, metric on a (rows, n) numeric array or None)."""
    if metric == "mean":
        return (lambda x: float(np.mean(x))), (lambda x: x.mean(axis=1))
    if metric == "median":
        return (lambda x: float(np.median(x))), (lambda x: np.median(x, axis=1))
    if callable(metric):
        return metric, (metric if vectorized else None)
    raise UsageError(f"{fn}: metric must be 'mean', 'median' or a function, not {metric!r}")


def _take(items: Any, idx: np.ndarray) -> Any:
    return items[idx] if isinstance(items, np.ndarray) else [items[i] for i in idx]


def _resampled(
    datasets: list[Any], one: Callable, many: Callable | None, n_boot: int, seed: int
) -> list[np.ndarray]:
    """The metric on each dataset under the same resamples of item indices."""
    n = len(datasets[0])
    arrays = [_numeric(d, "bootstrap") for d in datasets] if many is not None else datasets
    out = [np.empty(n_boot) for _ in datasets]
    row = 0
    for idx in _index_chunks(n, n_boot, seed):
        for data, stats in zip(arrays, out, strict=True):
            if many is not None:
                stats[row : row + len(idx)] = many(data[idx])
            else:
                stats[row : row + len(idx)] = [one(_take(data, r)) for r in idx]
        row += len(idx)
    return out


def _full_value(data: Any, one: Callable, many: Callable | None) -> float:
    """The metric on all items (a vectorised metric gets them as a single row)."""
    if many is not None and one is many:
        return float(many(_numeric(data, "bootstrap")[None, :])[0])
    return float(one(data))


def _percentile_ci(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _items(values: Any) -> Any:
    """Numbers become a float array (vectorised resampling); anything else stays a list."""
    if isinstance(values, np.ndarray):
        return values
    values = list(values)
    if values and all(isinstance(v, int | float | np.number) for v in values):
        return np.asarray(values, dtype=np.float64)
    return values


def bootstrap(
    items: Sequence[Any],
    metric: Metric = "mean",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    vectorized: bool = False,
) -> BootstrapResult:
    """Bootstrap standard error and percentile interval of `metric` over items.

    `metric` is "mean", "median" or a function of a list of items (an ndarray when the items
    are numbers) — e.g. corpus BLEU over (prediction, reference) pairs. With
    `vectorized=True` the function instead takes a (resamples, n) array and returns one value
    per row, so the whole bootstrap runs in numpy. Seeded: the same inputs give the same
    interval."""
    data = _items(items)
    _check_boot(len(data), n_boot, confidence, "bootstrap")
    one, many = _metric_fns(metric, vectorized, "bootstrap")
    (stats,) = _resampled([data], one, many, n_boot, seed)
    return BootstrapResult(
        value=_full_value(data, one, many),
        stderr=float(stats.std(ddof=1)),
        ci=_percentile_ci(stats, confidence),
        n=len(data),
        n_boot=n_boot,
    )


# --- paired comparisons ------------------------------------------------------------------


@dataclass
class PairedResult:
    diff: float  # metric(b) - metric(a): positive means b is better
    stderr: float
    ci: tuple[float, float]
    p_value: float  # two-sided, H0: no difference
    n: int
    method: str  # "paired-t" or "paired-bootstrap"
    t: float | None = None
    df: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become None."""
        return _json_safe(asdict(self))


def _same_items(a: Sequence, b: Sequence, fn: str) -> None:
    if len(a) != len(b):
        raise UsageError(
            f"{fn}: the two models must be scored on the same items ({len(a)} vs {len(b)})"
        )


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedResult:
    """Paired t-test on per-item scores of two models on the same items: the mean of b - a,
    its standard error, a t interval and the two-sided p-value (df = n - 1)."""
    _same_items(a, b, "paired_t_test")
    d = _numeric(b, "paired_t_test") - _numeric(a, "paired_t_test")
    n = len(d)
    if n == 0:
        raise UsageError("paired_t_test: no items")
    mean = float(d.mean())
    nan = float("nan")
    if n < 2:
        return PairedResult(mean, nan, (nan, nan), nan, n, "paired-t")
    se = float(d.std(ddof=1) / math.sqrt(n))
    df = n - 1
    # se == 0: every item moved by the same amount, so there is no noise to test against
    t = mean / se if se > 0.0 else (0.0 if mean == 0.0 else math.copysign(math.inf, mean))
    half = t_quantile(confidence, df) * se
    return PairedResult(
        mean, se, (mean - half, mean + half), t_two_sided_p(t, df), n, "paired-t", t, df
    )


def paired_bootstrap(
    a: Sequence[Any],
    b: Sequence[Any],
    metric: Metric = "mean",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    vectorized: bool = False,
) -> PairedResult:
    """Paired bootstrap (Koehn 2004): resample item indices once per round and score both
    models on the same resample, so corpus-level metrics (BLEU, chrF) can be compared.

    The p-value is that of the percentile interval: twice the share of resampled differences
    on the far side of zero, floored at 1 / n_boot (the bootstrap cannot resolve less)."""
    _same_items(a, b, "paired_bootstrap")
    da, db = _items(a), _items(b)
    _check_boot(len(da), n_boot, confidence, "paired_bootstrap")
    one, many = _metric_fns(metric, vectorized, "paired_bootstrap")
    sa, sb = _resampled([da, db], one, many, n_boot, seed)
    diffs = sb - sa
    tail = min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return PairedResult(
        diff=_full_value(db, one, many) - _full_value(da, one, many),
        stderr=float(diffs.std(ddof=1)),
        ci=_percentile_ci(diffs, confidence),
        p_value=min(1.0, max(2.0 * tail, 1.0 / n_boot)),
        n=len(da),
        method="paired-bootstrap",
    )


# --- one summary per metric ------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def summarize(
    values: Sequence[Any], metric: Metric = "mean", *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """{"value", "stderr", "ci95", "n", "method"} for a results table, JSON-safe (None where
    undefined, e.g. the error of a single item).

    - "mean": analytic standard error, Student-t 95% interval ("analytic-t").
    - "proportion": values are 0/1; binomial standard error, Wilson interval ("wilson").
    - "median" or a function of a list of items: bootstrap ("bootstrap", seeded)."""
    if metric == "proportion":
        arr = _numeric(values, "summarize")
        if len(arr) == 0:
            raise UsageError("summarize: no values")
        if not np.isin(arr, (0.0, 1.0)).all():
            raise UsageError("summarize: metric 'proportion' needs values that are all 0 or 1")
        k, n = int(arr.sum()), len(arr)
        out = {
            "value": k / n,
            "stderr": stderr_proportion(k, n),
            "ci95": list(wilson_interval(k, n)),
            "n": n,
            "method": "wilson",
        }
    elif metric == "mean":
        arr = _numeric(values, "summarize")
        if len(arr) == 0:
            raise UsageError("summarize: no values")
        mean, se, n = float(arr.mean()), stderr_mean(arr), len(arr)
        half = t_quantile(0.95, n - 1) * se if n > 1 else float("nan")
        ci = [mean - half, mean + half] if math.isfinite(half) else None
        out = {"value": mean, "stderr": se, "ci95": ci, "n": n, "method": "analytic-t"}
    else:
        if len(values) == 0:
            raise UsageError("summarize: no values")
        res = bootstrap(values, metric, n_boot=n_boot, seed=seed)
        out = {
            "value": res.value,
            "stderr": res.stderr,
            "ci95": list(res.ci),
            "n": res.n,
            "method": "bootstrap",
        }
    return _json_safe(out)

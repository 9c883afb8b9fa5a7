"""Calibration of multiple-choice predictions: does 70% confidence mean 70% correct?

Input per item: the model's probability of the answer it chose (its confidence, e.g. the
softmax over the choices' log-likelihoods) and whether that answer was right. Bins are equal
width over [0, 1] as in Guo et al. (2017), "On Calibration of Modern Neural Networks": bin m
holds confidences in ((m-1)/M, m/M], with 0 in the first bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import UsageError
from lmlab.utils import atomic_path


@dataclass
class CalibrationBin:
    lo: float
    hi: float
    count: int
    confidence: float  # mean confidence in the bin (NaN when empty)
    accuracy: float  # fraction correct in the bin (NaN when empty)


def _inputs(confidence: Sequence[float], correct: Sequence[bool | float], n_bins: int):
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or corr.shape != conf.shape:
        raise UsageError(
            f"calibration: confidence and correct must be flat lists of the same length "
            f"(got {conf.shape} and {corr.shape})"
        )
    if len(conf) == 0:
        raise UsageError("calibration: no predictions")
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        raise UsageError("calibration: confidence must be probabilities in [0, 1]")
    if not np.isin(corr, (0.0, 1.0)).all():
        raise UsageError("calibration: correct must be 0/1 or booleans")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise UsageError(f"calibration: n_bins must be a positive integer, got {n_bins!r}")
    return conf, corr


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # ceil(conf * M) - 1 puts conf in ((m-1)/M, m/M]; 0 joins the first bin.
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def calibration_bins(
    confidence: Sequence[float], correct: Sequence[bool | float], n_bins: int = 10
) -> list[CalibrationBin]:
    """Per-bin count, mean confidence and accuracy: the data of a reliability diagram."""
    conf, corr = _inputs(confidence, correct, n_bins)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, acc = conf_sum / count, corr_sum / count
    return [
        CalibrationBin(
            m / n_bins, (m + 1) / n_bins, int(count[m]), float(mean_conf[m]), float(acc[m])
        )
        for m in range(n_bins)
    ]


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool | float], n_bins: int = 10
) -> float:
    """ECE = sum over bins of (|B_m| / n) * |accuracy(B_m) - confidence(B_m)|."""
    bins = calibration_bins(confidence, correct, n_bins)
    n = sum(b.count for b in bins)
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in bins if b.count))


def maximum_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool | float], n_bins: int = 10
) -> float:
    """MCE = the largest |accuracy - confidence| over non-empty bins (the worst-case gap)."""
    bins = calibration_bins(confidence, correct, n_bins)
    return float(max(abs(b.accuracy - b.confidence) for b in bins if b.count))


def brier_score(confidence: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean squared error of the confidence as a prediction of correctness (lower is
    better); unlike ECE it has no binning choice."""
    conf, corr = _inputs(confidence, correct, 1)
    return float(np.mean((conf - corr) ** 2))


def reliability_plot(
    confidence: Sequence[float],
    correct: Sequence[bool | float],
    path: str | Path,
    n_bins: int = 10,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram as PNG: accuracy per confidence bin against the diagonal,
    with the gap shaded and the ECE in the legend, plus a histogram of confidences.

    Uses a bare Agg `Figure` (no pyplot), so it is headless and leaves global matplotlib
    state alone; the file appears atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = calibration_bins(confidence, correct, n_bins)
    ece = expected_calibration_error(confidence, correct, n_bins)
    mce = maximum_calibration_error(confidence, correct, n_bins)
    centers = np.array([(b.lo + b.hi) / 2 for b in bins])
    width = 1.0 / n_bins
    acc = np.array([b.accuracy if b.count else 0.0 for b in bins])
    gap_base = np.array([b.confidence if b.count else 0.0 for b in bins])
    counts = np.array([b.count for b in bins])

    fig = Figure(figsize=(5, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers, acc, width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(
        centers,
        acc - gap_base,
        bottom=gap_base,
        width=width,
        color="#dd8452",
        alpha=0.45,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"Reliability (n={counts.sum()}, {n_bins} bins)")
    ax.legend(loc="upper left", title=f"ECE {ece:.3f}, MCE {mce:.3f}", fontsize=8)
    hist.bar(centers, counts, width=width, edgecolor="black", color="#8c8c8c")
    hist.set_xlabel("confidence")
    hist.set_ylabel("count")
    fig.tight_layout()

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path

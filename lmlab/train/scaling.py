"""Scaling laws (Zhao et al. §2.1): fit L(N, D) to measured losses, predict, and allocate compute.

Two forms, both of final loss L against parameters N and training tokens D:

- Chinchilla (Hoffmann et al. 2022, §3.3): L = E + A/N^α + B/D^β.
- Kaplan (Kaplan et al. 2020, eq. 1.5): L = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D.

Fitting follows Hoffmann et al.'s Approach 3: minimise the Huber loss (δ = 1e-3) between
the predicted and observed *log* loss, from the best points of a grid of initialisations.
Hoffmann et al. used L-BFGS from each start; here the best 64 starts are refined at once
by Levenberg-Marquardt on iteratively reweighted residuals (the standard way to minimise
an M-estimator), which needs no scipy and takes well under a second. The forms are
written as log-sum-exps of the log parameters (log E, log A, ...), so the optimiser
works on numbers of order one whatever the scale of N and D. Huber with a small δ is
nearly an absolute-error fit: one bad run moves it little.

Compute. A budget of C FLOPs buys D = C / (6N) tokens for N parameters (Kaplan's 6·N·D:
2 FLOPs per multiply-add forward, twice that backward, attention and embeddings left
out). `compute_optimal` minimises the fitted L(N, C/(6N)) over N, in closed form or
numerically (golden-section search on log N); both forms have a closed form:

- Chinchilla: N_opt = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β)) (Hoffmann et al.);
- Kaplan: N_opt = (k·N_c^k·C / (6·D_c))^(1/(k+1)) with k = α_N/α_D (set dL/dN = 0 in
  eq. 1.5 with D = C/(6N)).

N is whatever count the points used: a sweep counts non-embedding parameters, as Kaplan
did (Hoffmann counted all of them). Published constants are in that paper's own units
(their tokenizer, nats per token), so they say nothing about the loss of another corpus;
they are here for the compute allocation they imply.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from lmlab.errors import UsageError

HUBER_DELTA = 1e-3  # Hoffmann et al.: δ = 10⁻³ on log-loss residuals
REFINE = 64  # grid initialisations refined (all at once): the best by their starting objective
FORMS: dict[str, tuple[str, ...]] = {
    "chinchilla": ("E", "A", "B", "alpha", "beta"),
    "kaplan": ("N_c", "D_c", "alpha_N", "alpha_D"),
}


@dataclass
class Fit:
    """A scaling law: its form, its parameters, and how well it fits the points it came from."""

    form: str
    params: dict[str, float]
    source: str = "fit"
    points: int = 0
    rmse: float | None = None  # of the loss, in nats
    max_abs_rel_error: float | None = None  # max |predicted / observed - 1| over the points
    r2: float | None = None  # of the loss
    objective: float | None = None  # the Huber sum it reached
    residuals: list[float] = field(default_factory=list)  # predicted - observed, per point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fit:
        form = d.get("form")
        if form not in FORMS:
            raise UsageError(f"scaling fit: unknown form {form!r} (known: {', '.join(FORMS)})")
        params = d.get("params") or {}
        missing = [k for k in FORMS[form] if k not in params]
        if missing:
            raise UsageError(f"scaling fit ({form}): missing parameters {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# Published constants (each in its paper's units: its tokenizer's nats per token).
HOFFMANN = Fit(
    "chinchilla",
    {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
    source="Hoffmann et al. 2022, Approach 3 (§3.3), as printed there (rounded)",
)
BESIROGLU = Fit(
    "chinchilla",
    {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
    source="Besiroglu et al. 2024, 'Chinchilla scaling: a replication attempt' (refit of "
    "Hoffmann et al.'s data)",
)
KAPLAN = Fit(
    "kaplan",
    {"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.103},
    source="Kaplan et al. 2020, Table 2 (eq. 1.5; non-embedding N)",
)
PUBLISHED = {"hoffmann": HOFFMANN, "besiroglu": BESIROGLU, "kaplan": KAPLAN}


# --- the laws -------------------------------------------------------------------------


def _log_law(form: str, theta: torch.Tensor, ln_n: torch.Tensor, ln_d: torch.Tensor):
    """log L at every (N, D) for every row of `theta` ([K, P], the optimiser's parameters,
    see `_to_theta`), and its Jacobian: ([K, M], [K, M, P])."""
    if form == "chinchilla":
        e, a, b, alpha, beta = (t[:, None] for t in theta.unbind(-1))
        u = torch.stack([a - alpha * ln_n, b - beta * ln_d, e.expand(-1, len(ln_n))], -1)
        f = torch.logsumexp(u, -1)
        s = torch.softmax(u, -1)
        jac = [s[..., 2], s[..., 0], s[..., 1], -s[..., 0] * ln_n, -s[..., 1] * ln_d]
        return f, torch.stack(jac, -1)
    lnc, ldc, an, ad = (t[:, None] for t in theta.unbind(-1))
    v1 = an / ad * (lnc - ln_n)
    v = torch.stack([v1, (ldc - ln_d).expand_as(v1)], -1)
    lse = torch.logsumexp(v, -1)
    s = torch.softmax(v, -1)
    jac = [an * s[..., 0], ad * s[..., 1], s[..., 0] * (lnc - ln_n), lse - s[..., 0] * v1]
    return ad * lse, torch.stack(jac, -1)


def _to_theta(fit: Fit) -> list[float]:
    p = fit.params
    if fit.form == "chinchilla":
        return [math.log(p["E"]), math.log(p["A"]), math.log(p["B"]), p["alpha"], p["beta"]]
    return [math.log(p["N_c"]), math.log(p["D_c"]), p["alpha_N"], p["alpha_D"]]


def _from_theta(form: str, theta: list[float]) -> dict[str, float]:
    if form == "chinchilla":
        e, a, b, alpha, beta = theta
        return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}
    lnc, ldc, an, ad = theta
    return {"N_c": math.exp(lnc), "D_c": math.exp(ldc), "alpha_N": an, "alpha_D": ad}


def predict(fit: Fit, n: Any, d: Any) -> Any:
    """The loss the law gives at N parameters and D tokens (floats or arrays)."""
    p = fit.params
    n_arr, d_arr = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if fit.form == "chinchilla":
            out = p["E"] + p["A"] / n_arr ** p["alpha"] + p["B"] / d_arr ** p["beta"]
        elif fit.form == "kaplan":
            k = p["alpha_N"] / p["alpha_D"]
            out = ((p["N_c"] / n_arr) ** k + p["D_c"] / d_arr) ** p["alpha_D"]
        else:
            raise UsageError(f"scaling: unknown form {fit.form!r} (known: {', '.join(FORMS)})")
    return float(out) if out.ndim == 0 else out


# --- fitting --------------------------------------------------------------------------


def _init_grid(form: str) -> np.ndarray:
    """Starting points, as Hoffmann et al. (a grid over every parameter)."""
    if form == "chinchilla":
        axes = [
            np.arange(-1.0, 2.01, 0.5),  # log E
            np.arange(0.0, 25.1, 5.0),  # log A
            np.arange(0.0, 25.1, 5.0),  # log B
            np.arange(0.0, 2.01, 0.5),  # alpha
            np.arange(0.0, 2.01, 0.5),  # beta
        ]
    else:
        axes = [
            np.arange(5.0, 40.1, 5.0),  # log N_c
            np.arange(5.0, 40.1, 5.0),  # log D_c
            np.array([0.05, 0.1, 0.2, 0.4, 0.8]),  # alpha_N
            np.array([0.05, 0.1, 0.2, 0.4, 0.8]),  # alpha_D
        ]
    return np.array(list(itertools.product(*axes)), dtype=float)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray, form: str) -> None:
    if form not in FORMS:
        raise UsageError(f"scaling: unknown form {form!r} (known: {', '.join(FORMS)})")
    if not (len(n) == len(d) == len(loss)):
        raise UsageError(
            f"scaling: N, D and loss need one value per point (got {len(n)}, {len(d)}, {len(loss)})"
        )
    for name, arr in (("N (parameters)", n), ("D (tokens)", d), ("loss", loss)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise UsageError(
                f"scaling: {name} must be finite and > 0; point {int(np.argmax(bad)) + 1} has "
                f"{float(arr[bad][0])!r}"
            )
    k = len(FORMS[form])
    if len(n) < k:
        raise UsageError(
            f"scaling: the {form} form has {k} parameters and needs at least {k} points "
            f"(got {len(n)})"
        )
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise UsageError(
            "scaling: the points need at least 2 different sizes N and 2 different token "
            "counts D (one of each cannot separate the two terms)"
        )


def fit_law(n: Any, d: Any, loss: Any, form: str = "chinchilla", delta: float = HUBER_DELTA) -> Fit:
    """Fit `form` to points (N, D, loss): Huber on log loss, minimised from the best grid
    starts at once (batched Levenberg-Marquardt on the iteratively reweighted residuals)."""
    n_arr, d_arr, l_arr = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    _check_points(n_arr, d_arr, l_arr, form)
    ln_n, ln_d, ln_l = (torch.tensor(np.log(x), dtype=torch.float64) for x in (n_arr, d_arr, l_arr))

    def residuals(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, jac = _log_law(form, theta, ln_n, ln_d)
        return f - ln_l, jac

    def objective(r: torch.Tensor) -> torch.Tensor:
        obj = _huber(r, delta).sum(-1)
        return torch.where(torch.isfinite(obj), obj, torch.inf)

    grid = torch.tensor(_init_grid(form), dtype=torch.float64)
    with torch.no_grad():
        starts = grid[torch.argsort(objective(residuals(grid)[0]))[:REFINE]]
        theta, obj = _levenberg_marquardt(residuals, objective, starts, delta)
    best = int(torch.argmin(obj))
    if not math.isfinite(float(obj[best])):
        raise UsageError(f"scaling: the {form} fit did not converge from any start")
    fit = Fit(form, _from_theta(form, theta[best].tolist()), objective=float(obj[best]))
    return score(fit, n_arr, d_arr, l_arr)


def _levenberg_marquardt(
    residuals, objective, theta: torch.Tensor, delta: float, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the Huber sum from every row of `theta` at once.

    Each step solves the Gauss-Newton system of the residuals weighted by min(1, δ/|r|)
    (the iteratively reweighted least squares of an M-estimator), damped per start; a step
    is kept only where it lowers that start's Huber sum."""
    k, p = theta.shape
    r, jac = residuals(theta)
    obj = objective(r)
    lam = torch.full((k,), 1e-3, dtype=theta.dtype)
    eye = torch.eye(p, dtype=theta.dtype)
    for _ in range(iters):
        w = (delta / r.abs().clamp_min(1e-300)).clamp(max=1.0)
        jw = jac * w[..., None]
        h = jw.transpose(1, 2) @ jac
        g = (jw * r[..., None]).sum(1)
        damp = lam[:, None, None] * (
            torch.diag_embed(torch.diagonal(h, dim1=1, dim2=2)) + 1e-9 * eye
        )
        step = torch.linalg.solve(h + damp, -g[..., None])[..., 0]
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        new = theta + step
        r_new, jac_new = residuals(new)
        obj_new = objective(r_new)
        ok = obj_new < obj
        gain = torch.where(ok, (obj - obj_new) / obj.clamp_min(1e-300), torch.zeros_like(obj))
        theta = torch.where(ok[:, None], new, theta)
        r = torch.where(ok[:, None], r_new, r)
        jac = torch.where(ok[:, None, None], jac_new, jac)
        obj = torch.where(ok, obj_new, obj)
        lam = torch.where(ok, lam / 3, lam * 4).clamp(1e-12, 1e12)
        done = (ok & (gain < 1e-12)) | (~ok & (lam >= 1e10)) | (obj == 0)
        if bool(done.all()):
            break
    return theta, obj


def score(fit: Fit, n: Any, d: Any, loss: Any) -> Fit:
    """`fit` with its goodness of fit on the points (RMSE, max relative error, R²)."""
    n_arr, d_arr, l_arr = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    pred = np.asarray(predict(fit, n_arr, d_arr), dtype=float).ravel()
    res = pred - l_arr
    ss_tot = float(((l_arr - l_arr.mean()) ** 2).sum())
    fit.points = len(l_arr)
    fit.rmse = float(np.sqrt((res**2).mean()))
    fit.max_abs_rel_error = float(np.abs(res / l_arr).max())
    fit.r2 = 1.0 - float((res**2).sum()) / ss_tot if ss_tot > 0 else None
    fit.residuals = [round(float(x), 6) for x in res]
    return fit


# --- compute-optimal allocation -------------------------------------------------------


def _check_exponents(fit: Fit) -> None:
    keys = ("alpha", "beta") if fit.form == "chinchilla" else ("alpha_N", "alpha_D")
    if fit.form not in FORMS:
        raise UsageError(f"scaling: unknown form {fit.form!r} (known: {', '.join(FORMS)})")
    for k in keys:
        if not fit.params[k] > 0:
            raise UsageError(
                f"scaling ({fit.form}): exponent {k} = {fit.params[k]:.4g} is not positive, so "
                "the loss does not fall with scale and there is no compute-optimal size"
            )


def optimal_closed_form(fit: Fit, flops: float) -> float:
    """N_opt for a budget of `flops` (C = 6·N·D), from the law's closed form."""
    _check_exponents(fit)
    p = fit.params
    if fit.form == "chinchilla":
        a, b = p["alpha"], p["beta"]
        g = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
        return g * (flops / 6) ** (b / (a + b))
    k = p["alpha_N"] / p["alpha_D"]
    # ((N_c)^k is out of float range for large N_c: take logs)
    ln = math.log(k) + k * math.log(p["N_c"]) + math.log(flops / 6) - math.log(p["D_c"])
    return math.exp(ln / (k + 1))


def optimal_numeric(fit: Fit, flops: float, iters: int = 200) -> float:
    """N_opt minimising L(N, C/(6N)) by golden-section search on log N over [1, C/6]."""
    _check_exponents(fit)

    def f(x: float) -> float:
        n = math.exp(x)
        return float(predict(fit, n, flops / (6 * n)))

    lo, hi = 0.0, math.log(flops / 6)
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = f(x2)
    return math.exp((lo + hi) / 2)


def compute_optimal(fit: Fit | None, flops: float, method: str = "closed") -> dict[str, Any]:
    """The compute-optimal model for `flops` (C = 6·N·D): N, D, tokens per parameter and the
    loss the law predicts there. Without a fit, Hoffmann et al.'s published constants."""
    fit = fit or HOFFMANN
    if not (isinstance(flops, int | float) and math.isfinite(flops) and flops > 6):
        raise UsageError(f"scaling: the FLOP budget must be a finite number > 6, got {flops!r}")
    if method not in ("closed", "numeric"):
        raise UsageError(f"scaling: method {method!r} (known: closed, numeric)")
    n = optimal_closed_form(fit, flops) if method == "closed" else optimal_numeric(fit, flops)
    d = flops / (6 * n)
    return {
        "flops": flops,
        "form": fit.form,
        "source": fit.source,
        "method": method,
        "n_opt": n,
        "d_opt": d,
        "tokens_per_parameter": d / n,
        "loss": float(predict(fit, n, d)),
    }


def frontier(fit: Fit, flops: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, loss) along the compute-optimal frontier, for plotting."""
    rows = [compute_optimal(fit, float(c)) for c in np.asarray(flops, dtype=float).ravel()]
    return np.array([r["n_opt"] for r in rows]), np.array([r["loss"] for r in rows])

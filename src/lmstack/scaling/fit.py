"""Fitting scaling laws to (N parameters, D tokens, L loss) points.

Two families of laws:

- Hoffmann et al. 2022 (Chinchilla), approach 3: L(N, D) = E + A / N^α + B / D^β, fitted by
  minimising the Huber loss (δ = 1e-3) of log-space residuals,
  log L̂ − log L with log L̂ = LSE(a − α log N, b − β log D, e) (A = eᵃ, B = eᵇ, E = eᵉ), with
  L-BFGS. The objective has many shallow local minima, so Hoffmann et al. started L-BFGS from
  every point of a grid; we score the whole grid in one vectorised pass and run L-BFGS (torch's,
  in float64) from the best starts, which finds the same optimum at a fraction of the cost.
  Under a budget C ≈ 6·N·D the law gives the compute-optimal allocation in closed form:
  N*(C) = G·(C/6)^a, D*(C) = (C/6)^b / G with a = β/(α+β), b = α/(α+β), G = (αA / βB)^(1/(α+β)).
- Kaplan et al. 2020: single-variable power laws L(X) = (X_c / X)^α_X for X = N, D, C, fitted by
  least squares in log space on each variable's frontier (the lowest loss reached at each N, at
  each D, and the runs that beat every cheaper run).

Bootstrap intervals refit on runs resampled with replacement.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmstack.errors import InputError

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid (appendix D.2): 5 × 5 × 5 × 6 × 6 = 4500 starts.
_GRID = dict(
    a=np.arange(0, 26, 5.0),
    b=np.arange(0, 26, 5.0),
    e=np.arange(-1, 1.01, 0.5),
    alpha=np.arange(0, 2.01, 0.5),
    beta=np.arange(0, 2.01, 0.5),
)
_ORDER = ("a", "b", "e", "alpha", "beta")
MIN_RUNS = 6  # five parameters need more runs than that to say anything


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """Exponent of N*(C) ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D*(C) ∝ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, compute):
        """(N*, D*) minimising L(N, D) subject to 6·N·D = compute."""
        c6 = np.asarray(compute, float) / 6
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * c6**self.a
        return n, c6 / n

    def to_dict(self) -> dict:
        return {**asdict(self), "a": self.a, "b": self.b}


# Hoffmann et al. 2022's published fit (their equation 10), for checks and comparisons.
HOFFMANN = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclass(frozen=True)
class PowerLaw:
    """L(X) = (X_c / X)^alpha, Kaplan et al.'s form."""

    x_c: float
    alpha: float

    def __call__(self, x):
        return (self.x_c / np.asarray(x, float)) ** self.alpha


def check_points(n, d, loss, names=None, minimum: int = MIN_RUNS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float arrays of the points (a loss of None reads as NaN), or an InputError saying what is
    wrong and how to fix it; `names` label the runs in that message."""
    n, d, loss = (np.asarray(v, float).ravel() for v in (n, d, loss))
    if not len(n) == len(d) == len(loss):
        raise InputError(f"N, D and loss have different lengths ({len(n)}, {len(d)}, {len(loss)})")
    bad = np.flatnonzero(~(np.isfinite(loss) & (loss > 0)))
    if len(bad):
        which = [names[i] for i in bad[:5]] if names is not None else bad[:5].tolist()
        raise InputError(
            f"{len(bad)} run(s) have a NaN, missing or non-positive loss ({', '.join(map(str, which))}); "
            "drop them or rerun them (lower the learning rate if they diverged)"
        )
    if np.any(~np.isfinite(n) | (n <= 0) | ~np.isfinite(d) | (d <= 0)):
        raise InputError("every run needs a positive parameter count N and token count D")
    if len(n) < minimum:
        raise InputError(
            f"{len(n)} run(s) are too few to fit a scaling law: need at least {minimum}; sweep more model sizes and token budgets"
        )
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise InputError("the runs need at least two different model sizes and two different token counts; widen the sweep grid")
    return n, d, loss


# --- Chinchilla, approach 3 ------------------------------------------------------------------


def _grid_objective(starts: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """Mean Huber loss of every start (rows of a, b, e, alpha, beta) at once."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))])
    r = np.logaddexp.reduce(terms, axis=0) - log_l
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return huber.mean(axis=1)


def _lbfgs(start: np.ndarray, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    ln, ld, ll = (torch.as_tensor(v, dtype=torch.float64) for v in (log_n, log_d, log_l))
    opt = torch.optim.LBFGS(
        [x], lr=1, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-13, history_size=20, line_search_fn="strong_wolfe"
    )

    def value():
        a, b, e, alpha, beta = x
        pred = torch.logsumexp(torch.stack([a - alpha * ln, b - beta * ld, e.expand_as(ln)]), dim=0)
        # Divided by delta so values and gradients are O(residual), well above L-BFGS's tolerances.
        return torch.nn.functional.huber_loss(pred, ll, delta=delta) / delta

    def closure():
        opt.zero_grad()
        loss = value()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return x.detach().numpy().copy(), float(value())


def fit_chinchilla(n, d, loss, delta: float = HUBER_DELTA, starts: int = 16, init: ChinchillaLaw | None = None) -> ChinchillaLaw:
    """Hoffmann et al.'s approach 3: the best L-BFGS optimum over the `starts` best grid points
    (plus `init`, e.g. a previous fit, if given)."""
    n, d, loss = check_points(n, d, loss)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = np.array(list(itertools.product(*(_GRID[k] for k in _ORDER))))
    scores = _grid_objective(grid, log_n, log_d, log_l, delta)
    candidates = list(grid[np.argsort(scores)[:starts]])
    if init is not None:
        candidates.append(np.array([math.log(init.A), math.log(init.B), math.log(init.E), init.alpha, init.beta]))
    best, best_value = None, math.inf
    for start in candidates:
        x, value = _lbfgs(start, log_n, log_d, log_l, delta)
        if np.all(np.isfinite(x)) and x[:3].max() < 700 and value < best_value:  # exp(700) still fits a float
            best, best_value = x, value
    if best is None:
        raise InputError("the scaling-law fit did not converge from any start; check that the losses fall with N and D")
    a, b, e, alpha, beta = best
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


# --- Kaplan, single-variable power laws --------------------------------------------------------


def fit_power_law(x, y) -> PowerLaw:
    """Least squares on log y = alpha·log x_c − alpha·log x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 2:
        raise InputError("a power law needs points at two or more different values; widen the sweep grid")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    alpha = -slope
    return PowerLaw(x_c=float(math.exp(intercept / alpha)) if alpha else math.inf, alpha=float(alpha))


def _lowest_per_value(x, loss):
    """For each distinct x, the lowest loss reached there."""
    values = np.unique(x)
    return values, np.array([loss[x == v].min() for v in values])


def compute_frontier(compute, loss) -> np.ndarray:
    """Indices of the runs that reach a lower loss than every run using less compute, by compute."""
    order = np.argsort(compute, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep)


def fit_kaplan(n, d, loss) -> dict[str, PowerLaw]:
    """L(N) from the best loss at each N, L(D) from the best at each D, L(C) on the compute frontier."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    c = 6 * n * d
    front = compute_frontier(c, loss)
    return {
        "N": fit_power_law(*_lowest_per_value(n, loss)),
        "D": fit_power_law(*_lowest_per_value(d, loss)),
        "C": fit_power_law(c[front], loss[front]),
    }


# --- everything at once, with bootstrap intervals --------------------------------------------


@dataclass
class ScalingFit:
    law: ChinchillaLaw
    kaplan: dict[str, PowerLaw]
    intervals: dict[str, tuple[float, float]]  # name -> (low, high), empty without bootstrap
    n_runs: int

    def to_dict(self) -> dict:
        return {
            "n_runs": self.n_runs,
            "chinchilla": self.law.to_dict(),
            "kaplan": {k: asdict(v) for k, v in self.kaplan.items()},
            "intervals": {k: list(v) for k, v in self.intervals.items()},
        }


def _summary(law: ChinchillaLaw, kaplan: dict[str, PowerLaw]) -> dict[str, float]:
    return {**law.to_dict(), **{f"alpha_{k}": v.alpha for k, v in kaplan.items()}}


def fit(n, d, loss, names=None, bootstrap: int = 0, confidence: float = 0.95, seed: int = 0, progress=None) -> ScalingFit:
    """Both laws, and with `bootstrap` > 0 percentile intervals from that many resamples.

    A resample without two distinct N and D is drawn again; each refit starts from the full fit
    (a nearby optimum) and from the resample's best grid point (in case the full fit sits on a
    flat ridge, e.g. E -> 0, that the resample would leave), two L-BFGS runs per resample.
    """
    n, d, loss = check_points(n, d, loss, names)
    law, kaplan = fit_chinchilla(n, d, loss), fit_kaplan(n, d, loss)
    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in progress(range(bootstrap)) if progress else range(bootstrap):
            while True:
                idx = rng.integers(0, len(n), len(n))
                if len(np.unique(n[idx])) >= 2 and len(np.unique(d[idx])) >= 2:
                    break
            bn, bd, bl = n[idx], d[idx], loss[idx]
            samples.append(_summary(fit_chinchilla(bn, bd, bl, starts=1, init=law), fit_kaplan(bn, bd, bl)))
        tail = (1 - confidence) / 2 * 100
        for key in samples[0]:
            values = np.array([s[key] for s in samples])
            intervals[key] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return ScalingFit(law=law, kaplan=kaplan, intervals=intervals, n_runs=len(n))

"""Scaling-law fits: Hoffmann et al.'s approach 3 recovers a known law, the compute-optimal
allocation really is optimal, Kaplan power laws, bootstrap intervals, and bad input."""

import math

import numpy as np
import pytest

from lmstack.errors import InputError
from lmstack.scaling.fit import HOFFMANN, ChinchillaLaw, compute_frontier, fit, fit_chinchilla, fit_kaplan, fit_power_law

PARAMS = ("E", "A", "B", "alpha", "beta")


def hoffmann_points(k: int, noise: float, seed: int, n_range=(5, 11), d_range=(6, 13)):
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(*n_range, k), np.logspace(*d_range, k)))
    rng = np.random.default_rng(seed)
    return n, d, HOFFMANN.loss(n, d) * (1 + noise * rng.standard_normal(n.shape))


def test_recovers_hoffmann_law_from_points_with_one_percent_noise():
    # 576 runs spanning six decades of N and seven of D; seeds 0-9 all land within 2.5% of each
    # parameter (A and B are the loosest: they trade off against the exponents).
    n, d, loss = hoffmann_points(24, noise=0.01, seed=0)
    law = fit_chinchilla(n, d, loss)
    for name in PARAMS:
        assert getattr(law, name) == pytest.approx(getattr(HOFFMANN, name), rel=0.05), name


def test_noise_free_points_are_recovered_almost_exactly():
    n, d, loss = hoffmann_points(6, noise=0.0, seed=0)
    law = fit_chinchilla(n, d, loss)
    for name in PARAMS:
        assert getattr(law, name) == pytest.approx(getattr(HOFFMANN, name), rel=1e-3), name


def test_compute_optimal_allocation_minimises_the_law_along_an_isoflop():
    law = ChinchillaLaw(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.4)
    for compute in (1e18, 1e21, 1e24):
        n_opt, d_opt = law.optimal(compute)
        assert 6 * n_opt * d_opt == pytest.approx(compute)
        sizes = np.geomspace(n_opt / 100, n_opt * 100, 20001)
        brute = sizes[np.argmin(law.loss(sizes, compute / (6 * sizes)))]
        assert n_opt == pytest.approx(brute, rel=2e-3)
    assert law.a == pytest.approx(0.4 / 0.7) and law.a + law.b == pytest.approx(1.0)
    # Slopes of N* and D* in log-log are the exponents a and b.
    (n1, d1), (n2, d2) = law.optimal(1e20), law.optimal(1e22)
    assert math.log(n2 / n1) / math.log(100) == pytest.approx(law.a)
    assert math.log(d2 / d1) / math.log(100) == pytest.approx(law.b)


def test_power_law_fit_is_exact_on_a_power_law():
    x = np.geomspace(1e5, 1e9, 7)
    p = fit_power_law(x, (8.8e13 / x) ** 0.076)
    assert p.alpha == pytest.approx(0.076) and p.x_c == pytest.approx(8.8e13, rel=1e-6)
    assert p(1e7) == pytest.approx((8.8e13 / 1e7) ** 0.076)


def test_kaplan_fits_use_each_variables_frontier():
    # Loss is a power law of N at the largest D, and worse at smaller D: L(N) must be fitted on
    # the best loss at each N, L(D) on the best at each D (here: the largest N).
    n, d = (v.ravel() for v in np.meshgrid(np.geomspace(1e5, 1e8, 4), np.geomspace(1e7, 1e10, 4)))
    loss = (1e12 / n) ** 0.08 * (1e10 / d) ** 0.05
    laws = fit_kaplan(n, d, loss)
    assert laws["N"].alpha == pytest.approx(0.08)
    assert laws["D"].alpha == pytest.approx(0.05)
    front = compute_frontier(6 * n * d, loss)
    c = 6 * n * d
    for i in range(len(n)):  # a run is on the frontier iff every cheaper-or-equal run is worse
        beaten = any(c[j] <= c[i] and loss[j] <= loss[i] and j != i for j in range(len(n)))
        assert (i in front) == (not beaten)


def test_bootstrap_intervals_bracket_the_estimate_and_the_true_exponents():
    n, d, loss = hoffmann_points(6, noise=0.01, seed=1, n_range=(6, 10), d_range=(7, 12))
    result = fit(n, d, loss, bootstrap=20, seed=0)
    for name in ("E", "alpha", "beta", "a", "b", "alpha_N", "alpha_D", "alpha_C"):
        lo, hi = result.intervals[name]
        assert lo < hi, name
    for name in PARAMS + ("a", "b"):
        lo, hi = result.intervals[name]
        assert lo <= getattr(result.law, name) <= hi, name
    for name in ("alpha", "beta", "a", "b"):  # what the allocation rests on
        lo, hi = result.intervals[name]
        assert lo <= getattr(HOFFMANN, name) <= hi, name
    assert fit(n, d, loss).intervals == {}


def test_too_few_runs_is_a_clear_error():
    n, d, loss = hoffmann_points(2, noise=0.0, seed=0)
    with pytest.raises(InputError, match="4 run.*too few.*at least 6"):
        fit(n, d, loss)


def test_nan_loss_names_the_run():
    n, d, loss = hoffmann_points(3, noise=0.0, seed=0)
    loss[4] = np.nan
    names = [f"run{i}" for i in range(len(n))]
    with pytest.raises(InputError, match="run4.*rerun"):
        fit(n, d, loss, names=names)


def test_one_model_size_cannot_separate_n_from_d():
    d = np.geomspace(1e6, 1e9, 8)
    with pytest.raises(InputError, match="two different model sizes"):
        fit(np.full(8, 1e6), d, HOFFMANN.loss(1e6, d))

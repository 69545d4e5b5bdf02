"""Scaling-law figures (PNG): loss against compute with the fitted frontier, IsoFLOP curves, and
the fit's residuals. matplotlib is imported here only (the `plot` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmstack.errors import InputError
from lmstack.io import atomic_path
from lmstack.scaling.fit import ChinchillaLaw, PowerLaw


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'lmstack[plot]' (or pip install matplotlib)") from None
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def write_plots(law: ChinchillaLaw, kaplan: dict[str, PowerLaw], n, d, loss, held_out, out_dir: str | os.PathLike) -> list[Path]:
    """loss_vs_compute.png, isoflops.png and residuals.png in `out_dir`; held-out runs (a boolean
    mask) are drawn hollow, since the fit never saw them."""
    plt = _pyplot()
    out = Path(out_dir)
    n, d, loss, held = (np.asarray(v) for v in (n, d, loss, held_out))
    c = 6 * n * d
    fitted = ~held
    span = np.geomspace(c.min() / 3, c.max() * 30, 200)
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = ax.scatter(c[fitted], loss[fitted], c=np.log10(n[fitted]), cmap="viridis", label="runs (fitted)")
    if held.any():
        ax.scatter(c[held], loss[held], facecolors="none", edgecolors="red", s=60, label="runs (held out)")
    ax.plot(span, law.loss(*law.optimal(span)), "k-", label="compute-optimal frontier (Hoffmann fit)")
    ax.plot(span, kaplan["C"](span), "k--", lw=1, label=f"Kaplan L(C), alpha_C = {kaplan['C'].alpha:.3f}")
    fig.colorbar(points, ax=ax, label="log10 N")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C = 6ND (FLOPs)",
        ylabel="validation loss (nats/token)",
        title="Loss against compute",
    )
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_compute.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for budget in np.geomspace(c.min(), c.max(), 4):
        n_opt, _ = law.optimal(budget)
        sizes = np.geomspace(n_opt / 30, n_opt * 30, 200)
        (line,) = ax.plot(sizes, law.loss(sizes, budget / (6 * sizes)), label=f"C = {budget:.2g}")
        ax.plot([n_opt], [law.loss(n_opt, budget / (6 * n_opt))], "o", color=line.get_color())
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="fitted loss at fixed compute",
        title="IsoFLOP curves of the fit (dots: N*(C))",
    )
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "isoflops.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    residual = np.log(loss) - np.log(law.loss(n, d))
    ax.axhline(0, color="k", lw=1)
    ax.scatter(c[fitted], residual[fitted], c=np.log10(n[fitted]), cmap="viridis", label="fitted")
    if held.any():
        ax.scatter(c[held], residual[held], facecolors="none", edgecolors="red", s=60, label="held out")
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="log L - log L_fit", title="Fit residuals")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "residuals.png"))
    plt.close(fig)
    return paths

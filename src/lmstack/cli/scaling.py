"""`lmstack scaling`: sweep model sizes × token budgets, fit scaling laws, plan a compute budget.

lmstack scaling sweep --config scaling_shakespeare_char
lmstack scaling fit runs/scaling-shakespeare-char --hold-out 1 --plots plots/
lmstack scaling fit runs.jsonl --predict 1e6 5e6 --compute 1e15 1e18 --bootstrap 200 --out fit.json
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lmstack.cli import add_group
from lmstack.errors import InputError


def register(sub) -> None:
    group = add_group(
        sub,
        "scaling",
        help="scaling laws: sweeps of GPT sizes x token budgets, Chinchilla/Kaplan fits, compute-optimal model size",
    )
    p = group.add_parser(
        "sweep",
        help="train a grid of GPT sizes x token budgets and tabulate N, D, C and validation loss",
        description="Train every (model, token budget) pair of a sweep config. The config is an `lmstack train` TOML "
        "(shared settings) plus [sweep] models = [preset names or {n_layer=.., n_embd=.., n_head=..} tables] and "
        "tokens = [budgets]. Each run gets OUT_DIR/NAME; OUT_DIR/runs.jsonl and runs.csv get one row per finished "
        "run. Rerunning the command skips recorded runs and resumes an interrupted one.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help=f"sweep TOML file, or the name of a shipped one ({', '.join(sorted(shipped_sweeps()))})",
    )
    p.add_argument("--out-dir", metavar="DIR", help="root of the sweep (default: the config's out_dir)")
    p.set_defaults(func=cmd_sweep)

    p = group.add_parser(
        "fit",
        help="fit L(N, D) = E + A/N^alpha + B/D^beta and Kaplan power laws to sweep results",
        description="Fit Hoffmann et al.'s parametric law (approach 3: Huber loss on log residuals, L-BFGS from a grid "
        "of starts) and Kaplan et al.'s L(N), L(D), L(C) power laws to finished runs, print the compute-optimal "
        "N*(C), D*(C) and tokens per parameter, and predict losses.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS",
        help="runs.jsonl / runs.csv tables, sweep directories or `lmstack train` run directories",
    )
    p.add_argument(
        "--params",
        choices=("total", "non_embedding"),
        default="total",
        help="which parameter count is N: all of them (Hoffmann et al.) or without embeddings and "
        "head (Kaplan et al.) (default: total)",
    )
    p.add_argument(
        "--hold-out",
        type=int,
        default=0,
        metavar="K",
        help="leave out the K runs with the most compute, fit the rest, and report how well the fit predicts them (default: 0)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=100, metavar="B", help="resamples for the confidence intervals; 0 = none (default: 100)"
    )
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default: 0.95)")
    p.add_argument(
        "--compute",
        type=float,
        nargs="+",
        metavar="FLOPS",
        help="budgets to allocate (default: the sweep's largest compute and 10x, 100x, 1000x it)",
    )
    p.add_argument(
        "--predict",
        type=float,
        nargs=2,
        action="append",
        metavar=("N", "D"),
        help="print the fitted loss of N parameters trained on D tokens (repeatable)",
    )
    p.add_argument("--out", metavar="FILE.json", help="write the fit, intervals and predictions as JSON")
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="write loss-vs-compute, IsoFLOP and residual PNGs here (needs matplotlib: pip install 'lmstack[plot]')",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.set_defaults(func=cmd_fit)


def shipped_sweeps() -> dict[str, Path]:
    """Name -> path of the sweep configs shipped in lmstack/configs (files named scaling_*.toml)."""
    root = resources.files("lmstack") / "configs"
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir() if e.name.startswith("scaling_") and e.name.endswith(".toml")}


def _sweep_config(name: str) -> Path:
    if Path(name).exists():
        return Path(name)
    shipped = shipped_sweeps()
    if name in shipped:
        return shipped[name]
    raise InputError(f"--config {name}: no such file, and not a shipped sweep config ({', '.join(sorted(shipped))})")


def cmd_sweep(args) -> int:
    from lmstack.scaling.sweep import CSV_FILE, RUNS_FILE, run_sweep

    root, rows = run_sweep(_sweep_config(args.config), args.out_dir)
    print(f"{len(rows)} runs in {root / RUNS_FILE} and {root / CSV_FILE}")
    for r in rows:
        loss = "—" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"  {r['name']:<24} N {r['n_params']:>12,}  D {r['tokens']:>14,}  C {r['compute']:.3g}  val loss {loss}")
    print(f"fit them with: lmstack scaling fit {root}")
    return 0


def _held_out(compute, k: int):
    """Boolean mask of the k runs with the most compute."""
    import numpy as np

    if k < 0 or k >= len(compute):
        raise InputError(f"--hold-out {k}: must be between 0 and the number of runs - 1 ({len(compute) - 1})")
    mask = np.zeros(len(compute), bool)
    if k:
        mask[np.argsort(compute)[-k:]] = True
    return mask


def _interval(fit, key: str, fmt: str) -> str:
    if key not in fit.intervals:
        return ""
    lo, hi = fit.intervals[key]
    return f"  [{lo:{fmt}}, {hi:{fmt}}]"


def cmd_fit(args) -> int:
    import numpy as np

    from lmstack.io import write_json
    from lmstack.progress import progress
    from lmstack.scaling.fit import fit
    from lmstack.scaling.sweep import load_runs

    if not 0 < args.confidence < 1:
        raise InputError(f"--confidence {args.confidence}: must be between 0 and 1 (e.g. 0.95)")
    rows = load_runs(args.runs)
    key = "n_params" if args.params == "total" else "n_params_non_embedding"
    if any(r.get(key) is None for r in rows):
        raise InputError(f"some runs have no {key}; use --params total")
    names = [r.get("name", str(i)) for i, r in enumerate(rows)]
    n = np.array([r[key] for r in rows], float)
    d = np.array([r["tokens"] for r in rows], float)
    loss = np.array([np.nan if r["val_loss"] is None else r["val_loss"] for r in rows], float)
    held = _held_out(6 * n * d, args.hold_out)
    keep = ~held
    result = fit(
        n[keep],
        d[keep],
        loss[keep],
        names=[x for x, k in zip(names, keep) if k],
        bootstrap=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
        progress=lambda it: progress(it, desc="bootstrap", unit="fit"),
    )
    law = result.law
    pct = f"{args.confidence:.0%}"
    print(
        f"fit on {result.n_runs} runs (N = {args.params.replace('_', '-')} parameters, D = training tokens)"
        + (f", {int(held.sum())} held out" if held.any() else "")
        + (f"; [{pct} bootstrap intervals over {args.bootstrap} resamples]" if args.bootstrap else "")
    )
    print("Hoffmann et al. (approach 3): L(N, D) = E + A / N^alpha + B / D^beta")
    for name, fmt in (("E", ".4g"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".4f"), ("beta", ".4f")):
        print(f"  {name:<6} {getattr(law, name):{fmt}}{_interval(result, name, fmt)}")
    print("Kaplan et al.: L(X) = (X_c / X)^alpha_X")
    for x, p in result.kaplan.items():
        print(f"  L({x}): alpha_{x} {p.alpha:.4f}{_interval(result, 'alpha_' + x, '.4f')}  {x}_c {p.x_c:.4g}")
    print(
        f"compute-optimal allocation under C = 6 N D: N* ~ C^{law.a:.3f}{_interval(result, 'a', '.3f')}, "
        f"D* ~ C^{law.b:.3f}{_interval(result, 'b', '.3f')}"
    )
    budgets = args.compute or [float(np.max(6 * n * d)) * 10.0**k for k in range(4)]
    n_opt, d_opt = law.optimal(budgets)
    print(f"  {'C (FLOPs)':>10}  {'N*':>10}  {'D*':>10}  {'D*/N*':>8}  {'loss':>7}")
    allocation = []
    for c, no, do in zip(budgets, n_opt, d_opt):
        allocation.append(
            {"compute": c, "n": float(no), "d": float(do), "tokens_per_param": float(do / no), "loss": float(law.loss(no, do))}
        )
        print(f"  {c:>10.3g}  {no:>10.4g}  {do:>10.4g}  {do / no:>8.3g}  {float(law.loss(no, do)):>7.4f}")
    predictions = [{"n": pn, "d": pd, "loss": float(law.loss(pn, pd))} for pn, pd in args.predict or []]
    for p in predictions:
        print(f"predicted loss of N = {p['n']:.4g} on D = {p['d']:.4g} tokens: {p['loss']:.4f}")
    held_rows = []
    for i in np.flatnonzero(held):
        predicted = float(law.loss(n[i], d[i]))
        error = (predicted - loss[i]) / loss[i]
        held_rows.append({"name": names[i], "n": n[i], "d": d[i], "val_loss": loss[i], "predicted": predicted, "error": error})
        print(
            f"held out {names[i]}: N {n[i]:.4g}, D {d[i]:.4g}: val loss {loss[i]:.4f}, predicted {predicted:.4f} ({error:+.2%})"
        )
    if args.out:
        write_json(
            args.out,
            {
                **result.to_dict(),
                "params": args.params,
                "allocation": allocation,
                "predictions": predictions,
                "held_out": held_rows,
            },
        )
    if args.plots:
        from lmstack.scaling.plots import write_plots

        paths = write_plots(law, result.kaplan, n, d, loss, held, args.plots)
        print("plots: " + ", ".join(map(str, paths)))
    return 0

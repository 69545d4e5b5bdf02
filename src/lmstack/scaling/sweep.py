"""Scaling sweeps: train a grid of GPT sizes × token budgets and tabulate the results.

A sweep config is a training config (any `lmstack train` field, shared by every run) plus a
`[sweep]` table:

    [sweep]
    models = ["d1", {n_layer = 2, n_embd = 96, n_head = 4}]   # presets or [model] overrides
    tokens = [2e5, 5e5, 1e6]                                  # training tokens per run

Each run lives in OUT_DIR/NAME (e.g. L2-E96-H4-T1M) and trains for ceil(tokens / tokens-per-step)
steps, the learning-rate schedule stretched to its length (Hoffmann et al.: a cosine longer than
the run overestimates its loss). Every run shares one seed, one tokenization (OUT_DIR/data) and therefore
the same validation windows, so their losses are comparable.

The table OUT_DIR/runs.jsonl (and runs.csv beside it) gets one row per finished run: total and
non-embedding parameters N, tokens D, compute 6·N·D (total N) and the final validation loss. The
sweep is resumable: rows already in the table are skipped, and an interrupted run continues from
its last checkpoint. A run directory trained with other settings than the config now asks for is
refused rather than reused, so an edited config never mixes two recipes in one table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import atomic_write, check_readable, read_json, read_text

RUNS_FILE = "runs.jsonl"
CSV_FILE = "runs.csv"
COLUMNS = (
    "name",
    "family",
    "n_layer",
    "n_embd",
    "n_head",
    "n_params",
    "n_params_non_embedding",
    "tokens",
    "compute",
    "val_loss",
    "tokenizer",
    "run_dir",
)


@dataclass
class GridPoint:
    name: str
    preset: str
    model: dict
    tokens: float


def _label(model) -> str:
    if isinstance(model, str):
        return model
    short = {"n_layer": "L", "n_embd": "E", "n_head": "H"}
    return "-".join(f"{short.get(k, k)}{v}" for k, v in model.items())


def _tokens_label(tokens: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"


def read_sweep_config(path: str | os.PathLike) -> tuple[dict, list[GridPoint]]:
    """The shared training settings and the grid of runs, checked."""
    p = check_readable(path)
    try:
        values = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid TOML ({e}); fix the file") from None
    sweep = values.pop("sweep", None)
    if not isinstance(sweep, dict) or not sweep.get("models") or not sweep.get("tokens"):
        raise InputError(
            f"{p}: needs a [sweep] table with `models` (presets or model tables) and `tokens` (token "
            "budgets); see `lmstack scaling sweep --help`"
        )
    unknown = sorted(set(sweep) - {"models", "tokens"})
    if unknown:
        raise InputError(f"{p}: unknown [sweep] fields {unknown}; known: models, tokens")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in sweep["tokens"]):
        raise InputError(f"{p}: [sweep] tokens must be positive numbers (e.g. tokens = [2e5, 1e6])")
    grid = []
    for model in sweep["models"]:
        if not isinstance(model, (str, dict)):
            raise InputError(f"{p}: each [sweep] models entry is a preset name or a table of model fields, got {model!r}")
        for tokens in sorted(sweep["tokens"]):
            grid.append(
                GridPoint(
                    name=f"{_label(model)}-T{_tokens_label(tokens)}",
                    preset=model if isinstance(model, str) else "",
                    model={} if isinstance(model, str) else dict(model),
                    tokens=float(tokens),
                )
            )
    return values, grid


def run_config(base: dict, point: GridPoint, root: Path):
    """The training config of one grid point."""
    from lmstack.training import config as config_mod

    values = {
        "eval_interval": 0,
        "ckpt_interval": 0,
        "keep_last": 1,
        **base,
        "out_dir": str(root / point.name),
        "data_dir": str(root / "data"),
        "family": "gpt",
        "objective": "clm",
    }
    if point.preset:
        values["preset"] = point.preset
    values["model"] = {**base.get("model", {}), **point.model}
    probe = config_mod.resolve(values)
    per_step = probe.tokens_per_step or probe.batch_size * probe.block_size
    values["max_steps"] = max(1, math.ceil(point.tokens / per_step))
    cfg = config_mod.resolve(values)
    if cfg.warmup_steps >= cfg.max_steps:
        raise InputError(
            f"run {point.name}: warmup_steps {cfg.warmup_steps} is not shorter than its {cfg.max_steps} "
            "steps; lower warmup_steps or raise the smallest token budget"
        )
    return cfg


# --- reading finished runs -------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike) -> dict | None:
    """The table row of a finished `lmstack train` run directory, or None while it is unfinished."""
    import torch

    from lmstack.models.checkpoint import TOKENIZER_FILE, config_from_dict, family_class, read_config
    from lmstack.tokenizers import load_tokenizer
    from lmstack.training import checkpoint
    from lmstack.training import config as config_mod

    run_dir = Path(run_dir)
    if not (run_dir / config_mod.CONFIG_FILE).exists():
        raise InputError(
            f"{run_dir}: no {config_mod.CONFIG_FILE}; pass lmstack training run directories, "
            f"sweep directories or {RUNS_FILE} / {CSV_FILE} tables"
        )
    cfg = config_mod.read_file(run_dir / config_mod.CONFIG_FILE)
    found = checkpoint.list_checkpoints(run_dir)
    state = read_json(found[-1] / checkpoint.STATE_FILE, "trainer state") if found else {}
    if not found or state.get("step") != cfg.get("max_steps", config_mod.TrainConfig.max_steps):
        return None
    model_cfg = read_config(found[-1])
    cls = family_class(model_cfg.pop("family"))
    config = config_from_dict(typing.get_type_hints(cls.__init__)["config"], model_cfg, str(found[-1]))
    with torch.device("meta"):  # counts parameters without allocating them
        model = cls(config)
    n = model.num_params()
    try:
        n_ne = model.num_params(non_embedding=True)
    except TypeError:  # families without an embedding/body split
        n_ne = None
    val_loss = state.get("val_loss")
    return {
        "name": run_dir.name,
        "family": model.family,
        "n_layer": model_cfg.get("n_layer"),
        "n_embd": model_cfg.get("n_embd"),
        "n_head": model_cfg.get("n_head"),
        "n_params": n,
        "n_params_non_embedding": n_ne,
        "tokens": state["tokens"],
        "compute": 6.0 * n * state["tokens"],
        "val_loss": val_loss,  # None if the run had no validation split
        "tokenizer": load_tokenizer(found[-1] / TOKENIZER_FILE).fingerprint(),
        "run_dir": str(run_dir),
    }


def write_table(rows: list[dict], root: Path) -> None:
    """runs.jsonl and runs.csv, each replaced atomically."""
    with atomic_write(root / RUNS_FILE) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with atomic_write(root / CSV_FILE) as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


NUMBER_COLUMNS = ("n_params", "n_params_non_embedding", "tokens", "compute", "val_loss")


_FIX = "fix that line, or rerun the sweep to rewrite the table"


def _read_table(path: Path) -> list[dict]:
    """The rows of a runs table (.jsonl or .csv), each checked to be a table with numbers where
    numbers belong; a missing, binary or non-UTF-8 file is an InputError like any text input. An
    empty table (a sweep that has finished no run yet) has no rows."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return []
    rows = []
    for where, row in _table_lines(path, read_text(path)):
        if not isinstance(row, dict):
            raise InputError(f"{where}: a run must be a JSON object of named columns, got {type(row).__name__}; {_FIX}")
        for k in NUMBER_COLUMNS:
            v = row.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InputError(f"{where}: {k} is {v!r}, not a number; {_FIX}")
        rows.append(row)
    return rows


def _table_lines(path: Path, text: str):
    """("FILE:LINE", row) pairs: JSONL lines decoded, CSV rows with their number cells parsed."""
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: _parse_cell(v) if k in NUMBER_COLUMNS else v for k, v in row.items()}
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not JSON ({e}); {_FIX}") from None


def _parse_cell(cell: str | None):
    """A CSV cell of a number column: a float, None when empty, the text itself when not a number."""
    if cell in (None, ""):
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def load_runs(paths: list[str | os.PathLike]) -> list[dict]:
    """Rows from runs tables (.jsonl / .csv), sweep directories and training run directories,
    checked to share one tokenizer (losses in nats per token of different vocabularies do not
    compare)."""
    rows = []
    for p in map(Path, paths):
        if p.is_dir() and (p / RUNS_FILE).exists():
            rows += _read_table(p / RUNS_FILE)
        elif p.is_dir():
            row = read_run(p)
            if row is None:
                raise InputError(f"{p}: the run has not finished; finish it with `lmstack train --resume {p}` or leave it out")
            rows.append(row)
        else:
            rows += _read_table(check_readable(p))
    if not rows:
        raise InputError(f"no runs in {', '.join(map(str, paths))}; run `lmstack scaling sweep` first")
    for r in rows:
        missing = [k for k in ("n_params", "tokens", "val_loss") if k not in r]
        if missing:
            raise InputError(f"run {r.get('name', '?')}: no {missing} in its row; is this a `lmstack scaling sweep` table?")
    tokenizers = sorted({str(r.get("tokenizer")) for r in rows})
    if len(tokenizers) > 1:
        raise InputError(
            f"the runs use {len(tokenizers)} different tokenizers ({', '.join(tokenizers)}): losses per "
            "token are not comparable across vocabularies; fit the runs of one tokenizer at a time"
        )
    return rows


def run_sweep(config_path: str | os.PathLike, out_dir: str | None = None) -> tuple[Path, list[dict]]:
    """Train every grid point whose row is not yet in the table; returns the root and the rows."""
    from lmstack.progress import progress
    from lmstack.training.checkpoint import list_checkpoints
    from lmstack.training.config import CONFIG_FILE, read_file
    from lmstack.training.pretrain import train

    base, grid = read_sweep_config(config_path)
    root = Path(out_dir or base.get("out_dir") or "runs/scaling")
    configs = [(point, run_config(base, point, root)) for point in grid]  # every config checked before training
    for _, cfg in configs:  # a changed config must not silently reuse runs trained with the old one
        saved_path = Path(cfg.out_dir) / CONFIG_FILE
        if saved_path.exists():
            saved, wanted = read_file(saved_path), cfg.to_dict()
            changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
            if changed:
                raise InputError(
                    f"{cfg.out_dir} was trained with other settings ({', '.join(changed)}); "
                    "sweep into another --out-dir, or delete that run to retrain it"
                )
    done = {r["name"]: r for r in _read_table(root / RUNS_FILE)} if (root / RUNS_FILE).exists() else {}
    for point, cfg in progress(configs, desc="sweep", unit="run"):
        if point.name in done:
            continue
        run_dir = Path(cfg.out_dir)
        row = read_run(run_dir) if (run_dir / CONFIG_FILE).exists() else None
        if row is None:
            train(cfg, resume=bool(list_checkpoints(run_dir)))
            row = read_run(run_dir)
            if row is None:  # training stopped early on SIGINT / SIGTERM, after a checkpoint
                raise KeyboardInterrupt
        done[point.name] = row
        write_table(list(done.values()), root)
    return root, [done[p.name] for p, _ in configs]

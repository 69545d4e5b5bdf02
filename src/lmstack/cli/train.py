"""`lmstack train`: pretrain a model from a TOML config, any field overridden by a flag.

lmstack train --config shakespeare-char.toml          # a shipped config, by name or path
lmstack train --config my.toml --max-steps 200 --model n_layer=4
lmstack train --resume runs/shakespeare-char --max-steps 8000
torchrun --nproc_per_node 8 -m lmstack.cli train --config gpt2-124m.toml
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from lmstack.errors import InputError


def shipped_configs(cls=None) -> dict[str, Path]:
    """Config name (file stem) -> path, for the shipped configs in lmstack/configs that are of
    config class `cls` (default: pretraining's; the folder also holds fine-tuning configs and
    scaling sweeps)."""
    from lmstack.training.config import TrainConfig, read_file

    found = {}
    for entry in (resources.files("lmstack") / "configs").iterdir():
        if entry.name.endswith(".toml"):
            try:
                read_file(Path(str(entry)), cls or TrainConfig)
            except InputError:
                continue
            found[Path(entry.name).stem] = Path(str(entry))
    return found


HELP = "pretrain a model (GPT, RNN, feed-forward, BERT, T5) on text files"


def register(sub) -> None:
    from lmstack.training.config import add_arguments

    names = ", ".join(sorted(shipped_configs()))
    p = sub.add_parser(
        "train",
        help=HELP,
        description="Pretrain a model. Settings come from the defaults, then --config, then flags. "
        "The run directory (--out-dir) gets the resolved config, tokenizer, token shards, metrics.jsonl "
        f"and checkpoints. Shipped configs: {names}.",
    )
    p.add_argument("--config", metavar="FILE", help=f"TOML file, or the name of a shipped config ({names})")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its saved config, with any flags given here on top)",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="tokenize the data into shards, then stop (run once before a multi-process job)",
    )
    add_arguments(p.add_argument_group("training config (each overrides the --config file)"))
    p.set_defaults(func=cmd_train)


def config_path(name: str, cls=None) -> Path:
    p = Path(name)
    if p.exists():
        return p
    shipped = shipped_configs(cls)
    if name in shipped:
        return shipped[name]
    raise InputError(f"--config {name}: no such file, and not a shipped config ({', '.join(sorted(shipped))})")


def resolve_config(args, cls=None):
    """The run's config: defaults, then --config (or the saved config of --resume RUN_DIR), then flags."""
    from lmstack.training import config as config_mod

    cls = cls or config_mod.TrainConfig
    if args.resume and args.config:
        raise InputError("give --config or --resume, not both (a resumed run keeps its saved config)")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / config_mod.CONFIG_FILE).exists():
            raise InputError(f"{run_dir}: no {config_mod.CONFIG_FILE}; is it an lmstack training run directory?")
        base = config_mod.read_file(run_dir / config_mod.CONFIG_FILE, cls)
        base["out_dir"] = str(run_dir)
    else:
        base = config_mod.read_file(config_path(args.config, cls), cls) if args.config else {}
    return config_mod.resolve(base, args, cls)


def prepare_only(cfg) -> int:
    """Tokenize the data into the run's shard directory; on failure remove what was made."""
    from lmstack.training.distributed import Dist
    from lmstack.training.pretrain import check, prepare_data
    from lmstack.training.run import NewEntries

    out = Path(cfg.out_dir)
    check(cfg, resume=False)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out}: is a file, not a directory; pick another --out-dir")
    created = NewEntries(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tok, train, val = prepare_data(cfg, out, Dist(), resume=False)
    except BaseException:
        created.remove(keep=[])
        raise
    print(
        f"prepared {train.num_tokens:,} train and {val.num_tokens:,} val tokens in {train.path} "
        f"(tokenizer: {tok.kind}, {tok.vocab_size} ids)"
    )
    return 0


def cmd_train(args) -> int:
    cfg = resolve_config(args)
    if args.prepare_only:
        return prepare_only(cfg)
    from lmstack.training.pretrain import train

    return finish(train(cfg, resume=bool(args.resume)), f"run dir {cfg.out_dir}")


def finish(last: dict, where: str, name: str = "") -> int:
    """Print a finished run's summary (its last loss and validation figures) and return the
    command's exit code: 130 / 143 when a signal stopped it (its last line said how to resume)."""
    from lmstack.training.run import exit_code

    if last and last.get("stopped") != "signal" and os.environ.get("RANK", "0") == "0":
        shown = [f"{k} {v:.4f}" for k, v in last.items() if (k == "loss" or k.startswith("val_")) and isinstance(v, float)]
        print(f"done: {name + ' ' if name else ''}step {last.get('step', 0)}, {', '.join(shown)}; {where}")
    return exit_code(last)

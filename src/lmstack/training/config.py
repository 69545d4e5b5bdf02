"""Training configurations: dataclasses filled from defaults, then a TOML file, then flags.

`RunConfig` holds what every recipe shares (the run, the optimizer and its schedule, logging,
checkpoints); each recipe extends it with its own fields (`TrainConfig` for pretraining,
`FinetuneConfig` in `training.finetune`, ...). Every field is a command-line flag (`block_size`
-> `--block-size`), generated from the dataclass so the two never drift apart. Settings that
belong to one objective or one technique nest in a table of their own (`[model]`, `[span]`,
`[lora]` in TOML; `--model n_layer=6`, `--span mean_span=3` on the command line), checked against
that table's dataclass. TOML has no null, so "unset" is written 0 or "" and documented per field.
The run directory keeps the resolved config as `train_config.json`, which `--resume` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import check_readable, read_json, write_json

CONFIG_FILE = "train_config.json"


def _field(default, help: str):
    """A field with its --help text; an empty list or dict default gets a fresh one per config."""
    if isinstance(default, (list, dict)):
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """What every training recipe shares."""

    # --- run
    out_dir: str = _field("runs/lmstack", "run directory: config, metrics, checkpoints")
    seed: int = _field(1337, "seeds initialisation, batches and dropout")
    device: str = _field("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = _field(
        "auto", "autocast dtype: auto (bfloat16 on GPUs that have it, else float32) | float32 | bfloat16 | float16"
    )
    compile: bool = _field(False, "torch.compile the model")
    # --- batch
    batch_size: int = _field(16, "sequences per micro-batch on each process: lower it on out-of-memory")
    max_steps: int = _field(1000, "optimizer steps to train for")
    max_minutes: float = _field(
        0.0,
        "wall-clock budget, setup included: the first steps are timed, then max_steps is "
        "lowered to the steps that fit, so the schedule still decays to min_lr in time; 0 = none",
    )
    # --- optimizer and schedule
    lr: float = _field(1e-3, "peak learning rate")
    min_lr: float = _field(1e-4, "learning rate at the end of the schedule")
    schedule: str = _field("cosine", "cosine | wsd (warmup-stable-decay) | constant")
    warmup_steps: int = _field(100, "")
    decay_steps: int = _field(0, "the schedule's length in steps; 0 = max_steps")
    wsd_decay_fraction: float = _field(0.2, "wsd: last fraction of the schedule spent decaying linearly to min_lr")
    weight_decay: float = _field(0.1, "applied to matrices and embeddings, never to biases and norms")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this; 0 = off")
    skip_nonfinite: bool = _field(False, "on a NaN/inf loss skip the step instead of stopping")
    # --- evaluation and logging
    eval_interval: int = _field(200, "validate every N steps (and at the end); 0 = only at the end")
    eval_batches: int = _field(20, "validation batches per evaluation")
    tensorboard: bool = _field(False, "also write TensorBoard events to OUT_DIR/tb (needs the tensorboard package)")
    peak_flops: float = _field(0.0, "device peak FLOP/s for MFU; 0 = look up known GPUs, else MFU is null")
    # --- checkpoints
    ckpt_interval: int = _field(500, "save every N steps (and at the end); 0 = only at the end")
    keep_last: int = _field(2, "checkpoints kept besides the best one")
    # --- distributed (under torchrun)
    parallel: str = _field("ddp", "ddp | fsdp (FSDP2 fully_shard)")

    def __post_init__(self):
        for ok, message in self.checks():
            if not ok:
                raise InputError(f"invalid training config: {message}")

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message) pairs; a recipe's config adds its own."""
        return [
            (self.schedule in ("cosine", "wsd", "constant"), "schedule must be cosine, wsd or constant"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto, float32, bfloat16 or float16"),
            (self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp"),
            (self.batch_size > 0 and self.max_steps > 0, "batch_size and max_steps must be positive"),
            (self.max_minutes >= 0, "max_minutes must be >= 0 (0 = no time limit)"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup_steps >= 0 and self.decay_steps >= 0, "warmup_steps and decay_steps must be >= 0"),
            (0 < self.wsd_decay_fraction <= 1, "wsd_decay_fraction must be in (0, 1]"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """Pretraining (`lmstack train`)."""

    out_dir: str = _field("runs/lmstack", "run directory: config, tokenizer, token shards, metrics, checkpoints")
    # --- data
    data: list[str] = _field([], "text files, directories, JSONL files, or a prepared shard directory")
    text_field: str = _field("text", "JSONL: the field holding each document")
    val_fraction: float = _field(0.1, "last fraction of the corpus (by bytes) kept for validation")
    data_dir: str = _field("", 'where shards go; "" = OUT_DIR/data')
    tokenizer: str = _field("char", "a tokenizer directory or .json, or a kind (char, word, bpe, unigram) to train on the data")
    vocab_size: int = _field(0, "when training a tokenizer; 0 = the kind's default")
    # --- model
    family: str = _field("gpt", "gpt | rnn | ffn | bert | t5")
    preset: str = _field("", 'a named size of the family (e.g. tiny, gpt2-124m, zaremba-medium); "" = the config defaults')
    model: dict = _field({}, "overrides of the family's config fields")
    # --- objective (each objective's own settings are a table: [mlm], [span], [rtd])
    objective: str = _field("clm", "clm | mlm | nsp | span | rtd")
    block_size: int = _field(256, "tokens per training sequence")
    mlm: dict = _field({}, "mlm / nsp / rtd: probability (fraction of tokens chosen for prediction, 0.15)")
    span: dict = _field({}, "span corruption: noise_density (0.15), mean_span (3.0)")
    rtd: dict = _field(
        {},
        "ELECTRA: weight (of the discriminator loss, 50.0), generator (a table of overrides "
        "for the generator's config; default: a quarter of the width)",
    )
    tokens_per_step: int = _field(
        0, "tokens per optimizer step, all processes; reached by gradient accumulation. 0 = one micro-batch"
    )
    # --- samples while training
    sample_interval: int = _field(0, "print a sample every N steps (clm only); 0 = never")
    sample_tokens: int = _field(200, "length of each sample")

    def __post_init__(self):
        super().__post_init__()
        from lmstack.training.objectives import objective_options

        objective_options(self)  # each objective's table against its dataclass

    def checks(self) -> list[tuple[bool, str]]:
        from lmstack.training.objectives import FAMILIES

        return super().checks() + [
            (self.objective in FAMILIES, f"objective must be one of {', '.join(FAMILIES)}"),
            (self.block_size > 0, "block_size must be positive"),
            (self.tokens_per_step >= 0, "tokens_per_step must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
        ]


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[str]": list, "dict": dict}
# Fields that older lmstack versions kept at the top level, and the table they moved to.
_MOVED = {
    "mlm_probability": ("mlm", "probability"),
    "noise_density": ("span", "noise_density"),
    "mean_span": ("span", "mean_span"),
    "rtd_weight": ("rtd", "weight"),
    "generator": ("rtd", "generator"),
}


def fields(cls: type[RunConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _parse_value(text: str):
    """A flag value as TOML would read it (6 -> int, 1e-3 -> float, true -> bool, {a=1} -> table),
    else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _key_values(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{flag} takes KEY=VALUE (e.g. {flag} n_layer=6), got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def table(cls, values: dict, name: str):
    """A config table (`[lora]`, `[span]`, ...) as its dataclass, naming unknown keys and bad values."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"[{name}] / --{name.replace('_', '-')}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"[{name}] / --{name.replace('_', '-')}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type[RunConfig] = TrainConfig) -> None:
    """One flag per field. Defaults are left unset (None) so that only flags the user gave
    override the TOML file; the help shows the dataclass default."""
    defaults = cls()
    for name, f in fields(cls).items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        comment = f"{f.metadata.get('help', '')} (default: {default!r})".strip()
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=comment)
        elif f.type == "list[str]":
            parser.add_argument(flag, nargs="+", default=None, metavar="PATH", help=comment)
        elif f.type == "dict":
            parser.add_argument(
                flag,
                action="append",
                default=None,
                metavar="KEY=VALUE",
                help=f"{f.metadata.get('help', '')} (repeatable; the [{name}] table of a TOML file)",
            )
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=typ, default=None, metavar=name.upper(), help=comment)


def read_file(path: str | os.PathLike, cls: type[RunConfig] = TrainConfig) -> dict:
    """A TOML config file, or a run's saved train_config.json, as a dict of known fields."""
    p = check_readable(path)
    if p.suffix == ".json":
        values = read_json(p, "training config")
    else:
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: not valid TOML ({e}); fix the file") from None
    if not isinstance(values, dict):
        raise InputError(f"{p}: a training config must be a table of fields, not {type(values).__name__}")
    known = fields(cls)
    for old, (new, key) in _MOVED.items():
        if old in values and old not in known and new in known:
            values.setdefault(new, {})[key] = values.pop(old)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{p}: unknown config fields {unknown}; see the command's --help for the fields")
    return values


def resolve(base: dict, args: argparse.Namespace | None = None, cls: type[RunConfig] = TrainConfig) -> RunConfig:
    """`base` (from a file) with the flags given in `args` on top."""
    known = fields(cls)
    values = dict(base)
    for name, f in known.items():
        given = getattr(args, name, None) if args is not None else None
        if given is None:
            continue
        if f.type == "dict":
            values[name] = {**values.get(name, {}), **_key_values(given, "--" + name.replace("_", "-"))}
        else:
            values[name] = given
    for name, value in values.items():
        expected = _TYPES[known[name].type]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise InputError(f"config field {name!r} must be {known[name].type}, got {value!r}")
    if isinstance(values.get("data"), list) and not all(isinstance(d, str) for d in values["data"]):
        raise InputError("config field 'data' must be a list of paths")
    return cls(**values)


def save(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    write_json(path, cfg.to_dict())
    return path

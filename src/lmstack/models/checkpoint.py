"""Checkpoint directories: `config.json` (family + sizes), `model.safetensors`, `tokenizer.json`,
and `checksums.json` (the sha256 of each of those files).

No pickle anywhere: loading a checkpoint reads JSON and raw tensors and never runs code.
Every write is atomic (temp file, fsync, rename). A crash cannot half-write a file, but a disk or
a copy can still flip or drop bytes that safetensors would load without complaint; so loading the
weights first checks every file listed in checksums.json (hashing costs about what reading the
file does), and `lmstack verify DIR` checks a directory on demand. Directories saved before
checksums existed have no checksums.json and load as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from lmstack.errors import CheckpointError, InputError
from lmstack.io import atomic_path, read_json, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUMS_FILE = "checksums.json"

# family name -> "module:Class"; imported on demand so loading one family never imports all.
FAMILIES: dict[str, str] = {
    "ngram": "lmstack.models.ngram:NGramLM",
    "ffn": "lmstack.models.feedforward:FeedForwardLM",
    "rnn": "lmstack.models.rnn:RNNLM",
    "birnn": "lmstack.models.rnn:BiRNNEncoder",
    "gpt": "lmstack.models.gpt:GPT",
    "bert": "lmstack.models.bert:BERT",
    "t5": "lmstack.models.t5:T5",
}


def family_class(family: str):
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r} in {CONFIG_FILE}; known: {sorted(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def config_from_dict(cls, d: dict, source: str = CONFIG_FILE):
    """Build config dataclass `cls` from a dict, rejecting unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown {cls.__name__} fields {unknown}; was it written by a newer lmstack?")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid {cls.__name__}: {e}") from None


def read_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory (expected a folder with {CONFIG_FILE})")
    if not (p / CONFIG_FILE).exists():
        steps = sorted((p / "checkpoints").glob("step_*/" + CONFIG_FILE))
        if steps:  # a training run's folder: its checkpoints are inside
            newest = steps[-1].parent
            raise CheckpointError(f"{p} is a training run, not a checkpoint; pass one of its checkpoints, e.g. {newest}")
        raise CheckpointError(f"{p}: missing {CONFIG_FILE}; is this an lmstack checkpoint? (`lmstack convert` imports HF ones)")
    cfg = read_json(p / CONFIG_FILE, "checkpoint config")
    if not isinstance(cfg, dict):  # valid JSON, but `null`, a list or a number
        raise CheckpointError(
            f"{p / CONFIG_FILE}: must be a JSON object of model settings, got {type(cfg).__name__}; "
            "restore it from a copy, or retrain / reconvert the checkpoint"
        )
    if "family" not in cfg:
        if "model_type" in cfg:
            raise CheckpointError(
                f"{p}: a Hugging Face {cfg['model_type']!r} checkpoint, not an lmstack one; "
                f"import it with `lmstack convert {p} DST_DIR`"
            )
        raise CheckpointError(f"{p / CONFIG_FILE}: no 'family' field; is this an lmstack checkpoint?")
    return cfg


def read_family_config(path: str | os.PathLike, family: str, config_cls):
    """The config dataclass of a checkpoint that must be of `family` (else a clear error)."""
    cfg = read_config(path)
    if cfg["family"] != family:
        raise CheckpointError(
            f"{Path(path) / CONFIG_FILE}: family is {cfg['family']!r}, not {family!r}; "
            "load it with lmstack.models.load(), which picks the right family"
        )
    return config_from_dict(config_cls, {k: v for k, v in cfg.items() if k != "family"}, str(Path(path) / CONFIG_FILE))


class TorchCheckpoint:
    """`save` / `load` for a neural family: a class with `family`, a dataclass `config` and
    `config_class`, built as `cls(config)`."""

    family: str
    config_class: type

    def save(self, path: str | os.PathLike, tokenizer=None) -> Path:
        return save_torch_model(self, path, tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike):
        model = cls(read_family_config(path, cls.family, cls.config_class))
        load_torch_weights(model, path)
        return model.eval()


def save_torch_model(model, path: str | os.PathLike, tokenizer=None, extra: dict[str, Any] | None = None) -> Path:
    """Write a neural model (which has `.family` and a dataclass `.config`) as a checkpoint dir."""
    return write_model_dir(path, model.family, model.config, model.state_dict(), tokenizer, extra)


def write_model_dir(
    path: str | os.PathLike, family: str, config, tensors: dict, tokenizer=None, extra: dict[str, Any] | None = None
) -> Path:
    """The one checkpoint writer: config.json, model.safetensors (tied weights stored once) and
    tokenizer.json, each written atomically. Training checkpoints add their own files beside."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    write_weights(tensors, p / WEIGHTS_FILE)
    write_json(p / CONFIG_FILE, {"family": family, **dataclasses.asdict(config), **(extra or {})})
    if tokenizer is not None:
        tokenizer.save(p / TOKENIZER_FILE)
    write_checksums(p, [WEIGHTS_FILE, CONFIG_FILE] + ([TOKENIZER_FILE] if tokenizer is not None else []))
    return p


def write_weights(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors refuses tensors that share memory (tied weights): keep the first name of
    each; loading restores the aliases."""
    from safetensors.torch import save_file

    seen, unique = set(), {}
    for k, v in tensors.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr not in seen:
            seen.add(ptr)
            unique[k] = v.detach().contiguous()
    with atomic_path(path) as tmp:
        save_file(unique, str(tmp))


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(path: str | os.PathLike, names: list[str]) -> None:
    """checksums.json: the sha256 of each named file of directory `path`."""
    p = Path(path)
    write_json(p / CHECKSUMS_FILE, {"sha256": {name: file_sha256(p / name) for name in sorted(names)}})


def verify_checksums(path: str | os.PathLike) -> list[str]:
    """Check each file listed in checksums.json against its sha256; returns the names checked
    (none for a directory saved before checksums existed). Raises CheckpointError naming the
    first file that is missing or differs."""
    p = Path(path)
    if not (p / CHECKSUMS_FILE).is_file():
        return []
    listed = read_json(p / CHECKSUMS_FILE, "checksum list")
    sums = listed.get("sha256") if isinstance(listed, dict) else None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{p / CHECKSUMS_FILE}: not a checksum list (no 'sha256' table); re-save the checkpoint")
    for name, expected in sums.items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(
                f"{f}: missing, but listed in {CHECKSUMS_FILE}; the checkpoint is incomplete: "
                "copy it again or use an earlier checkpoint"
            )
        if file_sha256(f) != expected:
            raise CheckpointError(
                f"{f}: corrupt: its sha256 differs from {CHECKSUMS_FILE} (bytes changed or lost since "
                "it was saved); copy it again or use an earlier checkpoint (if you edited it on purpose, "
                f"delete {CHECKSUMS_FILE})"
            )
    return sorted(sums)


def verify_dir(path: str | os.PathLike) -> list[str]:
    """Check a checkpoint directory without loading it: each file listed in checksums.json
    against its sha256, and each safetensors file's size against its header (which also finds a
    truncated file in a directory saved without checksums). Returns the names checksummed;
    raises CheckpointError naming the first damaged file."""
    names = verify_checksums(path)
    for f in sorted(Path(path).glob("*.safetensors")):
        why = _safetensors_damage(f)
        if why:
            raise CheckpointError(f"{f}: damaged: {why}; copy it again or use an earlier checkpoint")
    return names


def _safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file is damaged (an unreadable header, or a size other than the header
    says), or None. Reads the header only."""
    f = Path(path)
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < size else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file (its header is unreadable)"
    expected = 8 + n + max(ends, default=0)
    return None if size == expected else f"{size} bytes where its header needs {expected} (truncated or overwritten)"


def load_torch_weights(model, path: str | os.PathLike, verify: bool = True) -> None:
    """Load model.safetensors into `model`, naming missing / unexpected / mis-shaped tensors;
    first, unless the caller already did, check the directory's checksums."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / WEIGHTS_FILE
    if not f.exists():
        raise CheckpointError(f"{Path(path)}: missing {WEIGHTS_FILE}")
    if verify:
        verify_checksums(path)
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: corrupt weights file ({e}); re-save or re-download the checkpoint") from None
    assign_weights(model, tensors, str(f))


def assign_weights(model, tensors: dict, source: str) -> None:
    """Copy named tensors into `model`, first naming any missing / unexpected / mis-shaped one
    (`source` says where they came from: a checkpoint file, an imported HF directory)."""
    expected = model.state_dict()
    # Tied weights are stored once; any alias of a stored tensor counts as present.
    aliases = _aliases(model)
    missing = [k for k in expected if k not in tensors and not any(a in tensors for a in aliases.get(k, ()))]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
            "the weights belong to a different model configuration"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)} but the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def _aliases(model) -> dict[str, list[str]]:
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k: [o for o in ks if o != k] for ks in by_ptr.values() for k in ks}


def load(path: str | os.PathLike):
    """Load any lmstack checkpoint directory (or ARPA file, or LoRA adapter directory: its base
    with the adapter attached) -> (model, tokenizer or None)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from lmstack.models.lora import load_adapter_dir

        return load_adapter_dir(p)
    if p.is_file() and p.suffix.lower() == ".arpa":
        cls = family_class("ngram")
        return cls.load(p), None
    cfg = read_config(p)
    cls = family_class(cfg["family"])
    model = cls.load(p)
    tokenizer = None
    if (p / TOKENIZER_FILE).exists():
        from lmstack.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(p / TOKENIZER_FILE)
    return model, tokenizer


def text_tokenizer(model, tokenizer, where: str = "this model"):
    """The tokenizer that turns text into `model`'s ids: a model with a vocabulary of its own
    brings it (a subword n-gram's tokenizer.json maps text to the tokenizer's ids, not the
    model's); otherwise `tokenizer`, which must exist."""
    if hasattr(model, "text_tokenizer"):
        return model.text_tokenizer()
    if tokenizer is None:
        raise InputError(
            f"{where}: no tokenizer.json, so text cannot be encoded; save the checkpoint with its "
            "tokenizer (or, in Python, pass tokenizer=)"
        )
    return tokenizer


def load_for_text(path: str | os.PathLike, device: str = "cpu"):
    """(model on `device`, its text tokenizer): what generation, scoring and evaluation read."""
    model, tokenizer = load(path)
    tokenizer = text_tokenizer(model, tokenizer, str(path))
    if hasattr(model, "to"):
        try:
            model.to(device)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"device {device!r} is not usable here ({e}); use cpu") from None
    return model, tokenizer

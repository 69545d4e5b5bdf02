"""Reading a local Hugging Face model directory (`config.json` + safetensors) for the importers.

Only safetensors are read: a `pytorch_model.bin` is a pickle, and loading one can run code.
Errors name the directory and the fix: a wrong `model_type`, a missing or corrupt weights file,
a missing tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmstack.errors import CheckpointError
from lmstack.io import read_json


def read_hf_dir(hf_dir: str | os.PathLike, model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of the safetensors weights) of a `model_type` model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json; pass a Hugging Face model directory (save_pretrained output)")
    cfg = read_json(p / "config.json", "Hugging Face config")
    if cfg.get("model_type") != model_type:
        raise CheckpointError(
            f"{p / 'config.json'}: model_type is {cfg.get('model_type')!r}, expected {model_type!r}; "
            "pick the importer for that architecture"
        )
    index = p / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(read_json(index, "safetensors index").get("weight_map", {}).values()))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = p / name
        if not f.exists():
            hint = (
                " (only pytorch_model.bin found: re-save with save_pretrained(safe_serialization=True))"
                if (p / "pytorch_model.bin").exists()
                else ""
            )
            raise CheckpointError(f"{f}: missing weights file{hint}")
        try:
            tensors |= load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt weights file ({e}); re-download or re-save it") from None
    return cfg, tensors


def take_tensors(tensors: dict[str, torch.Tensor], names: list[str], source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors, or a CheckpointError listing the missing ones."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: weights are missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "the checkpoint is incomplete or of another architecture"
        )
    return {n: tensors[n] for n in names}

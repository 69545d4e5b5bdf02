"""Training checkpoints: everything needed to resume exactly, without pickle.

`RUN_DIR/checkpoints/step_0000100/` is a model checkpoint directory (`config.json`,
`model.safetensors`, `tokenizer.json`; `lmstack.models.load` reads it) plus:

- `optimizer.safetensors`: each parameter's optimizer tensors, named `state.<param>.<key>`
  (AdamW: step, exp_avg, exp_avg_sq), gathered to full tensors under FSDP;
- `objective.safetensors`: training-only modules (ELECTRA's generator and head), if any;
- `rng_<rank>.safetensors`: each process's torch (and CUDA) random state;
- `trainer_state.json`: step, tokens seen, validation loss, optimizer hyper-parameters, fp16
  loss scale. Its presence marks a complete checkpoint;
- `checksums.json`: the sha256 of every file above, so that damage done after the save (a
  truncated copy, flipped bits) is found before a resume trusts the files.

The data position is the step itself: batches are a pure function of (seed, step); see
`lmstack.data.batches`. A checkpoint is written to a hidden temp directory and renamed into
place, so an interrupted save never leaves a half-written checkpoint. After each save the
oldest are deleted, keeping the last `keep_last` and the one with the best validation loss.
Resuming takes the newest intact checkpoint (`resume_point`): a damaged newer one is set aside
as `checkpoints/damaged_step_N`, and the run goes on from the one before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lmstack.errors import CheckpointError, LmstackError
from lmstack.io import read_json, write_json
from lmstack.models.checkpoint import (
    CHECKSUMS_FILE,
    WEIGHTS_FILE,
    load_torch_weights,
    verify_dir,
    write_checksums,
    write_model_dir,
    write_weights,
)
from lmstack.models.lora import ADAPTER_WEIGHTS, is_adapter_dir, load_adapter_weights, save_adapter
from lmstack.training import distributed
from lmstack.training.distributed import Dist

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OBJECTIVE_FILE = "objective.safetensors"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists())


def latest(run_dir: str | os.PathLike) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under {CHECKPOINTS}/ to resume from")
    return found[-1]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(
    run_dir,
    step: int,
    wrapped: torch.nn.Module,
    objective: torch.nn.Module,
    optimizer,
    trainer_state: dict,
    tokenizer,
    d: Dist,
    device: torch.device,
    keep_last: int,
    adapter_base: str | None = None,
) -> Path:
    """Write checkpoint `step` (every rank must call this: FSDP gathers shards collectively). A
    model with LoRA adapters is written as a PEFT adapter directory naming `adapter_base`."""
    model_sd = get_model_state_dict(wrapped, options=_FULL)
    optim_sd = get_optimizer_state_dict(wrapped, optimizer, options=_FULL)
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(d)
    save_file(_rng_state(device), str(tmp / f"rng_{d.rank}.safetensors"))
    distributed.barrier(d)
    if d.main:
        model = objective.model
        if adapter_base is not None:
            save_adapter(model, tmp, adapter_base, tokenizer=tokenizer)
        else:
            weights = {k[6:]: v for k, v in model_sd.items() if k.startswith("model.")}
            write_model_dir(tmp, model.family, model.config, weights, tokenizer)
        extra = {k: v for k, v in model_sd.items() if not k.startswith("model.")}
        if extra:
            write_weights(extra, tmp / OBJECTIVE_FILE)
        optim_tensors = {f"state.{name}.{key}": t for name, st in optim_sd["state"].items() for key, t in st.items()}
        save_file({k: v.contiguous() for k, v in optim_tensors.items()}, str(tmp / OPTIMIZER_FILE))
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim_sd["param_groups"]]
        write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "world_size": d.world, "param_groups": groups})
        write_checksums(tmp, [f.name for f in tmp.iterdir() if f.is_file() and f.name != CHECKSUMS_FILE])
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(run_dir, keep_last)
    distributed.barrier(d)
    return final


def prune(run_dir, keep_last: int) -> None:
    """Delete all but the last `keep_last` checkpoints and the best one, and any temp directory
    an interrupted save left behind."""
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".step_*.tmp"):
        shutil.rmtree(stale)
    found = list_checkpoints(run_dir)
    scored = [(read_json(p / STATE_FILE).get("val_loss"), p) for p in found]
    scored = [(v, p) for v, p in scored if v is not None]
    keep = set(found[-keep_last:])
    if scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p in found:
        if p not in keep:
            shutil.rmtree(p)


def damage(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be resumed from, or None: a file missing, or corrupt (see
    `models.checkpoint.verify_dir`)."""
    try:
        state = read_state(ckpt)
        verify_dir(ckpt)
    except LmstackError as e:
        return str(e)
    weights = ADAPTER_WEIGHTS if is_adapter_dir(ckpt) else WEIGHTS_FILE
    ranks = state.get("world_size", 1) if isinstance(state, dict) else 1
    for name in (weights, OPTIMIZER_FILE, *(f"rng_{r}.safetensors" for r in range(ranks))):
        if not (ckpt / name).is_file():
            return f"{ckpt / name}: missing"
    return None


def resume_point(run_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint (None if there is none), and each newer one with why it is not."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = damage(ckpt)
        if why is None:
            return ckpt, damaged
        damaged.append((ckpt, why))
    return None, damaged


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the resume order (and out of pruning's count)."""
    aside = ckpt.with_name(f"damaged_{ckpt.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    return aside


def read_state(ckpt: Path) -> dict:
    return read_json(ckpt / STATE_FILE, "trainer state")


def load_weights(ckpt: Path, objective: torch.nn.Module) -> None:
    """Before wrapping: the model (and training-only modules) from `ckpt`; an adapter checkpoint
    into the adapters already attached to the base."""
    if is_adapter_dir(ckpt):
        load_adapter_weights(objective.model, ckpt)
    else:
        load_torch_weights(objective.model, ckpt, verify=False)  # resume_point verified the checkpoint
    if (ckpt / OBJECTIVE_FILE).exists():
        missing, unexpected = objective.load_state_dict(load_file(str(ckpt / OBJECTIVE_FILE)), strict=False)
        if unexpected or any(not k.startswith("model.") for k in missing):
            raise CheckpointError(f"{ckpt / OBJECTIVE_FILE}: does not match this objective's modules; was the objective changed?")


def load_optimizer(ckpt: Path, wrapped: torch.nn.Module, optimizer, state: dict) -> None:
    """After wrapping and building the optimizer: its state from `ckpt` (resharded under FSDP)."""
    tensors = load_file(str(ckpt / OPTIMIZER_FILE))
    per_param: dict[str, dict] = {}
    for k, v in tensors.items():
        name, key = k[len("state.") :].rsplit(".", 1)
        per_param.setdefault(name, {})[key] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]]
    set_optimizer_state_dict(
        wrapped, optimizer, {"state": per_param, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


def load_rng(ckpt: Path, d: Dist, device: torch.device) -> None:
    f = ckpt / f"rng_{d.rank}.safetensors"
    if not f.exists():
        f = ckpt / "rng_0.safetensors"  # resumed on more processes than saved: seed the rest alike
    state = load_file(str(f))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

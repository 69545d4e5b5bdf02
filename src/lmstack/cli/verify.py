"""`lmstack verify`: check checkpoints for damage without loading them.

    lmstack verify runs/gpt/checkpoints/step_0001000      # one checkpoint directory
    lmstack verify runs/gpt                               # every checkpoint of a training run

Each file listed in the directory's checksums.json is hashed and compared (loading the weights
does the same check on its own), and each safetensors file's size is checked against its header,
which also finds truncated files in checkpoints saved before checksums existed. A training
checkpoint must also hold what a resume needs (optimizer and random state).
"""

from __future__ import annotations

from pathlib import Path

from lmstack.errors import CheckpointError, InputError


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check checkpoint files against their checksums (flipped or lost bytes)",
        description="Check checkpoint directories for damage without loading them: every file listed in "
        "checksums.json against its sha256, every safetensors file against its header, and, for a training "
        "checkpoint, the files a resume needs. Exits 0 if all are intact, else names the damaged files.",
    )
    p.add_argument(
        "dirs", nargs="+", metavar="DIR", help="a checkpoint directory, or a training run directory (each of its checkpoints)"
    )
    p.set_defaults(func=cmd_verify)


def checkpoints_in(path: Path) -> list[Path]:
    """The checkpoint directories DIR names: itself, or a run's checkpoints."""
    from lmstack.models.checkpoint import CONFIG_FILE
    from lmstack.training import checkpoint

    if not path.is_dir():
        raise InputError(f"{path}: no such directory; pass a checkpoint or training run directory")
    if (path / checkpoint.CHECKPOINTS).is_dir():
        found = checkpoint.list_checkpoints(path)
        if not found:
            raise InputError(f"{path}: no complete checkpoint under {checkpoint.CHECKPOINTS}/ to verify")
        return found
    if not any((path / name).is_file() for name in (CONFIG_FILE, "adapter_config.json")):
        raise InputError(
            f"{path}: not a checkpoint directory (no {CONFIG_FILE}) nor a training run (no "
            f"{checkpoint.CHECKPOINTS}/); check the path"
        )
    return [path]


def cmd_verify(args) -> int:
    from lmstack.models.checkpoint import CHECKSUMS_FILE, verify_dir
    from lmstack.training import checkpoint

    damaged = []
    for ckpt in [c for d in args.dirs for c in checkpoints_in(Path(d))]:
        if (ckpt / checkpoint.STATE_FILE).exists():
            why = checkpoint.damage(ckpt)
        else:
            try:
                verify_dir(ckpt)
                why = None
            except CheckpointError as e:
                why = str(e)
        if why:
            damaged.append(why)
            continue
        summed = (ckpt / CHECKSUMS_FILE).exists()
        print(
            f"ok {ckpt}"
            + ("" if summed else f" (no {CHECKSUMS_FILE}: saved by an older lmstack, so only file sizes were checked)")
        )
    if damaged:
        raise CheckpointError(f"{len(damaged)} damaged checkpoint(s): {'; '.join(damaged)}")
    return 0

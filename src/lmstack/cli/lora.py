"""`lmstack lora merge|show`: LoRA adapter directories (Hugging Face PEFT's format)."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.cli import add_group
from lmstack.errors import InputError
from lmstack.io import check_output_dir, output_dir


def register(sub) -> None:
    group = add_group(
        sub,
        "lora",
        help="LoRA adapters: merge one into its base, show what one holds",
        description="LoRA adapter directories, in Hugging Face PEFT's format (adapter_config.json + "
        "adapter_model.safetensors). Every command that loads a checkpoint also takes an adapter "
        "directory: it loads the base the adapter names and attaches the adapter.",
    )
    p = group.add_parser(
        "merge",
        help="write base + adapter as one ordinary checkpoint",
        description="Load the adapter's base, fold the adapter into its weights and write an "
        "ordinary lmstack checkpoint (no adapter cost per token; tokenizer included).",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an --out that already holds a checkpoint")
    p.set_defaults(func=cmd_merge)
    p = group.add_parser("show", help="print an adapter's rank, alpha, targets, size and base")
    p.add_argument("adapter", metavar="DIR", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_show)


def _adapter_dir(path: str) -> Path:
    from lmstack.models.lora import is_adapter_dir

    p = Path(path)
    if not is_adapter_dir(p):
        raise InputError(f"{p}: not a LoRA adapter directory (no adapter_config.json); check the path")
    return p


def cmd_merge(args) -> int:
    from lmstack.models.lora import load_adapter_dir, merge_and_unload

    src, out = _adapter_dir(args.adapter), Path(args.out)
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: that is the adapter directory; pick another --out")
    if (out / "config.json").exists() and not args.force:
        raise InputError(f"{out}: already holds a checkpoint; pass --force to overwrite it or pick another --out")
    check_output_dir(out, "--out")
    model, tokenizer = load_adapter_dir(src)
    with output_dir(out, "--out") as d:
        merge_and_unload(model).save(d, tokenizer)
    print(f"wrote merged checkpoint to {out}")
    return 0


def cmd_show(args) -> int:
    from lmstack.models.lora import describe

    info = describe(_adapter_dir(args.adapter))
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    print(f"base:            {info['base']} ({info['family'] or 'PEFT adapter'})")
    print(f"r:               {info['r']}" + (f" (per module: {info['rank_pattern']})" if info["rank_pattern"] else ""))
    print(f"alpha:           {info['alpha']}" + (" (rsLoRA: scale alpha/sqrt(r))" if info["rslora"] else " (scale alpha/r)"))
    print(f"dropout:         {info['dropout']}")
    print(f"targets:         {', '.join(info['targets'] or [])}")
    if info["modules_to_save"]:
        print(f"modules_to_save: {', '.join(info['modules_to_save'])}")
    print(f"parameters:      {info['parameters']:,}")
    return 0

"""`lmstack finetune`: adapt a pretrained model — SFT on answers, a classifier head, or sentence
embeddings — with full weights or LoRA, from a TOML config with any field overridden by a flag.

    lmstack finetune --init-from runs/gpt/checkpoints/step_0001000 --data chats.jsonl --out-dir runs/sft
    lmstack finetune --config instruct --init-from BASE --lora r=16 --lora alpha=32 --lr 1e-3
    lmstack finetune --resume runs/sft --max-steps 600
"""

from __future__ import annotations

from lmstack.cli.train import finish, resolve_config, shipped_configs
from lmstack.io import check_output_dir

HELP = "fine-tune a pretrained model: SFT, classification or embeddings, full or LoRA"


def register(sub) -> None:
    from lmstack.training.config import add_arguments
    from lmstack.training.finetune import FinetuneConfig

    names = ", ".join(sorted(shipped_configs(FinetuneConfig))) or "none"
    p = sub.add_parser(
        "finetune",
        help=HELP,
        description="Fine-tune the model given by --init-from (an lmstack checkpoint, an adapter directory, or a "
        "Hugging Face directory). --task sft (default) maximises log P(answer | question) on JSONL conversations "
        "({prompt, response} or {messages}), the loss on the assistant's tokens only, or continues pretraining on "
        "plain text; --task classify trains a label head on {text, label} rows; --task embed trains sentence "
        "embeddings contrastively (SimCSE). --lora KEY=VALUE trains LoRA adapters (saved in PEFT's format) instead of "
        "every weight. Settings come from the defaults, then --config, then flags; the run directory (--out-dir) gets "
        f"the resolved config, metrics.jsonl and checkpoints. Shipped configs: {names}.",
    )
    p.add_argument("--config", metavar="FILE", help=f"TOML file, or the name of a shipped config ({names})")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its saved config, with any flags given here on top)",
    )
    add_arguments(p.add_argument_group("fine-tuning config (each overrides the --config file)"), FinetuneConfig)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from lmstack.training.finetune import FinetuneConfig, recipe

    cfg = resolve_config(args, FinetuneConfig)
    check_output_dir(cfg.out_dir, "--out-dir")  # before the base model is loaded
    last = recipe(cfg.task)(cfg, resume=bool(args.resume))
    return finish(last, f"checkpoint {last.get('checkpoint')}")

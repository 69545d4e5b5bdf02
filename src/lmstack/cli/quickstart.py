"""`lmstack quickstart`: one command, no data of your own, the whole story of language modelling."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train and compare four language models on a small corpus in ~10 minutes",
        description="Train a BPE tokenizer, a word 5-gram and a subword 5-gram (modified Kneser-Ney), an LSTM "
        "and a small GPT on a small corpus (Tiny Shakespeare, shipped with lmstack, unless --corpus is "
        "given); score them on the held-out last tenth of the lines in bits per byte; sample from every "
        "model; write checkpoints, report.md, results.json and curves.png to --out. The neural models "
        "train for a fixed number of steps, so the same command and seed give the same table on any machine.",
    )
    p.add_argument(
        "--corpus",
        metavar="FILE",
        default=None,
        help="a UTF-8 text file, one sentence or verse per line, any language (default: the shipped Tiny Shakespeare)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory: new, empty or an earlier quickstart's, replaced on success "
        "(default: runs/quickstart; runs/assistant with --assistant)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="with --assistant: 15 = the default steps of every stage, about 12 minutes on 2 cores; without: "
        "scales the training steps in proportion to MINUTES / 10 (10 = 600 LSTM and 6,500 GPT steps, sized for about "
        "ten minutes on a quiet 2-core CPU); the numbers depend on it, not on the machine's speed or load (default: 10)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda (default: auto)")
    p.add_argument("--prompt", default=None, help="text the samples continue (default: the first word of a held-out line)")
    p.add_argument(
        "--sentence",
        default=None,
        help="a sentence in the corpus's language to score against its words scrambled (default: a held-out line)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument(
        "--assistant",
        action="store_true",
        help="the second main job: pretrain a small GPT on a shipped mix, then SFT, DPO, GRPO on arithmetic, two "
        "persona cards (LoRA) and a served assistant, each stage measured, in ~12 minutes on 2 cores (--corpus "
        "replaces the mix's plain text); writes checkpoints, cards, report.md, results.json and curves.png",
    )
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    if args.assistant:
        from lmstack.assistant import DEFAULT_MINUTES
        from lmstack.assistant import run as assistant
        from lmstack.errors import InputError

        for flag, value in (("--prompt", args.prompt), ("--sentence", args.sentence)):
            if value is not None:
                raise InputError(f"{flag} is for the first quickstart; quickstart --assistant has no {flag}")
        minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
        assistant(out=args.out or "runs/assistant", minutes=minutes, device=args.device, seed=args.seed, corpus=args.corpus)
        return 0
    from lmstack.quickstart import run

    run(
        corpus=args.corpus,
        out=args.out or "runs/quickstart",
        minutes=10.0 if args.minutes is None else args.minutes,
        device=args.device,
        seed=args.seed,
        prompt=args.prompt,
        sentence=args.sentence,
    )
    return 0

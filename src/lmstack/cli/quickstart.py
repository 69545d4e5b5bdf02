"""`lmstack quickstart`: one command, no data of your own, the whole story of language modelling."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train and compare four language models on a small corpus in ~10 minutes",
        description="Train a BPE tokenizer, a word 5-gram and a subword 5-gram (modified Kneser-Ney), an LSTM "
        "and a small GPT on a small corpus (Tiny Shakespeare, shipped with lmstack, unless --corpus is "
        "given); score them on the held-out last tenth of the lines in bits per byte; sample from the "
        "best; write checkpoints, report.md, results.json and curves.png to --out.",
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
        default="runs/quickstart",
        help="output directory: new, empty or an earlier quickstart's, replaced on success (default: runs/quickstart)",
    )
    p.add_argument(
        "--minutes", type=float, default=10.0, help="wall-clock budget; the LSTM and the GPT get most of it (default: 10)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda (default: auto)")
    p.add_argument("--prompt", default=None, help="text the samples continue (default: the first word of a held-out line)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from lmstack.quickstart import run

    run(corpus=args.corpus, out=args.out, minutes=args.minutes, device=args.device, seed=args.seed, prompt=args.prompt)
    return 0

"""`lmstack ngram train|sample`: count-based n-gram models (modified Kneser-Ney, ARPA files)."""

from __future__ import annotations

import sys
import time

from lmstack.cli import add_group
from lmstack.errors import InputError


def register(sub) -> None:
    g = add_group(sub, "ngram", "train and sample n-gram language models (Kneser-Ney, ARPA files)")

    p = g.add_parser(
        "train",
        help="count n-grams over text files and smooth them",
        description="Train a back-off n-gram model as KenLM's lmplz does (interpolated modified "
        "Kneser-Ney by default). Writes DIR/model.arpa, DIR/config.json and, with --tokenizer, "
        "DIR/tokenizer.json.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one sentence per line")
    p.add_argument("--order", type=int, default=3, help="n-gram order, 1 or more (default: 3)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    p.add_argument(
        "--smoothing",
        choices=["modified_kneser_ney", "kneser_ney", "add_k"],
        default="modified_kneser_ney",
        help="interpolated modified Kneser-Ney with 3 discounts per order (lmplz's default), "
        "interpolated Kneser-Ney with one discount, or add-k (default: modified_kneser_ney)",
    )
    p.add_argument("--k", type=float, default=1.0, help="add_k: the pseudo-count (default: 1)")
    p.add_argument(
        "--discount-fallback",
        action="store_true",
        help="when Kneser-Ney discounts cannot be estimated (tiny corpora), use 0.5 1 1.5 as lmplz does",
    )
    p.add_argument(
        "--boundary",
        choices=["line", "file"],
        default="line",
        help="put <s> ... </s> around each line or around each whole file (default: line)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="an lmstack tokenizer: count its tokens instead of whitespace-separated words (a subword n-gram)",
    )
    p.set_defaults(func=cmd_train)

    p = g.add_parser(
        "sample", help="generate text from an n-gram model", description="Sample sentences from <s> until </s> or --max-tokens."
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory or an .arpa file")
    p.add_argument("--prompt", default="", help="text the sentences start with (default: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; above 1 flattens (default: 1)")
    p.add_argument("--max-tokens", type=int, default=50, help="most tokens per sample (default: 50)")
    p.add_argument("--num", type=int, default=1, help="number of samples (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_sample)


def cmd_train(args) -> int:
    from lmstack.io import check_output_dir, output_dir
    from lmstack.models.ngram import NGramLM

    check_output_dir(args.out, "--out")
    tokenizer = None
    if args.tokenizer:
        from lmstack.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    model = NGramLM.train(
        args.files,
        order=args.order,
        smoothing=args.smoothing,
        k=args.k,
        discount_fallback=args.discount_fallback,
        boundary=args.boundary,
        tokenizer=tokenizer,
    )
    seconds = time.perf_counter() - t0
    with output_dir(args.out, "--out") as out:
        model.save(out)
    sizes = " ".join(f"{n}-grams={len(t.keys)}" for n, t in enumerate(model.tables, 1))
    print(
        f"trained {args.order}-gram ({args.smoothing}) on {model.config.train_tokens} tokens in {seconds:.1f} s: "
        f"{sizes} -> {args.out}"
    )
    return 0


def cmd_sample(args) -> int:
    import lmstack

    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1 or args.num < 1:
        raise InputError("--max-tokens and --num must be at least 1")
    model, _ = lmstack.load(args.model)
    if getattr(model, "family", "") != "ngram":
        raise InputError(f"{args.model}: not an n-gram model; use the generation commands for neural models")
    from lmstack.generation import GenerationConfig, generate_tokens

    prompt = [model.bos_id, *model.encode(args.prompt)]
    configs = [
        GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed + i)
        for i in range(args.num)
    ]
    start = model.decode(prompt)  # without the words the model never saw, which it reads as <unk>
    for gen in generate_tokens(model, [prompt] * args.num, configs):
        ids = gen.tokens
        ids = ids[: ids.index(model.eos_id)] if model.eos_id in ids else ids  # a sentence ends at </s>
        text = model.decode(prompt + ids)
        # the prompt as given, then what was sampled after it
        sys.stdout.write((args.prompt + text[len(start) :] if text.startswith(start) else text) + "\n")
    return 0

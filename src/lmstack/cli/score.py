"""`lmstack score`: log p(continuation | prompt), token by token, with the likeliest alternatives."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="log-probability of a text or of a continuation given a prompt",
        description="Score CONTINUATION after PROMPT: the total log p(continuation | prompt) (natural log), its "
        "perplexity and each token's log-probability with the likeliest alternatives. Compare prompts, e.g. "
        "the same answer with and without a chain of thought. Without --continuation the prompt itself is "
        "scored from <|endoftext|>. An encoder-decoder (T5) reads the prompt as its source and scores the "
        "continuation as its target, so it needs --continuation.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the conditioning text")
    p.add_argument("--continuation", metavar="TEXT", help="the text to score after the prompt")
    p.add_argument("--top", type=int, default=5, help="alternatives to show per token (default: 5)")
    p.add_argument("--device", default="cpu", help="torch device for neural models (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from lmstack.errors import InputError
    from lmstack.evaluation.scoring import score_text
    from lmstack.models.checkpoint import load_for_text

    if args.top < 0:
        raise InputError(f"--top must be >= 0, got {args.top}")
    model, tokenizer = load_for_text(args.model, args.device)
    result = score_text(model, tokenizer, args.prompt, args.continuation, top=args.top)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    for t in result["tokens"]:
        alts = "  ".join(f"{a['piece']!r} {a['logprob']:.3f}" for a in t["top"])
        print(f"{t['piece']!r:>16} {t['logprob']:9.4f}   {alts}")
    print(f"logprob {result['logprob']:.4f} over {result['num_tokens']} tokens, perplexity {result['perplexity']:.3f}")
    return 0

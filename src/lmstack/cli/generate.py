"""`lmstack generate`: sample, decode greedily or beam-search from any checkpoint."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from lmstack.errors import InputError


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (sampling, greedy, beam search)",
        description="Continue one or more prompts with any model family. Sampling transforms apply in the "
        "order repetition penalty, frequency/presence penalties, temperature, top-k, top-p, min-p. "
        "--temperature 0 is greedy decoding; --beams N runs beam search instead of sampling.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="prompt text (repeat for a batch; default: read one prompt from standard input)",
    )
    p.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="UTF-8 file of prompts, one per line (empty lines skipped), decoded as one batch after any --prompt",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user's message: framed by the model's chat template, the reply ends at its "
        "end-of-turn token (a model fine-tuned on conversations)",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="with --chat: a system message before each prompt (default: a persona card's own, as the server uses; '' for none)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="most new tokens per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = flatter (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the likeliest (default: 0 = off)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="log p -> penalty x log p for tokens already seen (default: 1 = off)",
    )
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this per earlier use of a token")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this once a token has been used")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--beams", type=int, default=1, help="beam search with this many beams (default: 1 = off)")
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam score = log p / length^this (default: 1; 0 ranks by raw log-probability)",
    )
    p.add_argument("--num-return", type=int, default=1, help="beam search: how many of the best beams to print")
    p.add_argument("--device", default="cpu", help="torch device for neural models (default: cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="GPT only: decode through a static KV cache and a torch.compile'd step (CUDA graphs on a "
        "GPU); costs a one-off compile of tens of seconds, so it pays on long generations on a GPU",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is decoded")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from lmstack.generation import GenerationConfig, beam_search, generate, stream
    from lmstack.generation.beam import check_beam_settings
    from lmstack.generation.engine import encode_prompt
    from lmstack.models.base import input_major
    from lmstack.models.checkpoint import load_for_text
    from lmstack.serving.cards import CARD_FILE, read_card

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from lmstack.io import read_text

        prompts += [line for line in read_text(args.prompts_file).splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"{args.prompts_file}: no prompts in the file (one per line)")
    if not prompts:
        from lmstack.io import read_stdin

        prompts = [read_stdin()]
    check_beam_settings(args.beams, args.num_return, args.length_penalty)
    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0; got {args.max_tokens}")
    if "" in args.stop:
        raise InputError("--stop takes non-empty strings (an empty one would stop at once); drop it")
    if args.beams > 1 and (args.stream or args.stop):
        raise InputError("--beams cannot be combined with --stream or --stop; drop one of them")
    if args.stream and (args.json or len(prompts) > 1):
        raise InputError("--stream prints one prompt's text; use it without --json and with a single --prompt")
    config = GenerationConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        stop=tuple(args.stop),
        stop_at_eot=not args.ignore_eot,
        seed=args.seed,
    )
    model, tokenizer = load_for_text(args.model, args.device)
    input_major(model)
    if args.compile:
        if not hasattr(model, "compile_decoding"):
            raise InputError(f"--compile needs a GPT checkpoint; {model.family} models decode uncompiled, drop --compile")
        # Capacity in steps of 256 slots, so runs of similar lengths reuse torch.compile's on-disk cache.
        longest = max(len(encode_prompt(tokenizer, p)) for p in prompts) + args.max_tokens
        model.compile_decoding(capacity=min(-(-longest // 256) * 256, model.max_context))

    if args.chat and (args.stream or args.beams > 1):
        raise InputError("--chat decodes by sampling or greedily; drop --stream / --beams")
    if args.chat and args.system is None and (Path(args.model) / CARD_FILE).is_file():
        args.system = read_card(args.model).system or None  # a persona card starts from its system prompt, as served
    if args.stream:
        pieces = stream(model, tokenizer, prompts[0], config)
        first = next(pieces, "")  # the prompt is checked (its length, ...) before anything is printed
        sys.stdout.write(prompts[0])
        for piece in itertools.chain([first], pieces):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    if args.beams > 1:
        eos = None if args.ignore_eot else tokenizer.eot_id
        for prompt in prompts:
            beams = beam_search(
                model,
                encode_prompt(tokenizer, prompt),
                num_beams=args.beams,
                max_new_tokens=args.max_tokens,
                length_penalty=args.length_penalty,
                n=args.num_return,
                eos_id=eos,
            )
            found = [
                {
                    "text": tokenizer.decode(b.tokens),
                    "tokens": b.tokens,
                    "logprob": b.logprob,
                    "score": b.score,
                    "finished": b.finished,
                }
                for b in beams
            ]
            if args.json:
                print(json.dumps({"prompt": prompt, "beams": found}, ensure_ascii=False))
            else:
                for b in found:
                    print(f"[score {b['score']:.4f}] {prompt}{b['text']}")
        return 0

    outs = (
        chat(model, tokenizer, prompts, config, args.system)
        if args.chat
        else generate(model, tokenizer, prompts, config, show_progress=True)
    )
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": out.text,
                        "tokens": out.tokens,
                        "num_tokens": len(out.tokens),
                        "finish_reason": out.finish_reason,
                        "logprob": out.logprob,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(prompt + out.text)
    return 0


def chat(model, tokenizer, messages: list[str], config, system: str | None):
    """Replies to user `messages` in the tokenizer's chat format, each ending at its end of turn."""
    import dataclasses

    from lmstack.data.chat import prompt_ids, turn_end_id
    from lmstack.generation.engine import generate_tokens
    from lmstack.tokenizers.base import CHAT_ROLES

    if tokenizer.chat_template is None and not set(CHAT_ROLES) <= set(tokenizer.special_tokens):
        raise InputError(
            "this model's tokenizer has no chat format (no template, no role tokens); fine-tune it on "
            "conversations with `lmstack finetune` first, or drop --chat"
        )
    head = [{"role": "system", "content": system}] if system else []
    end = turn_end_id(tokenizer)
    if end is not None:
        config = dataclasses.replace(config, stop=(*config.stop, tokenizer.decode([end])))
    prompts = [prompt_ids(tokenizer, [*head, {"role": "user", "content": m}]) for m in messages]
    return generate_tokens(model, prompts, config, tokenizer, show_progress=True)

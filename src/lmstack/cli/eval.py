"""`lmstack eval`: perplexity and bits per byte of any model, side-by-side comparison, benchmark tasks."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.cli import add_group
from lmstack.errors import InputError
from lmstack.io import check_readable, iter_text_chunks

_MODES_HELP = (
    "lines: each line scored as <s> line </s>, as KenLM's `query` (the n-gram's default; T5's, each line a "
    "target from an empty source); "
    "stream: the files as one token stream, each followed by end-of-text, through a sliding window of "
    "--context tokens moved --stride at a time, every token scored once (default for neural models); "
    "pseudo: pseudo-perplexity of a masked LM, each token masked in turn (BERT's default and only mode)"
)


def register(sub) -> None:
    g = add_group(sub, "eval", "measure language models on text")
    p = g.add_parser(
        "perplexity",
        help="perplexity (per token and per word) and bits per byte on text files",
        description="Score text files under any model. Reports tokens, nats, perplexity per token, perplexity "
        "per word (words = whitespace-separated words plus one end-of-line per line, KenLM's count) and bits "
        "per byte, which compare models with different tokenizers. Modes: " + _MODES_HELP + ". In lines mode "
        "unknown words are scored as <unk> and reported as OOVs.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (each one a document)")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE", help="more text files (as in `eval compare`)")
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory or an .arpa file")
    _add_scoring_options(p)
    p.add_argument("--mode", choices=("lines", "stream", "pseudo"), help="how to score (default: by family, see above)")
    p.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="stream mode: window length in tokens (default: the model's context, or 1024 for RNNs)",
    )
    p.add_argument("--stride", type=int, metavar="S", help="stream mode: window step in tokens (default: context/2)")
    p.set_defaults(func=cmd_perplexity)

    c = g.add_parser(
        "compare",
        help="one table of several models on the same text (bits per byte, perplexity per word)",
        description="Score the same files under several models, each in its default mode ("
        + _MODES_HELP
        + "), and print one aligned table: bits per byte, perplexity per word, perplexity per token, tokens, "
        "tokens/s and parameters. Bits per byte and perplexity per word do not depend on the tokenizer, so an "
        "n-gram, an LSTM and a GPT line up.",
    )
    c.add_argument("--models", nargs="+", required=True, metavar="PATH", help="checkpoint directories or .arpa files")
    c.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to score")
    _add_scoring_options(c)
    c.set_defaults(func=cmd_compare)

    t = g.add_parser(
        "tasks",
        help="benchmark tasks from local JSONL: multiple choice or numeric exact match",
        description='mc: multiple choice by log-likelihood, lines {"question", "choices": [...], "answer": '
        "index}; reports acc (highest total log-probability) and acc_norm (highest per character). numeric: "
        "greedy few-shot generation scored by exact match of the extracted number (GSM8K's '#### N', else "
        '\'the answer is N\', else the last number), lines {"question", "answer"} as in gsm8k_test.jsonl '
        "or svamp.jsonl.",
    )
    t.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    t.add_argument("--kind", required=True, choices=("mc", "numeric"), help="task kind")
    t.add_argument("--file", required=True, metavar="F", help="JSONL file of items")
    t.add_argument("--shots-file", metavar="F", help="numeric: JSONL file to take few-shot examples from")
    t.add_argument("--shots", type=int, default=0, metavar="N", help="numeric: examples shown before each question (default: 0)")
    t.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items")
    t.add_argument("--max-tokens", type=int, default=256, metavar="N", help="numeric: most generated tokens (default: 256)")
    t.add_argument("--batch-size", type=int, default=8, metavar="N", help="numeric: prompts per batch (default: 8)")
    t.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    t.add_argument("--json", action="store_true", help="print one JSON object with every item's result")
    t.set_defaults(func=cmd_tasks)

    ct = g.add_parser(
        "cot",
        help="what reasoning buys: log P(A|Q) vs log P(A|Q,T), accuracy with and without reasoning",
        description="For each problem of --task (arithmetic: held-out generated problems; gsm8k, svamp: the shared files; "
        "or a JSONL file of {question, answer[, paraphrases]} rows): log P(A | Q) of the answer line 'Answer: N' right "
        "after the question, against log P(A | Q, T) after the model's own sampled reasoning T; the fraction of problems "
        "where T helps; greedy accuracy answering at once and with reasoning; how often a trace mixes languages; and "
        "prompt sensitivity, |log P(A | Q1) - log P(A | Q2)| over the paraphrases in the file.",
    )
    ct.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    ct.add_argument("--task", required=True, metavar="TASK", help="arithmetic | gsm8k | svamp | FILE.jsonl")
    ct.add_argument("--limit", type=int, default=200, metavar="N", help="problems to evaluate (default: 200)")
    ct.add_argument("--lang", choices=("en", "zh", "mix"), default="mix", help="arithmetic: language (default: mix)")
    ct.add_argument(
        "--level",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        metavar="K",
        help="arithmetic: steps per problem, one or more of 1 2 3 4 (default: all)",
    )
    ct.add_argument("--max-tokens", type=int, default=128, metavar="N", help="longest reasoning sampled (default: 128)")
    ct.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the traces (default: 1.0)")
    ct.add_argument("--seed", type=int, default=0, help="seeds the problems and the traces (default: 0)")
    ct.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ct.add_argument("--json", action="store_true", help="print one JSON object with every problem's result")
    ct.set_defaults(func=cmd_cot)

    h = g.add_parser(
        "harness",
        help="EleutherAI lm-evaluation-harness tasks on an lmstack checkpoint",
        description="Run lm-evaluation-harness tasks (its own, or YAML tasks of yours with --include-path) on any "
        "lmstack checkpoint through the adapter (model type `lmstack`): loglikelihood, loglikelihood_rolling "
        "and generate_until answered by lmstack's scoring and batched generation. Needs `pip install "
        "'lmstack[eval]'`; the harness fetches its datasets itself, so offline only local tasks run.",
    )
    h.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    h.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="task names, as lm-eval knows them")
    h.add_argument("--include-path", metavar="DIR", help="a folder of your own task YAML files")
    h.add_argument("--num-fewshot", type=int, metavar="N", help="examples per prompt (default: each task's own)")
    h.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items of each task")
    h.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests per model call (default: 8)")
    h.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    h.add_argument("--json", action="store_true", help="print the results as one JSON object")
    h.set_defaults(func=cmd_harness)


def _add_scoring_options(p) -> None:
    p.add_argument("--device", default="cpu", help="torch device for neural models (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-tokens", type=int, default=1 << 16, metavar="N", help="padded tokens per model call (default: 65536)")


def _check_files(files) -> list[Path]:
    """Fail on a missing, empty or non-UTF-8 file before any model is loaded."""
    paths = [check_readable(f) for f in files]
    for p in paths:
        next(iter_text_chunks(p))
    return paths


def _documents(paths):
    from lmstack.io import read_text

    return (read_text(p) for p in paths)


def cmd_perplexity(args) -> int:
    from lmstack.evaluation.perplexity import PROGRESS_UNITS, default_mode, measure
    from lmstack.models.checkpoint import load_for_text
    from lmstack.progress import progress

    if args.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be positive, got {args.batch_tokens}")
    if not args.files and not args.data:
        raise InputError("no text to score: give one or more FILEs (or --data FILE)")
    paths = _check_files(args.files + args.data)
    model, tokenizer = load_for_text(args.model, args.device)
    with progress(desc="scoring", unit=PROGRESS_UNITS.get(args.mode or default_mode(model), "it")) as bar:
        res = measure(
            model,
            tokenizer,
            _documents(paths),
            mode=args.mode,
            context=args.context,
            stride=args.stride,
            max_batch_tokens=args.batch_tokens,
            progress_bar=bar,
        )
    out = {"model": str(Path(args.model)), "family": model.family, "files": [str(p) for p in paths], **res.to_dict()}
    if args.json:
        print(json.dumps(out))
        return 0
    if res.mode == "pseudo":
        print(f"Pseudo-perplexity:\t{out['pseudo_perplexity']}")
        print(f"Tokens:\t{res.tokens}")
        print(f"Note:\t{out['note']}")
        return 0
    if res.mode == "lines":
        print(f"Perplexity including OOVs:\t{res.perplexity}")
        print(f"Perplexity excluding OOVs:\t{res.perplexity_excluding_oovs}")
        print(f"OOVs:\t{res.oovs}")
    else:
        print(f"Perplexity:\t{res.perplexity}")
        print(f"Window:\tcontext {res.context}, stride {res.stride}")
    print(f"Tokens:\t{res.tokens}")
    print(f"Perplexity per word:\t{res.perplexity_per_word}")
    print(f"Bits per byte:\t{res.bits_per_byte}")
    return 0


def cmd_compare(args) -> int:
    from lmstack.evaluation.compare import compare, format_table

    if args.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be positive, got {args.batch_tokens}")
    paths = _check_files(args.data)
    rows = compare(args.models, paths, max_batch_tokens=args.batch_tokens, device=args.device)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


def cmd_tasks(args) -> int:
    from lmstack.evaluation.tasks import run
    from lmstack.models.checkpoint import load_for_text

    check_readable(args.file)
    if args.shots < 0:
        raise InputError(f"--shots must be >= 0, got {args.shots}")
    if args.shots and not args.shots_file:
        raise InputError("--shots needs --shots-file to take the examples from (e.g. gsm8k_train.jsonl)")
    for name in ("max_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, tokenizer = load_for_text(args.model, args.device)
    res = run(
        args.kind,
        model,
        tokenizer,
        args.file,
        limit=args.limit,
        shots_path=args.shots_file,
        shots=args.shots,
        max_new_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps({"model": args.model, "kind": args.kind, "file": args.file, **res}, ensure_ascii=False))
    elif args.kind == "mc":
        print(f"acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  ({res['n']} items)")
    else:
        cut = f"; {res['truncated']} prompts kept only their end to fit the context" if res["truncated"] else ""
        print(f"exact_match {res['exact_match']:.4f}  ({res['n']} problems{cut})")
    return 0


def cmd_cot(args) -> int:
    from lmstack.evaluation.cot import chain_of_thought, load_task
    from lmstack.models.checkpoint import load_for_text

    for name in ("limit", "max_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise InputError(f"--temperature must be > 0 (the traces are sampled), got {args.temperature}")
    items = load_task(args.task, "test", args.limit, args.seed, args.lang, args.level)
    model, tokenizer = load_for_text(args.model, args.device)
    res = chain_of_thought(model, tokenizer, items, args.max_tokens, args.temperature, args.seed)
    if args.json:
        print(json.dumps({"model": args.model, "task": args.task, **res}, ensure_ascii=False))
        return 0
    for key, value in res.items():
        if key != "items":
            print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


def cmd_harness(args) -> int:
    _offline_unless_hub_reachable()  # before lm-eval (and the Hub client it imports) reads the setting
    from lmstack.evaluation.harness import LmstackLM  # noqa: I001 (first: without lm-eval, a one-line error)

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    for name in ("num_fewshot", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise InputError(f"{args.include_path}: no such folder of task YAML files")
    tasks = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in tasks.all_tasks]
    if unknown:
        raise InputError(
            f"lm-eval knows no task {unknown[0]!r}; see `lm_eval --tasks list`, or point "
            "--include-path at the folder of its YAML file"
        )
    lm = LmstackLM(path=args.model, batch_size=args.batch_size, device=args.device)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tasks
        )
    except OSError as e:  # the datasets library's ConnectionError, the Hub's offline errors
        raise InputError(
            f"the task's data could not be fetched ({e}); run it once where huggingface.co is "
            "reachable (the data is then cached), or point --include-path at local task files"
        ) from e
    if args.json:
        print(json.dumps({"model": args.model, "results": out["results"]}, ensure_ascii=False, default=str))
    else:
        print(make_table(out))
    return 0


def _offline_unless_hub_reachable(timeout: float = 3.0) -> None:
    """Without a network, tell the Hugging Face clients to stay offline: cached task data still
    loads, and missing data fails at once instead of after a retry loop of half a minute."""
    import os
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

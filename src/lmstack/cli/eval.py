"""`lmstack eval perplexity`: perplexity and bits per byte of any model on text files."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.cli import add_group
from lmstack.errors import InputError
from lmstack.io import check_readable, iter_text_chunks


def register(sub) -> None:
    g = add_group(sub, "eval", "measure language models on text")
    p = g.add_parser(
        "perplexity", help="perplexity (KenLM's counting) and bits per byte on text files",
        description="Score each line of the files as <s> line </s>. Tokens are the words (or subword "
        "tokens) plus one </s> per line; <s> is not counted, as in KenLM's `query`. Unknown words are "
        "scored as <unk> and reported as OOVs.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one sentence per line")
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory or an .arpa file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-tokens", type=int, default=1 << 16, metavar="N",
                   help="padded tokens per model call (default: 65536)")
    p.set_defaults(func=cmd_perplexity)


def text_codec(model, tokenizer) -> dict:
    """How text becomes the model's ids: the n-gram's own vocabulary, or the checkpoint's
    tokenizer with its end-of-text token as both sentence start and end."""
    # (BERT and T5 have an `encode` of their own, over ids; the vocabulary ids tell them apart)
    if all(hasattr(model, a) for a in ("encode", "bos_id", "eos_id", "unk_id")):
        return {"encode": model.encode, "bos": model.bos_id, "eos": model.eos_id, "unk": model.unk_id}
    if tokenizer is None or tokenizer.eot_id is None:
        raise InputError("this checkpoint has no tokenizer with an end-of-text token; save one with the model")
    return {"encode": tokenizer.encode, "bos": tokenizer.eot_id, "eos": tokenizer.eot_id, "unk": None}


def _lines(paths):
    """Lines split on \\n only, as KenLM splits them (str.splitlines would also break at form
    feeds, U+2028 and other separators inside a line)."""
    for p in paths:
        for chunk in iter_text_chunks(p):
            lines = chunk.split("\n")
            yield from lines[:-1] if chunk.endswith("\n") else lines


def cmd_perplexity(args) -> int:
    import lmstack
    from lmstack.evaluation.perplexity import perplexity
    from lmstack.progress import progress

    if args.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be positive, got {args.batch_tokens}")
    paths = [check_readable(f) for f in args.files]
    for p in paths:  # fail on a bad file before loading the model
        next(iter_text_chunks(p))
    model, tokenizer = lmstack.load(args.model)
    lines = _lines(paths)
    with progress(desc="scoring", unit="line") as bar:
        res = perplexity(model, lines, max_batch_tokens=args.batch_tokens, progress_bar=bar,
                         **text_codec(model, tokenizer))
    out = {"model": str(Path(args.model)), "files": [str(p) for p in paths], **res.to_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"Perplexity including OOVs:\t{res.perplexity}")
        print(f"Perplexity excluding OOVs:\t{res.perplexity_excluding_oovs}")
        print(f"OOVs:\t{res.oovs}")
        print(f"Tokens:\t{res.tokens}")
        print(f"Bits per byte:\t{res.bits_per_byte}")
    return 0

"""`lmstack tokenizer train|encode|decode|stats`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmstack.cli import add_group
from lmstack.errors import InputError
from lmstack.io import check_output_dir, check_readable, iter_text_chunks, output_dir, read_stdin


def register(sub) -> None:
    g = add_group(sub, "tokenizer", "train and use tokenizers (BPE, Unigram, char, word)")

    p = g.add_parser(
        "train",
        help="learn a tokenizer from text files",
        description="Learn a tokenizer from UTF-8 text files (streamed, so files may be larger than memory).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument(
        "--kind",
        choices=["bpe", "unigram", "char", "word"],
        default="bpe",
        help="byte-level BPE (GPT-2 style), Unigram LM (SentencePiece style), characters, or whitespace words (default: bpe)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="target vocabulary size including specials (default: 8192 for bpe/unigram; every symbol seen for char/word)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; gets tokenizer.json")
    p.add_argument(
        "--special",
        action="append",
        default=None,
        metavar="TOKEN",
        help="register a special token (repeatable; default: <|endoftext|>)",
    )
    p.add_argument(
        "--pattern",
        choices=["gpt2", "gpt4"],
        default="gpt2",
        help="bpe: pre-tokenization regex, GPT-2's or GPT-4's cl100k (default: gpt2)",
    )
    p.add_argument("--min-count", type=int, default=1, help="word: words seen fewer times become <unk> (default: 1)")
    p.set_defaults(func=cmd_train)

    p = g.add_parser("encode", help="text to token ids")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("text", nargs="?", help="text to encode (default: read --file or standard input)")
    p.add_argument("--file", help="encode this UTF-8 file instead")
    p.add_argument("--allow-special", action="store_true", help="let special-token strings in the text become special ids")
    p.add_argument("--json", action="store_true", help="print ids and token pieces as JSON")
    p.set_defaults(func=cmd_encode)

    p = g.add_parser("decode", help="token ids to text")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("ids", nargs="*", type=int, help="token ids (default: read whitespace-separated ids from standard input)")
    p.set_defaults(func=cmd_decode)

    p = g.add_parser(
        "import",
        help="import GPT-2 files or a Hugging Face tokenizer.json",
        description="Import a tokenizer, keeping its ids: a Hugging Face tokenizer.json, or a folder with "
        "one (and its tokenizer_config.json), or GPT-2's encoder.json + vocab.bpe (or vocab.json + "
        "merges.txt). Byte-level BPE becomes lmstack's own BPE; any other tokenizer.json (SentencePiece-"
        "style Unigram or byte-fallback BPE, WordPiece) is kept as it is and run by Hugging Face's "
        "tokenizers library (kind hf, `pip install 'lmstack[hf]'`).",
    )
    p.add_argument("source", metavar="PATH", help="tokenizer.json, or a folder holding one of the file sets above")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; gets lmstack's tokenizer.json")
    p.set_defaults(func=cmd_import)

    p = g.add_parser(
        "export",
        help="write a BPE tokenizer as a Hugging Face tokenizer.json",
        description="Write an lmstack BPE tokenizer as a Hugging Face tokenizer.json that "
        "`tokenizers.Tokenizer.from_file` loads with the same ids.",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="lmstack tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (a directory gets tokenizer.json)")
    p.set_defaults(func=cmd_export)

    p = g.add_parser("stats", help="bytes per token, tokens per word and vocabulary use on text files")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)


def _load(path: str):
    from lmstack.tokenizers import load_tokenizer

    if not Path(path).exists():
        raise InputError(
            f"--tokenizer {path}: no such tokenizer folder or tokenizer.json; check the path, or make "
            "one with `lmstack tokenizer train`"
        )
    return load_tokenizer(path)


def _save(tok, out: str) -> Path:
    """Write `tok` to --out: a .json file as it is (atomically), else a folder that appears only
    complete, so a failed write leaves nothing behind."""
    if Path(out).suffix == ".json":
        return tok.save(out)
    with output_dir(out, "--out") as d:
        tok.save(d)
    return Path(out) / "tokenizer.json"


def _check_out(out: str) -> None:
    """Before any work: --out must be able to become the tokenizer's folder (or its .json file)."""
    check_output_dir(Path(out).parent if Path(out).suffix == ".json" else out, "--out")


def cmd_train(args) -> int:
    from lmstack.tokenizers import registry

    for f in args.files:  # fail before any work, naming the bad file
        next(iter_text_chunks(f))
    _check_out(args.out)
    kinds = registry()
    cls = kinds[args.kind]
    vocab_size = args.vocab_size
    if vocab_size is None and args.kind in ("bpe", "unigram"):
        vocab_size = 8192
    if vocab_size is not None and vocab_size < 1:
        raise InputError(f"--vocab-size must be positive, got {vocab_size}")
    opts = {"bpe": {"pattern": args.pattern}, "word": {"min_count": args.min_count}}.get(args.kind, {})
    specials = tuple(args.special) if args.special is not None else ("<|endoftext|>",)
    t0 = time.perf_counter()
    tok = cls.train_files(args.files, vocab_size=vocab_size, special_tokens=specials, **opts)
    seconds = time.perf_counter() - t0
    path = _save(tok, args.out)
    print(
        f"trained {args.kind} tokenizer: {tok.vocab_size} tokens ({len(tok.special_tokens)} special) in {seconds:.1f} s -> {path}"
    )
    return 0


def _read_input(args) -> str:
    if args.text is not None:
        return args.text
    if args.file:
        return "".join(iter_text_chunks(args.file))
    return read_stdin()


def cmd_encode(args) -> int:
    tok = _load(args.tokenizer)
    ids = tok.encode(_read_input(args), allowed_special="all" if args.allow_special else ())
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0


def cmd_decode(args) -> int:
    tok = _load(args.tokenizer)
    ids = args.ids
    if not ids:
        try:
            ids = [int(x) for x in read_stdin().split()]
        except ValueError as e:
            raise InputError(f"standard input must hold whitespace-separated integer ids ({e})") from None
    sys.stdout.write(tok.decode(ids) + "\n")  # a line, like every other output, so a pipeline's next output starts afresh
    return 0


def cmd_import(args) -> int:
    from lmstack.tokenizers.gpt2 import load_gpt2

    src = check_readable(args.source) if not Path(args.source).is_dir() else Path(args.source)
    _check_out(args.out)
    if src.is_dir():
        pairs = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
        found = next(((src / a, src / b) for a, b in pairs if (src / a).exists() and (src / b).exists()), None)
        if found:
            tok = load_gpt2(*found)
        elif (src / "tokenizer.json").exists():
            tok = _import_hf(src / "tokenizer.json")
        else:
            raise InputError(f"{src}: no tokenizer.json, encoder.json + vocab.bpe, or vocab.json + merges.txt in this folder")
    else:
        tok = _import_hf(src)
    path = _save(tok, args.out)
    print(f"imported {tok.kind} tokenizer: {tok.vocab_size} tokens ({len(tok.special_tokens)} special) -> {path}")
    return 0


def _import_hf(path: Path):
    """lmstack's exact BPE where it represents the file, else the file itself, run by Hugging
    Face's tokenizers library (with the roles of the tokenizer_config.json beside it)."""
    from lmstack.tokenizers.hf_wrapped import load_tokenizer_json

    tok = load_tokenizer_json(path)
    if tok is None:
        raise InputError(
            f"{path}: not a byte-level BPE, which lmstack reads itself; to import it as it is, pip install 'lmstack[hf]'"
        )
    return tok


def cmd_export(args) -> int:
    from lmstack.tokenizers.bpe import BPETokenizer
    from lmstack.tokenizers.hf import save_hf

    tok = _load(args.tokenizer)
    if not isinstance(tok, BPETokenizer):
        raise InputError(f"{args.tokenizer}: a {tok.kind} tokenizer; only byte-level BPE exports to Hugging Face")
    out = Path(args.out)
    if out.is_dir() or out.suffix != ".json":
        out = out / "tokenizer.json"
    save_hf(tok, out)
    print(f"exported to {out}")
    return 0


def cmd_stats(args) -> int:
    from lmstack.progress import progress

    tok = _load(args.tokenizer)
    n_bytes = n_tokens = n_words = 0
    used = set()
    paths = [check_readable(f) for f in args.files]
    total = sum(p.stat().st_size for p in paths)
    with progress(total=total, desc="tokenizing", unit="B", unit_scale=True) as bar:
        for p in paths:
            for chunk in iter_text_chunks(p):
                ids = tok.encode_ordinary(chunk)
                b = len(chunk.encode("utf-8"))
                n_bytes += b
                n_tokens += len(ids)
                n_words += len(chunk.split())
                used.update(ids)
                bar.update(b)
    stats = {
        "tokenizer": str(Path(args.tokenizer)),
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "words": n_words,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "tokens_per_word": n_tokens / max(n_words, 1),
        "vocab_used": len(used),
        "vocab_used_fraction": len(used) / tok.vocab_size,
    }
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
    else:
        for k, v in stats.items():
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")
    return 0

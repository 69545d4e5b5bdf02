"""The `lmstack` command. Each command group lives in its own module with a `register(sub)`
function that adds its parser and sets `func(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import lmstack
from lmstack.errors import LmstackError

# Command modules, in the order `lmstack --help` lists them.
COMMANDS = ("quickstart", "tokenizer", "convert", "ngram", "eval", "generate", "score", "train", "finetune", "lora", "scaling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmstack",
        description="The whole language-model stack: tokenizers, n-grams to Transformers, "
        "training, decoding, evaluation and serving. Run `lmstack COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"lmstack {lmstack.__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lmstack.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    if not getattr(args, "func", None):
        # A group without a subcommand (or no command at all): show what is there.
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LmstackError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmstack tokenizer encode ... | head`
        return 0
    except Exception as e:  # an lmstack bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def add_group(sub, name: str, help: str, description: str | None = None):
    """A command group (`lmstack NAME SUBCOMMAND`); returns its sub-parsers."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(_group_parser=p)
    return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")

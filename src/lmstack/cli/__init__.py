"""The `lmstack` command. Each command group lives in its own module with a `register(sub)`
function that adds its parser and sets `func(args) -> int | None`. A command whose parser is slow
to build (its flags come from training configs, whose modules import torch) also names its
one-line `HELP`, so other commands run without building it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings

import lmstack
from lmstack.errors import InputError, LmstackError

# Command modules, in the order `lmstack --help` lists them.
COMMANDS = (
    "quickstart",
    "tokenizer",
    "convert",
    "ngram",
    "eval",
    "generate",
    "score",
    "train",
    "finetune",
    "align",
    "lora",
    "card",
    "embed",
    "scaling",
    "serve",
    "verify",
)


class Parser(argparse.ArgumentParser):
    """On a usage error, one line and where to look, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `argv`, the commands it does not run that define `HELP`
    are only listed (building `train`, `finetune` and `align` imports the training stack, 2-4 s
    that `lmstack --help` or `lmstack tokenizer` should not wait for)."""
    running = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = Parser(
        prog="lmstack",
        description="The whole language-model stack: tokenizers, n-grams to Transformers, "
        "training, fine-tuning, decoding, evaluation and serving. Run `lmstack COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"lmstack {lmstack.__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (accepted anywhere)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"lmstack.cli.{name}")
        if argv is not None and name != running and hasattr(module, "HELP"):
            sub.add_parser(name, help=module.HELP)
        else:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    end = argv.index("--") if "--" in argv else len(argv)  # after `--`, "--debug" is text
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    real_stdout = sys.stdout
    sys.stdout = _NamedStream(real_stdout)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            return _run(argv, debug)
    finally:
        sys.stdout = real_stdout


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line, like an error (its source file and line mean nothing to a user)."""
    print(f"warning: {message}", file=sys.stderr)


def _run(argv: list[str], debug: bool) -> int:
    try:
        check_utf8_args(argv)
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            # A group without a subcommand (or no command at all): show what is there.
            (getattr(args, "_group_parser", None) or parser).print_help()
            return 2
        check_device(getattr(args, "device", None))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handlers below
        return code
    except Exception as e:
        if debug:
            traceback.print_exc()
        return _report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _report(e: Exception) -> int:
    """Print one line for `e` and return the exit code. Failures of the user's machine (disk full,
    permissions, read-only disk, no network, a closed stdout) are named as such, never as an
    internal error."""
    from lmstack.io import os_error_message, safetensors_os_error

    if type(e).__name__ == "SafetensorError":
        e = safetensors_os_error(e) or e
    if isinstance(e, OSError) and e.filename == STDOUT:
        _silence_stdout()
        if isinstance(e, BrokenPipeError):
            return 0  # e.g. `lmstack tokenizer encode ... | head`: the reader has all it wants
    if isinstance(e, OSError):
        e = InputError(os_error_message(e))
    if isinstance(e, LmstackError):
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


STDOUT = "standard output"


class _NamedStream:
    """sys.stdout, with its write failures naming it (a write to a full or closed pipe names no file)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, STDOUT) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise type(e)(e.errno, e.strerror, STDOUT) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point a failed real stdout at /dev/null, so exiting does not flush it again and fail twice."""
    if sys.stdout is sys.__stdout__ or getattr(sys.stdout, "_stream", None) is sys.__stdout__:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())


def check_utf8_args(argv: list[str]) -> None:
    """Bytes that are not UTF-8 on the command line arrive as lone surrogates; say which
    argument holds them, as a file that is not UTF-8 gets told, instead of failing deep inside."""
    for i, arg in enumerate(argv):
        name, value = (
            arg.split("=", 1)
            if arg.startswith("--") and "=" in arg
            else (argv[i - 1] if i and argv[i - 1].startswith("--") else "argument", arg)
        )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            try:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:
                shown = ascii(value)[1:-1]
            raise InputError(
                f"{name} '{shown}': not valid UTF-8 (at character {e.start}); pass UTF-8 text, e.g. "
                "convert it with `iconv -f LATIN1 -t UTF-8` or use a UTF-8 locale"
            ) from None


def check_device(name: str | None) -> None:
    """--device names a device this machine has, checked before any work (as `train` does)."""
    if name in (None, "cpu", "auto"):
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise InputError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found); use --device cpu")


def add_group(sub, name: str, help: str, description: str | None = None):
    """A command group (`lmstack NAME SUBCOMMAND`); returns its sub-parsers."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(_group_parser=p)
    return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")

"""File helpers every layer shares: checked UTF-8 reading and atomic writes.

Reading checks the things users get wrong (missing path, directory, empty, binary or
non-UTF-8 file) and raises `InputError` naming the file. Writing goes to a temp file in the
target directory, is fsynced, then renamed, so an interrupted run never leaves a half-written
output behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lmstack.errors import InputError

_CHUNK = 1 << 20


ASSET_PREFIX = "lmstack:"


def resolve_path(path: str | os.PathLike) -> Path:
    """A user path, or `lmstack:NAME` for a file shipped in the package (e.g. the Tiny
    Shakespeare corpus, `lmstack:tinyshakespeare.txt`), so shipped configs run from any folder."""
    s = str(path)
    if s.startswith(ASSET_PREFIX):
        from importlib import resources

        return Path(str(resources.files("lmstack") / "assets" / s[len(ASSET_PREFIX) :]))
    return Path(path)


def check_readable(path: str | os.PathLike) -> Path:
    p = resolve_path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; pass a text file")
    return p


def _utf8_error(p: Path | str, err: UnicodeDecodeError, offset: int) -> InputError:
    return InputError(
        f"{p}: not valid UTF-8 (byte offset {offset + err.start}); convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
    )


def iter_text_chunks(path: str | os.PathLike, chunk_chars: int = _CHUNK) -> Iterator[str]:
    """Stream a UTF-8 file in chunks that never split a line, so memory stays flat.

    Raises InputError for a missing, empty, binary (NUL bytes) or non-UTF-8 file.
    """
    p = check_readable(path)
    offset = 0
    seen_any = False
    with open(p, "rb") as f:
        pending = b""
        while True:
            block = f.read(chunk_chars)
            if not block:
                break
            if b"\x00" in block:
                raise InputError(f"{p}: looks binary (contains NUL bytes); pass a UTF-8 text file")
            block = pending + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                pending = block
                continue
            head, pending = block[:cut], block[cut:]
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(p, e, offset) from None
            offset += len(head)
            seen_any = seen_any or bool(text)
            yield text
        if pending:
            try:
                text = pending.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(p, e, offset) from None
            seen_any = True
            yield text
    if not seen_any:
        raise InputError(f"{p}: file is empty; pass a file with some text")


def read_text(path: str | os.PathLike) -> str:
    """The whole file as a string, with the same checks as `iter_text_chunks`."""
    return "".join(iter_text_chunks(path))


def read_stdin() -> str:
    """Standard input as text, with the same UTF-8 check (and message) as a file gets."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error("standard input", e, 0) from None


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
    """Lines of a UTF-8 file, newline kept, streamed. A byte-order mark that starts the file is
    dropped: Windows editors write one, and a JSON line must not start with it."""
    chunks = iter_text_chunks(path)
    for i, chunk in enumerate(chunks):
        yield from (chunk.removeprefix("\ufeff") if i == 0 else chunk).splitlines(keepends=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (safetensors, numpy);
    on success fsync it and rename it over `path`, on failure remove it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed f.write() names no file: name it
            raise OSError(e.errno, e.strerror, str(p)) from e
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    from lmstack.errors import FormatError

    p = check_readable(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: corrupt {what} ({e}); regenerate it") from None


# --- output folders ----------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work when `path` cannot become an output folder: it is a file, a part of
    it is a file, or the nearest existing folder is not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} {p}: is a file, not a folder; pick a folder path (lmstack never replaces a file)")
    base = next(a for a in (p, *p.parents) if a.exists())  # "." or "/" at the latest
    if not base.is_dir():
        raise InputError(f"{flag} {p}: {base} is a file, so no folder can be made there; pick another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write {p}: {base} is not writable (permissions or a read-only disk); pick a folder you can write to"
        )
    return p


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, flag: str, replace: bool = False) -> Iterator[Path]:
    """The folder a command writes its outputs into, so that a failure leaves the disk as it was.

    A new folder (or, with `replace`, any folder) is built as a hidden folder beside `path` and
    renamed into place at the end; on failure it and any parent folders made for it are removed.
    An existing folder is written in place (each file atomically) and whatever the command added
    to it is removed on failure."""
    p = check_output_dir(path, flag)
    if p.is_dir() and not replace:
        before = set(os.listdir(p))
        try:
            yield p
        except BaseException:
            for name in set(os.listdir(p)) - before:
                _remove(p / name)
            raise
        return
    made = next((a for a in reversed(p.parents) if not a.exists()), None)
    p.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield stage
        old = p.with_name(f"{stage.name}.old") if p.exists() else None
        if old:
            p.rename(old)
        stage.rename(p)
        if old:
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        named = _in_place_of(e, stage, p)
        if named is not None:
            raise named from e
        raise


def _in_place_of(e: BaseException, stage: Path, final: Path) -> OSError | None:
    """A failed write inside the hidden staging folder, as the OSError it is for the user: naming
    the output path they gave, not a temp name that is already gone."""
    if type(e).__name__ == "SafetensorError":
        e = safetensors_os_error(e) or e
    if not isinstance(e, OSError) or not str(e.filename or "").startswith(str(stage)):
        return None
    return OSError(e.errno, e.strerror, str(final) + str(e.filename)[len(str(stage)) :])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- failures of the machine, as one clear line --------------------------------------------------

_FIXES = {
    errno.ENOSPC: ("cannot write", "free some space or write somewhere else"),
    errno.EDQUOT: ("cannot write", "free some space or write somewhere else"),
    errno.EFBIG: ("cannot write", "write somewhere else"),
    errno.EROFS: ("cannot write", "that disk is read-only; write somewhere else"),
    errno.EACCES: ("cannot access", "check its permissions or use another path"),
    errno.EPERM: ("cannot access", "check its permissions or use another path"),
    errno.ENOENT: ("cannot find", "check the path"),
    errno.ENOTDIR: ("cannot use", "a part of the path is a file, not a folder; check the path"),
    errno.EISDIR: ("cannot use", "it is a folder; pass a file"),
    errno.ENAMETOOLONG: ("cannot use", "use a shorter path"),
    errno.EMFILE: ("cannot open", "raise the limit (ulimit -n) or close other programs"),
    errno.EIO: ("cannot read or write", "the disk reported an I/O error; check it or use another one"),
}


def os_error_message(e: OSError) -> str:
    """One line naming what failed on the machine (disk full, permissions, read-only disk, no
    network) and the fix: these are never lmstack bugs, so never an "internal error"."""
    reason = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    reason = reason[0].lower() + reason[1:]
    if _is_network(e):
        return (
            f"a network connection failed ({reason}); check the connection, or use local files "
            "(lmstack itself never needs the network)"
        )
    verb, fix = _FIXES.get(e.errno, ("cannot use", "check the path, its permissions and the free space"))
    where = f" {e.filename}" if e.filename else ""
    return f"{verb}{where}: {reason}; {fix}"


def _is_network(e: OSError) -> bool:
    import socket

    net = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT}
    if isinstance(e, (ConnectionError, socket.gaierror, socket.timeout)) or e.errno in net:
        return not isinstance(e, BrokenPipeError)
    return type(e).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "huggingface_hub", "aiohttp")


def safetensors_os_error(e: Exception) -> OSError | None:
    """safetensors reports a failed write as SafetensorError("... (os error 28) at path ..."): the
    OSError it stands for, naming the folder written to, or None for any other SafetensorError."""
    import re

    m = re.search(r"\(os error (\d+)\)", str(e))
    if not m:
        return None
    code = int(m.group(1))
    at = re.search(r'at path "([^"]+)"', str(e))
    return OSError(code, os.strerror(code), str(Path(at.group(1)).parent) if at else None)

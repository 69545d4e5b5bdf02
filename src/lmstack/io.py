"""File helpers every layer shares: checked UTF-8 reading and atomic writes.

Reading checks the things users get wrong (missing path, directory, empty, binary or
non-UTF-8 file) and raises `InputError` naming the file. Writing goes to a temp file in the
target directory, is fsynced, then renamed, so an interrupted run never leaves a half-written
output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from lmstack.errors import InputError

_CHUNK = 1 << 20


ASSET_PREFIX = "lmstack:"


def resolve_path(path: str | os.PathLike) -> Path:
    """A user path, or `lmstack:NAME` for a file shipped in the package (e.g. the Tiny
    Shakespeare corpus, `lmstack:tinyshakespeare.txt`), so shipped configs run from any folder."""
    s = str(path)
    if s.startswith(ASSET_PREFIX):
        from importlib import resources

        return Path(str(resources.files("lmstack") / "assets" / s[len(ASSET_PREFIX):]))
    return Path(path)


def check_readable(path: str | os.PathLike) -> Path:
    p = resolve_path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; pass a text file")
    return p


def _utf8_error(p: Path, err: UnicodeDecodeError, offset: int) -> InputError:
    return InputError(
        f"{p}: not valid UTF-8 (byte offset {offset + err.start}); "
        "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
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


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
    """Lines of a UTF-8 file, newline kept, streamed."""
    for chunk in iter_text_chunks(path):
        yield from chunk.splitlines(keepends=True)


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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

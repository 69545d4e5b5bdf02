"""Reading corpora as a stream of documents: text files, directories of them, JSONL files.

A plain text file is one document; a JSONL file holds one document per line (its `text_field`);
a directory contributes every `.txt`, `.text`, `.md` and `.jsonl` file below it, in sorted
order. Documents arrive as pieces of at most about a megabyte, so a corpus (or one huge text
file) never has to fit in memory. Each piece carries the byte offset where it starts, counted
over the whole corpus, which is what the train/validation split is decided on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import check_readable, iter_text_chunks, resolve_path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)


@dataclass
class Piece:
    text: str
    offset: int  # byte offset of the piece's start within the whole corpus
    ends_document: bool


def corpus_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand directories; check every file exists. Raises InputError if nothing usable is left."""
    if not paths:
        raise InputError("no training data given; pass --data FILE_OR_DIR (text, directory or JSONL)")
    files: list[Path] = []
    for path in paths:
        p = resolve_path(path)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise InputError(f"{p}: directory holds no .txt, .text, .md or .jsonl files; point --data at the corpus files")
            files.extend(found)
        else:
            files.append(check_readable(p))
    return files


def corpus_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def iter_pieces(files: list[Path], text_field: str = "text") -> Iterator[Piece]:
    """Documents of `files` as pieces; each document's last piece has `ends_document` set."""
    base = 0
    for f in files:
        if f.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_pieces(f, base, text_field)
        else:
            yield from _text_pieces(f, base)
        base += f.stat().st_size


def _text_pieces(f: Path, base: int) -> Iterator[Piece]:
    offset = base
    pending: Piece | None = None
    for chunk in iter_text_chunks(f):
        if pending is not None:
            yield pending
        pending = Piece(chunk, offset, False)
        offset += len(chunk.encode("utf-8"))
    if pending is not None:
        pending.ends_document = True
        yield pending


def _jsonl_pieces(f: Path, base: int, text_field: str) -> Iterator[Piece]:
    offset = base
    for lineno, line in enumerate(_jsonl_lines(f), 1):
        start = offset
        offset += len(line.encode("utf-8"))
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{f}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = sorted(record) if isinstance(record, dict) else []
            raise InputError(
                f"{f}:{lineno}: no string field {text_field!r} (fields: {keys}); pick the text field with --text-field"
            )
        yield Piece(text, start, True)


def _jsonl_lines(f: Path) -> Iterator[str]:
    for chunk in iter_text_chunks(f):
        yield from chunk.splitlines(keepends=True)

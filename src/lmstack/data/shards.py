"""Token shards: a tokenized corpus as flat binary arrays that training memory-maps.

`prepare_shards` streams a corpus (see `corpus.py`) through a tokenizer into
`train_0000.bin`, `train_0001.bin`, ..., `val_0000.bin`: raw little-endian uint16 ids when the
vocabulary fits (65,536 ids or fewer), uint32 otherwise. Every document is followed by the
tokenizer's `<|endoftext|>` id, so a window that crosses a document boundary sees the separator.
`manifest.json` is written last and records the shards, document and token counts, the dtype and
the tokenizer's fingerprint; a directory without it is an unfinished preparation.

The split is by position: the last `val_fraction` of the corpus bytes is validation (for one
text file, as nanoGPT splits Tiny Shakespeare, cut at the first line break after the boundary).
It needs no pass over the data beforehand and puts whole JSONL records on one side.

Tokenizing runs in a pool of worker processes (both cores by default) for corpora over a few
megabytes; results come back in order, so the shards do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmstack.data.corpus import Piece, corpus_bytes, corpus_files, iter_pieces
from lmstack.errors import FormatError, InputError
from lmstack.io import read_json, write_json
from lmstack.progress import progress
from lmstack.tokenizers import EOT, Tokenizer, from_dict

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_GROUP_BYTES = 1 << 20  # text per work item sent to a tokenizing worker
_POOL_MIN_BYTES = 8 << 20  # smaller corpora tokenize faster than a pool starts


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- writing -------------------------------------------------------------------------------


_worker_tok: Tokenizer | None = None


def _init_worker(tok_dict: dict) -> None:
    global _worker_tok
    _worker_tok = from_dict(tok_dict)


def _encode_group(group: list[tuple[str, Piece]], tok: Tokenizer | None = None) -> list[tuple[str, bool, np.ndarray, int]]:
    """(split, ends_document, ids, text bytes) for each (split, piece); ids end with the
    end-of-text id where a document ends."""
    tok = tok or _worker_tok
    out = []
    for split, piece in group:
        ids = tok.encode_ordinary(piece.text)
        if piece.ends_document:
            ids.append(tok.eot_id)
        ids = np.asarray(ids, dtype=token_dtype(tok.vocab_size))
        out.append((split, piece.ends_document, ids, len(piece.text.encode("utf-8"))))
    return out


class _ShardWriter:
    """Appends ids to `{split}_NNNN.bin`, starting a new file every `shard_tokens` ids. A shard
    is written under a temp name and renamed when full or closed."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._f = None
        self._n = 0

    def write(self, arr: np.ndarray, ends_document: bool) -> None:
        while len(arr):
            if self._f is None:
                self._open()
            take = arr[: self.shard_tokens - self._n]
            self._f.write(take.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self._n += len(take)
            arr = arr[len(take) :]
            if self._n == self.shard_tokens:
                self._close()
        self.documents += ends_document

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):04d}.bin"

    def _open(self) -> None:
        self._f = open(self.out / f".{self._name()}.tmp", "wb")
        self._n = 0

    def _close(self) -> None:
        name = self._name()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.out / f".{name}.tmp", self.out / name)
        self.shards.append({"file": name, "tokens": self._n})
        self._f = None

    def finish(self) -> dict:
        if self._f is not None:
            self._close()
        return {"shards": self.shards, "documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards)}

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._f.name)


def _split_pieces(pieces: Iterator[Piece], cut: int) -> Iterator[tuple[str, Piece]]:
    """(split, piece) pairs; the piece holding byte `cut` is divided at its first line break
    after the cut (the train part then ends its document)."""
    for piece in pieces:
        if piece.offset >= cut:
            yield "val", piece
            continue
        raw = piece.text.encode("utf-8")
        if piece.offset + len(raw) <= cut:
            yield "train", piece
            continue
        at = raw.find(b"\n", cut - piece.offset)
        if at < 0 or at + 1 == len(raw):
            yield "train", piece
            continue
        at += 1
        yield "train", Piece(raw[:at].decode("utf-8"), piece.offset, True)
        yield "val", Piece(raw[at:].decode("utf-8"), piece.offset + at, piece.ends_document)


def _groups(pairs: Iterator[tuple[str, Piece]]) -> Iterator[list[tuple[str, Piece]]]:
    """Batch consecutive pieces into work items of about `_GROUP_BYTES` of text each."""
    group, size = [], 0
    for split, piece in pairs:
        group.append((split, piece))
        size += len(piece.text)
        if size >= _GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def prepare_shards(
    paths: list[str | os.PathLike],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
) -> dict:
    """Tokenize a corpus into `out_dir` (shards + manifest.json); returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be positive, got {shard_tokens}")
    if tokenizer.eot_id is None:
        raise InputError(
            f"the tokenizer has no {EOT} special token to separate documents; retrain it with "
            f"`lmstack tokenizer train --special '{EOT}'` (the default)"
        )
    files = corpus_files(paths)
    total = corpus_bytes(files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST).unlink()  # the directory is not a valid preparation until we finish
    for split in SPLITS:
        for old in out.glob(f"{split}_*.bin"):
            old.unlink()
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    cut = total - int(total * val_fraction) if val_fraction else total + 1
    groups = _groups(_split_pieces(iter_pieces(files, text_field), cut))
    workers = workers or min(2, os.cpu_count() or 1)
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1 and total >= _POOL_MIN_BYTES:
                pool = stack.enter_context(_mp_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_dict(),)))
                encoded = pool.imap(_encode_group, groups)
            else:
                encoded = (_encode_group(g, tokenizer) for g in groups)
            bar = stack.enter_context(progress(total=total, desc="tokenizing", unit="B", unit_scale=True))
            for results in encoded:
                for split, ends, ids, nbytes in results:
                    writers[split].write(ids, ends)
                    bar.update(nbytes)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats = {s: w.finish() for s, w in writers.items()}
    if stats["train"]["tokens"] == 0:
        raise InputError(f"the corpus {[str(p) for p in paths]} produced no training tokens; pass a non-empty corpus")
    manifest = {
        "lmstack_shards": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokenizer": tokenizer.fingerprint(),
        "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "val_fraction": val_fraction,
        "text_field": text_field,
        **stats,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _mp_context():
    """fork where the platform has it: workers start at once and need no importable __main__
    (the tokenizer workers never touch torch, so forking a process that has it is safe)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


# --- reading -------------------------------------------------------------------------------


@dataclass
class TokenShards:
    """One split of a prepared directory as memory-mapped arrays (nothing is read up front)."""

    path: Path
    split: str
    manifest: dict
    arrays: list[np.ndarray]

    @classmethod
    def open(cls, path: str | os.PathLike, split: str = "train", tokenizer: Tokenizer | None = None) -> "TokenShards":
        p = Path(path)
        manifest = read_manifest(p)
        if tokenizer is not None and manifest["tokenizer"] != tokenizer.fingerprint():
            raise InputError(
                f"{p}: shards were made with another tokenizer (fingerprint {manifest['tokenizer']}, "
                f"this one is {tokenizer.fingerprint()}); prepare the data again with this tokenizer"
            )
        if split not in manifest:
            raise FormatError(f"{p / MANIFEST}: no {split!r} split; prepare the data again")
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        arrays = []
        for s in manifest[split]["shards"]:
            f = p / s["file"]
            if not f.exists() or f.stat().st_size != s["tokens"] * dtype.itemsize:
                raise FormatError(f"{f}: missing or truncated shard; prepare the data again")
            arrays.append(np.memmap(f, dtype=dtype, mode="r"))
        return cls(p, split, manifest, arrays)

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def sample_windows(self, rng: np.random.Generator, n: int, length: int, rows: slice = slice(None)) -> np.ndarray:
        """Windows of `length` consecutive ids at n uniformly random starts, as [rows, length]
        int64; `rows` picks which of the n to read (each rank and micro-batch reads only its own).
        A window never spans two shards."""
        starts_per_shard = np.array([max(len(a) - length + 1, 0) for a in self.arrays], dtype=np.int64)
        total = int(starts_per_shard.sum())
        if total == 0:
            raise InputError(
                f"{self.path}: the {self.split} split has {self.num_tokens} tokens, fewer than one window of "
                f"{length}; lower --block-size or add data (or raise --val-fraction for the val split)"
            )
        flat = rng.integers(0, total, size=n)[rows]
        bounds = np.cumsum(starts_per_shard)
        shard = np.searchsorted(bounds, flat, side="right")
        start = flat - (bounds[shard] - starts_per_shard[shard])
        return np.stack([self.arrays[s][o : o + length] for s, o in zip(shard, start)]).astype(np.int64)


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not (p / MANIFEST).exists():
        raise InputError(f"{p}: no {MANIFEST}; it is not a prepared shard directory (or preparation was interrupted)")
    manifest = read_json(p / MANIFEST, "shard manifest")
    if manifest.get("lmstack_shards") != FORMAT_VERSION:
        raise FormatError(f"{p / MANIFEST}: unknown shard format; prepare the data again")
    return manifest

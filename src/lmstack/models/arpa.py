"""ARPA files: the text format of back-off n-gram models that KenLM, SRILM and IRSTLM share.

Reading follows KenLM's reader (lm/read_arpa.*): text before `\\data\\` is skipped, the counts
must match the sections, log10 probabilities above 0 are clamped to 0 with a warning, a
non-finite back-off or a non-zero one on the highest order is an error, and every word of a
higher-order n-gram must be a unigram. Every error names the file and line.

This module only turns text into arrays and back; `ngram.NGramLM` owns the lookup tables.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmstack.errors import FormatError
from lmstack.io import atomic_write, check_readable

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_BLOCK = 1 << 20  # entries parsed per block


def split_words(line: str) -> list[str]:
    """Fields of an ARPA line as KenLM's reader splits them: on space, tab and carriage return
    (a no-break space stays inside a word)."""
    return [w for w in line.replace("\t", " ").replace("\r", " ").split(" ") if w]


@dataclass
class ArpaSection:
    """The n-grams of one order: word ids [count, n], log10 p, log10 back-off (None if absent)."""

    ids: np.ndarray
    logp: np.ndarray
    backoff: np.ndarray | None
    lines: np.ndarray  # 1-based line number of each entry, for error messages


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for i, line in enumerate(f, 1):
                yield i, line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); is it a gzip or binary model?") from None


def read_arpa(path: str | os.PathLike) -> tuple[list[str], list[ArpaSection]]:
    """Parse an ARPA file into (vocabulary in file order, one section per order)."""
    p = check_readable(path)
    lines = _numbered_lines(p)

    def fail(lineno: int | None, msg: str) -> FormatError:
        where = f"{p}:{lineno}" if lineno else str(p)
        return FormatError(f"{where}: {msg}; is this an ARPA language model file?")

    # Header: skip anything before \data\, then "ngram N=C" lines.
    lineno, line = 0, ""
    for lineno, line in lines:  # noqa: B007 (lineno names the line in errors after the loop)
        if line.strip() == "\\data\\":
            break
    else:
        raise fail(None, "no \\data\\ header found")
    counts: list[int] = []
    for lineno, line in lines:
        s = line.strip()
        if not s:
            if counts:
                break
            continue
        if not s.startswith("ngram "):
            if counts and s.startswith("\\"):
                break
            raise fail(lineno, f"expected 'ngram N=COUNT' in the header, got {s[:60]!r}")
        try:
            n_str, c_str = s[len("ngram ") :].split("=")
            n, c = int(n_str), int(c_str)
        except ValueError:
            raise fail(lineno, f"malformed header line {s[:60]!r}") from None
        if n != len(counts) + 1 or c < 0:
            raise fail(lineno, f"header line {s!r} is out of order (orders must run 1, 2, ...)")
        counts.append(c)
    if not counts:
        raise fail(lineno, "the \\data\\ header lists no n-gram counts")

    order = len(counts)
    word_ids: dict[str, int] = {}
    vocab: list[str] = []
    sections: list[ArpaSection] = []
    pending = line.strip() if line.strip().startswith("\\") else None
    for n in range(1, order + 1):
        header = f"\\{n}-grams:"
        if pending is None:
            for lineno, line in lines:  # noqa: B007 (lineno names the line in errors after the loop)
                if line.strip():
                    pending = line.strip()
                    break
        if pending != header:
            found = "the end of the file" if pending is None else repr(pending[:60])
            raise fail(lineno, f"expected section {header}, found {found}")
        pending = None
        highest = n == order
        expected = counts[n - 1]
        # Python lists per block of entries, turned into arrays as each block fills, so a
        # large file never holds one Python float per entry.
        blocks: list[tuple[np.ndarray, ...]] = []
        done = 0
        logps: list[float] = []
        backoffs: list[float] = []
        flat: list[int] = []
        line_nos: list[int] = []

        def flush():
            nonlocal done
            blocks.append(
                (
                    np.asarray(flat, np.int64).reshape(len(logps), n),
                    np.asarray(logps),
                    np.asarray(backoffs),
                    np.asarray(line_nos, np.int64),
                )
            )
            done += len(logps)
            for buf in (logps, backoffs, flat, line_nos):
                buf.clear()

        for lineno, line in lines:
            parts = split_words(line)
            if not parts:
                break
            if parts[0].startswith("\\"):
                pending = line.strip()
                break
            if done + len(logps) == expected:
                raise fail(lineno, f"section {header} has more entries than the {expected} the header says")
            if len(parts) not in (n + 1, n + 2):
                raise fail(lineno, f"expected a log10 probability, {n} word(s) and an optional back-off, got {len(parts)} fields")
            try:
                logp = float(parts[0])
                bo = float(parts[n + 1]) if len(parts) == n + 2 else 0.0
            except ValueError:
                raise fail(lineno, f"not a number in {line.strip()[:60]!r}") from None
            if math.isnan(logp):
                raise fail(lineno, "the probability is NaN")
            if logp > 0:
                warnings.warn(f"{p}:{lineno}: positive log10 probability {logp} clamped to 0 (an IRSTLM bug)", stacklevel=2)
                logp = 0.0
            if not math.isfinite(bo):
                raise fail(lineno, f"the back-off {parts[n + 1]} is not finite")
            if highest and bo != 0.0:
                raise fail(lineno, f"a back-off weight on the highest order ({n}) must be 0, got {bo}")
            words = parts[1 : n + 1]
            if n == 1:
                w = words[0]
                if w in word_ids:
                    raise fail(lineno, f"duplicate unigram {w!r}")
                word_ids[w] = len(vocab)
                vocab.append(w)
                flat.append(word_ids[w])
            else:
                for w in words:
                    i = word_ids.get(w)
                    if i is None:
                        raise fail(lineno, f"word {w!r} was not seen in the unigrams")
                    flat.append(i)
            logps.append(logp)
            backoffs.append(bo)
            line_nos.append(lineno)
            if len(logps) == _BLOCK:
                flush()
        flush()
        if done != expected:
            raise fail(lineno, f"section {header} has {done} entries but the header says {expected}")
        ids, logp_arr, bo_arr, line_arr = (np.concatenate(parts) for parts in zip(*blocks))
        sections.append(ArpaSection(ids=ids, logp=logp_arr, backoff=None if highest else bo_arr, lines=line_arr))
    if pending is None:
        for lineno, line in lines:  # noqa: B007 (lineno names the line in errors after the loop)
            if line.strip():
                pending = line.strip()
                break
    if pending != "\\end\\":
        found = "the end of the file" if pending is None else repr(pending[:60])
        raise fail(lineno, f"expected \\end\\ after the {order}-grams, found {found}")
    for lineno, line in lines:
        if line.strip():
            raise fail(lineno, "only whitespace may follow \\end\\")
    return vocab, sections


def write_arpa(
    path: str | os.PathLike, counts: list[int], blocks: Iterable[tuple[int, list[str], np.ndarray, np.ndarray | None]]
) -> None:
    """Write an ARPA file atomically from blocks of entries, in order of n: (n, n-gram texts
    "w1 w2", log10 p, log10 back-off or None on the highest order)."""
    with atomic_write(path) as f:
        f.write("\\data\\\n")
        for n, c in enumerate(counts, 1):
            f.write(f"ngram {n}={c}\n")
        section = 0
        for n, texts, lp, bo in blocks:
            while section < n:
                section += 1
                f.write(f"\n\\{section}-grams:\n")
            lp = (lp + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0
            if bo is None:
                f.write("".join(map("{:.9g}\t{}\n".format, lp, texts)))
            else:
                f.write("".join(map("{:.9g}\t{}\t{:.9g}\n".format, lp, texts, (bo + 0.0).tolist())))
        while section < len(counts):
            section += 1
            f.write(f"\n\\{section}-grams:\n")
        f.write("\n\\end\\\n")

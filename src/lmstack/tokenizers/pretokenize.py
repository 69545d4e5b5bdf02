"""Pre-tokenization regexes whose letters and numbers do not depend on library versions.

`\\p{L}` and `\\p{N}` mean whatever Unicode version the regex engine was built with: the `regex`
module follows new Unicode releases within months, tiktoken's Rust engine later. A character that
only the newer tables know (e.g. U+10940, assigned in Unicode 17) is a letter to one engine and
punctuation to the other, so the same text split into different chunks and got different ids.
Here both engines read `\\p{L}` / `\\p{N}` (and `\\pL`, `\\P{L}`, ...) through the Unicode 16.0 tables
of `unicode16`, which are tiktoken's: tiktoken is the reference for the GPT-2 and GPT-4 patterns.

tiktoken gets the pattern with the tables spelled out (its speed hardly changes). The `regex`
module is 15 times slower on spelled-out classes, so it keeps its own tables on every text that
holds none of the few characters on which they differ from Unicode 16.0 (found once per process),
and switches to the spelled-out pattern only for a text that does.
"""

from __future__ import annotations

import functools

import regex

from lmstack.tokenizers.unicode16 import LETTERS, NUMBERS

_TABLES = {"L": LETTERS, "N": NUMBERS}
_MAX = 0x10FFFF
# An escape (property forms captured), a POSIX class inside a set, or any other character.
_TOKEN = regex.compile(r"\\([pP])(?:\{(\^?)([LN])\}|([LN]))|\\.|\[:\^?\w+:\]|.", regex.DOTALL)


def _ranges(prop: str) -> list[tuple[int, int]]:
    return [(int(a, 16), int(b or a, 16)) for a, _, b in (r.partition("-") for r in _TABLES[prop].split())]


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The code points outside `ranges` (the tables hold no surrogates and border none, so no
    range starts or ends on one, which Rust's regex would reject)."""
    out, nxt = [], 0
    for a, b in ranges:
        if a > nxt:
            out.append((nxt, a - 1))
        nxt = b + 1
    if nxt <= _MAX:
        out.append((nxt, _MAX))
    return out


@functools.cache
def _class_body(prop: str, negated: bool) -> str:
    """The inside of a character class listing Unicode 16.0's `prop` (or everything else)."""
    ranges = _complement(_ranges(prop)) if negated else _ranges(prop)
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def pin_pattern(pattern: str) -> str:
    """`pattern` with every \\p{L}, \\p{N} (also \\pL, \\P{L}, \\p{^L}) spelled out as Unicode 16.0 ranges,
    inside or outside a character class. Other properties are left as they are."""
    out, depth, first = [], 0, False
    for m in _TOKEN.finditer(pattern):
        tok = m.group()
        if m.group(1):
            negated = (m.group(1) == "P") != bool(m.group(2))
            body = _class_body(m.group(3) or m.group(4), negated)
            if depth:
                tok = body
            else:
                tok = f"[{body}]"
        elif tok == "[" and not depth:
            depth, first = 1, True
            out.append(tok)
            continue
        elif tok == "^" and first and out[-1] == "[":
            out.append(tok)
            continue
        elif tok == "]" and depth and not first:
            depth = 0
        first = False
        out.append(tok)
    return "".join(out)


@functools.cache
def _odd_chars() -> frozenset[str]:
    """Characters whose \\p{L} or \\p{N} membership in the installed `regex` module differs from
    Unicode 16.0 (about 17,000 new letters with regex 2026; none when the versions match)."""
    everything = "".join(map(chr, [*range(0xD800), *range(0xE000, _MAX + 1)]))  # all but surrogates
    odd: set[str] = set()
    for prop in _TABLES:
        native = set(regex.findall(rf"\p{{{prop}}}", everything))
        pinned = {chr(c) for a, b in _ranges(prop) for c in range(a, b + 1)}
        odd |= native ^ pinned
    return frozenset(odd)


class PinnedRegex:
    """A compiled pre-tokenization pattern for the `regex` module that reads \\p{L} and \\p{N} as
    Unicode 16.0 (see the module docstring); offers the `findall` and `search` this package uses."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._native = regex.compile(pattern)
        self._pinned = None

    def _for(self, text: str):
        if text.isascii() or _odd_chars().isdisjoint(text):
            return self._native
        if self._pinned is None:
            self._pinned = regex.compile(pin_pattern(self.pattern))
        return self._pinned

    def findall(self, text: str) -> list[str]:
        return self._for(text).findall(text)

    def search(self, text: str):
        return self._for(text).search(text)

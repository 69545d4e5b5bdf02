"""The tokenizer contract every kind implements.

A tokenizer maps text to ids and back, with `decode(encode(s)) == s` for every string.
Special tokens (end of text, padding, mask, chat roles) are registered by their string and get
ids after the ordinary vocabulary; plain text never encodes to one unless the caller passes it
in `allowed_special`.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import regex

from lmstack.errors import FormatError, InputError
from lmstack.io import check_readable, iter_text_chunks, read_json, write_json

# Conventional names, so every layer agrees on the strings.
EOT = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
BOS = "<|bos|>"
CHAT_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_SPECIALS = (EOT,)

TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class Tokenizer(ABC):
    kind: str = ""

    def __init__(self, special_tokens: dict[str, int] | None = None):
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._special_re = None
        # A Hugging Face jinja chat template (see lmstack.data.chat); None = lmstack's built-in format.
        self.chat_template: str | None = None

    # --- what each kind provides -------------------------------------------------------
    @property
    @abstractmethod
    def base_vocab_size(self) -> int:
        """Ordinary (non-special) vocabulary size; specials take ids from here up."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids for plain text; special-token strings are treated as ordinary text."""

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of ordinary ids (special ids are handled by `decode`)."""

    @abstractmethod
    def _state(self) -> dict:
        """Kind-specific JSON-able state, inverse of `_from_state`."""

    @classmethod
    @abstractmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "Tokenizer": ...

    @abstractmethod
    def id_to_piece(self, i: int) -> str:
        """Human-readable form of one token, for stats and debugging."""

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None, special_tokens=DEFAULT_SPECIALS, **opts) -> "Tokenizer":
        raise NotImplementedError

    @classmethod
    def train_files(
        cls, paths: Iterable[str | os.PathLike], vocab_size: int | None, special_tokens=DEFAULT_SPECIALS, **opts
    ) -> "Tokenizer":
        """Train on text files, streamed; kinds that can parallelise over files override this."""
        paths = [check_readable(p) for p in paths]
        texts = (chunk for p in paths for chunk in iter_text_chunks(p))
        return cls.train(texts, vocab_size=vocab_size, special_tokens=special_tokens, **opts)

    # --- shared behaviour ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self.base_vocab_size, max(self.special_tokens.values(), default=-1) + 1)

    def add_special_tokens(self, tokens: Iterable[str]) -> None:
        tokens = check_special_tokens(tokens)
        for t in tokens:
            if t not in self.special_tokens:
                self.special_tokens[t] = self.vocab_size
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._special_re = None

    def special_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise InputError(f"special token {token!r} is not registered; known: {sorted(self.special_tokens)}") from None

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Ids for `text`; special-token strings become special ids only if allowed."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise InputError(f"unknown special tokens {sorted(unknown)}")
        pattern = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for m in pattern.finditer(text):
            ids.extend(self.encode_ordinary(text[start : m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text for `ids`. Byte-level kinds may produce partial UTF-8 for arbitrary id lists;
        those bytes become U+FFFD unless `errors="strict"`."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                if run:
                    out.append(self.decode_bytes(run).decode("utf-8", errors=errors))
                    run = []
                out.append(self._special_by_id[i])
            else:
                if not 0 <= i < self.base_vocab_size:
                    raise InputError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
                run.append(i)
        if run:
            out.append(self.decode_bytes(run).decode("utf-8", errors=errors))
        return "".join(out)

    def token_bytes(self, i: int) -> bytes:
        if i in self._special_by_id:
            return self._special_by_id[i].encode("utf-8")
        return self.decode_bytes([i])

    def __len__(self) -> int:
        return self.vocab_size

    # --- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The saved form. `chat_template` is written only when set, so a tokenizer without one keeps
        the file (and the fingerprint cached shards are keyed on) it had before templates existed."""
        d = {
            "lmstack_tokenizer": FORMAT_VERSION,
            "kind": self.kind,
            "special_tokens": self.special_tokens,
            **self._state(),
        }
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write one JSON file; `path` may be a directory (gets tokenizer.json) or a file."""
        p = Path(path)
        if p.suffix != ".json":
            p = p / TOKENIZER_FILE
        write_json(p, self.to_dict(), indent=None)
        return p

    def fingerprint(self) -> str:
        """Stable hash of the tokenizer, recorded in data manifests to catch mismatches."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_special_tokens(tokens: Iterable[str]) -> list[str]:
    """The special-token strings, each checked to be a non-empty string: an empty one would match
    between every two characters of a text encoded with specials allowed."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    bad = [t for t in tokens if not isinstance(t, str) or not t]
    if bad:
        raise InputError(f"special tokens must be non-empty strings, got {bad[0]!r}; drop it or give it a name")
    return tokens


def tokenizer_kinds() -> dict[str, type[Tokenizer]]:
    from lmstack.tokenizers import registry

    return registry()


def from_dict(d: dict, source: str = "tokenizer") -> Tokenizer:
    if not isinstance(d, dict) or "kind" not in d:
        raise FormatError(f"{source}: not an lmstack tokenizer file (no 'kind'); retrain or re-export it")
    kinds = tokenizer_kinds()
    if d["kind"] not in kinds:
        raise FormatError(f"{source}: unknown tokenizer kind {d['kind']!r}; known: {sorted(kinds)}")
    version = d.get("lmstack_tokenizer", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{source}: tokenizer format version {version!r}, but this lmstack reads version {FORMAT_VERSION}; "
            "upgrade lmstack, or retrain the tokenizer with this one"
        )
    specials = d.get("special_tokens", {})
    if not isinstance(specials, dict) or not all(isinstance(k, str) and k for k in specials):
        raise FormatError(f"{source}: 'special_tokens' must map non-empty strings to ids; fix the file or retrain it")
    template = d.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise FormatError(f"{source}: 'chat_template' is not a string; fix or remove it from the file")
    try:
        tok = kinds[d["kind"]]._from_state(d, {str(k): int(v) for k, v in specials.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{source}: corrupt {d['kind']} tokenizer ({type(e).__name__}: {e}); retrain it") from None
    tok.chat_template = template
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (a directory or the JSON file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    return from_dict(read_json(p, "tokenizer file"), str(p))

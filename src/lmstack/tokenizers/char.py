"""Character tokenizer: one id per character seen in training, UTF-8 byte fallback for the rest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from lmstack.errors import InputError
from lmstack.tokenizers.base import Tokenizer

N_BYTES = 256


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are characters (most frequent first); the next 256 ids are raw bytes, so any
    character not seen in training still round-trips."""

    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None):
        super().__init__(special_tokens)
        self.chars = list(chars)
        self._char_to_id = {c: i for i, c in enumerate(self.chars)}
        self._byte_offset = len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, special_tokens=()) -> "CharTokenizer":
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(t)
        if not counts:
            raise InputError("no text to train on; pass a non-empty corpus")
        n_chars = len(counts)
        if vocab_size is not None:
            least = N_BYTES + len(special_tokens) + 1
            if vocab_size < least:
                raise InputError(
                    f"--vocab-size {vocab_size} is smaller than the {N_BYTES} fallback bytes plus {len(special_tokens)} "
                    f"special tokens plus one character; use at least {least}, or omit it to keep every character"
                )
            n_chars = min(n_chars, vocab_size - N_BYTES - len(special_tokens))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        tok = cls([c for c, _ in ranked[:n_chars]])
        tok.add_special_tokens(special_tokens)
        return tok

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars) + N_BYTES

    def encode_ordinary(self, text: str) -> list[int]:
        ids = []
        lookup = self._char_to_id
        for c in text:
            i = lookup.get(c)
            if i is None:
                ids.extend(self._byte_offset + b for b in c.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if i < self._byte_offset:
                out += self.chars[i].encode("utf-8")
            else:
                out.append(i - self._byte_offset)
        return bytes(out)

    def id_to_piece(self, i: int) -> str:
        if i in self._special_by_id:
            return self._special_by_id[i]
        return self.chars[i] if i < self._byte_offset else f"<0x{i - self._byte_offset:02X}>"

    def _state(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "CharTokenizer":
        return cls(list(state["chars"]), special_tokens)

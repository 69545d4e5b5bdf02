"""Whitespace word tokenizer, the vocabulary of classic word-level LMs (n-grams, Zaremba's LSTM).

Words are maximal runs of non-whitespace; line breaks are kept as the token "\\n" so line
structure survives, and every other whitespace run becomes one space on decode. Words seen
fewer than `min_count` times map to `<unk>`. This is lossy by design (unknown words and
whitespace runs), unlike the subword kinds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import regex

from lmstack.errors import InputError
from lmstack.tokenizers.base import Tokenizer

UNK = "<unk>"
NEWLINE = "\n"
_WORD_OR_NEWLINE = regex.compile(r"\n|[^\s]+")


class WordTokenizer(Tokenizer):
    kind = "word"

    def __init__(self, words: list[str], special_tokens: dict[str, int] | None = None):
        super().__init__(special_tokens)
        self.words = list(words)  # words[0] == UNK, words[1] == NEWLINE
        self._word_to_id = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD_OR_NEWLINE.findall(text)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, min_count: int = 1, special_tokens=()) -> "WordTokenizer":
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(w for w in cls.split(t) if w != NEWLINE)
        if not counts:
            raise InputError("no words to train on; pass a non-empty corpus")
        if vocab_size is not None and vocab_size < 3:
            raise InputError(f"--vocab-size {vocab_size} leaves no room beyond <unk> and newline; use at least 3")
        ranked = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda kv: (-kv[1], kv[0]))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - 2 - len(special_tokens)]
        tok = cls([UNK, NEWLINE] + [w for w, _ in ranked])
        tok.add_special_tokens(special_tokens)
        return tok

    @property
    def base_vocab_size(self) -> int:
        return len(self.words)

    @property
    def unk_id(self) -> int:
        return 0

    def encode_ordinary(self, text: str) -> list[int]:
        lookup = self._word_to_id
        return [lookup.get(w, 0) for w in self.split(text)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out: list[str] = []
        for i in ids:
            w = self.words[i]
            if out and out[-1] != NEWLINE and w != NEWLINE:
                out.append(" ")
            out.append(w)
        return "".join(out).encode("utf-8")

    def id_to_piece(self, i: int) -> str:
        return self._special_by_id.get(i) or self.words[i]

    def _state(self) -> dict:
        return {"words": self.words}

    @classmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "WordTokenizer":
        words = list(state["words"])
        if words[:2] != [UNK, NEWLINE]:
            raise ValueError("word list must start with <unk> and newline")
        return cls(words, special_tokens)

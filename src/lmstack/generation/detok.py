"""Incremental detokenization: the text of a growing token sequence, a piece per token.

A byte-level token can end in the middle of a UTF-8 character, and some tokenizers decode a
token differently depending on its neighbour (word tokenizers insert spaces), so decoding each
token alone is wrong. As in vLLM, we decode a short window twice: from the last emitted
boundary up to the previous token and up to the new one; the difference is the new text, held
back while it ends in an incomplete character (U+FFFD). The pieces concatenate to exactly
`tokenizer.decode(all_ids)` whenever decoding a sequence extends the decoding of its prefixes. One
decoder breaks that: Hugging Face's byte fallback (Llama 2) turns a whole run of byte tokens into
U+FFFD when any byte of it is invalid, so "O" then a stray continuation byte streams as "O\ufffd"
where it decodes at once as "\ufffd\ufffd".
"""

from __future__ import annotations


class StreamDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: a boundary where decoding is stable
        self._read = 0  # ids before this have been emitted as text

    def push(self, token: int) -> str:
        """Add one token; return the new text it completes ("" while a character is partial)."""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        rest = decode(self.ids[self._prefix :])[len(decode(self.ids[self._prefix : self._read])) :]
        self._prefix = self._read = len(self.ids)
        return rest

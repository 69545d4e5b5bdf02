"""Import OpenAI's GPT-2 tokenizer files (`encoder.json` + `vocab.bpe`) with GPT-2's own ids.

GPT-2's ids already follow lmstack's BPE layout: the 256 bytes in byte-level order, then one
id per merge in `vocab.bpe` order, then `<|endoftext|>`. Importing checks that the two files
agree, so a mismatched pair fails here instead of encoding wrongly later.
"""

from __future__ import annotations

import os

from lmstack.errors import FormatError
from lmstack.io import read_json, read_text
from lmstack.tokenizers.bpe import PATTERNS, BPETokenizer, from_bytelevel


def load_gpt2(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
    """A BPETokenizer that reproduces GPT-2's ids; ids past the merges become special tokens."""
    encoder = read_json(encoder_json, "GPT-2 encoder.json")
    lines = read_text(vocab_bpe).split("\n")
    if not lines[0].startswith("#version"):
        raise FormatError(f"{vocab_bpe}: not a GPT-2 vocab.bpe (no '#version' first line); pass GPT-2's vocab.bpe")
    pairs = [line.split(" ") for line in lines[1:] if line]
    if not isinstance(encoder, dict) or any(not isinstance(i, int) for i in encoder.values()):
        raise FormatError(f"{encoder_json}: not a GPT-2 encoder.json (expected token -> id); pass GPT-2's encoder.json")
    n_ordinary = 256 + len(pairs)
    tokens: list[bytes | None] = [None] * n_ordinary
    specials: dict[str, int] = {}
    for piece, i in encoder.items():
        if 0 <= i < n_ordinary:
            tokens[i] = _bytes(piece, encoder_json)
        else:
            specials[piece] = i
    merges = []
    for k, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] not in encoder or pair[1] not in encoder:
            raise FormatError(
                f"{vocab_bpe}: merge line {k + 2} {' '.join(pair)!r} names tokens that encoder.json "
                "lacks; pass the vocab.bpe that belongs to this encoder.json"
            )
        a, b = encoder[pair[0]], encoder[pair[1]]
        if tokens[256 + k] != _bytes(pair[0] + pair[1], vocab_bpe):
            raise FormatError(
                f"{vocab_bpe}: merge {k} makes {pair[0] + pair[1]!r} but id {256 + k} of "
                f"{encoder_json} is another token; the two files do not belong together"
            )
        merges.append((a, b))
    try:
        return BPETokenizer(tokens, merges, PATTERNS["gpt2"], specials)
    except ValueError as e:
        raise FormatError(f"{encoder_json}: not a complete GPT-2 vocabulary ({e})") from None


def _bytes(piece: str, source) -> bytes:
    try:
        return from_bytelevel(piece)
    except ValueError as e:
        raise FormatError(f"{source}: {e}; pass GPT-2's original files") from None

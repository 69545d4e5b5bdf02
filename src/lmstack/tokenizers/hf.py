"""Hugging Face `tokenizer.json` export and import for byte-level BPE.

Export writes the pre-tokenization regex as a `Split` followed by a `ByteLevel` step without
its own regex, the BPE model with `ignore_merges` (a chunk that is already a token stays one
token, as in tiktoken and lmstack), and the special tokens as added tokens, so
`tokenizers.Tokenizer.from_file` gives lmstack's ids. Import reads such files and Hugging
Face's own byte-level BPE files (GPT-2's ByteLevel pre-tokenizer, special tokens at any id).
"""

from __future__ import annotations

import os

from lmstack.errors import FormatError
from lmstack.io import read_json, write_json
from lmstack.tokenizers.bpe import PATTERNS, BPETokenizer, from_bytelevel, to_bytelevel


def to_hf_dict(tok: BPETokenizer) -> dict:
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    vocab = {to_bytelevel(t): i for i, t in enumerate(tok.tokens) if t is not None}
    # Specials belong in the model vocab too, or HF re-numbers them (clashing with real ids).
    vocab.update(tok.special_tokens)
    pieces = [None if t is None else to_bytelevel(t) for t in tok.tokens]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [[pieces[a], pieces[b]] for a, b in tok.merges],
        },
    }


def save_hf(tok: BPETokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as a Hugging Face tokenizer.json (atomically)."""
    write_json(path, to_hf_dict(tok), indent=None)


def load_hf(path: str | os.PathLike) -> BPETokenizer:
    """A BPETokenizer from a Hugging Face byte-level BPE tokenizer.json, keeping its ids."""
    d = read_json(path, "Hugging Face tokenizer.json")
    try:
        return from_hf_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(
            f"{path}: not a usable byte-level BPE tokenizer.json ({type(e).__name__}: {e}); "
            "export it again with tokenizers' Tokenizer.save"
        ) from None


def from_hf_dict(d: dict) -> BPETokenizer:
    model = d["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"model type is {model.get('type')!r}, not BPE")
    if d.get("normalizer") is not None:
        raise ValueError("files with a normalizer are not supported (lmstack BPE encodes raw text)")
    pattern = _pattern(d.get("pre_tokenizer"))
    specials = {t["content"]: int(t["id"]) for t in d.get("added_tokens", [])}
    vocab = model["vocab"]
    tokens: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    special_ids = set(specials.values())
    for piece, i in vocab.items():
        if i not in special_ids:
            tokens[i] = from_bytelevel(piece)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return BPETokenizer(tokens, [(vocab[a], vocab[b]) for a, b in merges], pattern, specials)


def _pattern(pre: dict | None) -> str:
    """The regex of a byte-level pre-tokenizer: ByteLevel alone, or Split + ByteLevel."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if not steps or not steps[-1] or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise ValueError("the pre-tokenizer is not byte-level without prefix space")
    if len(steps) == 1 and steps[0].get("use_regex", True):
        return PATTERNS["gpt2"]
    if len(steps) == 2 and steps[0].get("type") == "Split" and not steps[-1].get("use_regex", True):
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise ValueError("the pre-tokenizer is not ByteLevel or an isolating regex Split followed by ByteLevel")

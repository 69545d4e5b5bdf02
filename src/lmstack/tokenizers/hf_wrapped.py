"""Any Hugging Face `tokenizer.json` as an lmstack tokenizer, run by HF's `tokenizers` library.

For the tokenizers lmstack's own kinds cannot reproduce exactly (SentencePiece-style Unigram as
in T5, BPE with byte fallback as in Llama 2, BERT's WordPiece), so that imported checkpoints
keep the ids they were trained on. Ids are HF's, special tokens included; the end of text
(`eot_id`) is the model's end-of-sequence token (`</s>`, or `[SEP]` for BERT).

Encoding never adds the post-processor's tokens ([CLS] ... [SEP], a final </s>): lmstack
places its own, except in `prompt_ids`, the form a prompt (or a T5 source) is given to the model.
Special-token strings in plain text are text, except that a Unigram
vocabulary holds its specials as pieces, which text can spell (as in HF). Like the word
tokenizer this kind is lossy: normalisation (NFKC, lower-casing, accent stripping) and <unk>
change the text, so decode(encode(s)) need not be s. Decoding is HF's, with special tokens
shown (as `transformers` decodes by default).

lmstack's tokenizer.json (kind "hf") embeds the HF file as a JSON object; loading it parses
data and never runs code. Needs `pip install 'lmstack[hf]'`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from lmstack.errors import FormatError, InputError
from lmstack.io import read_json
from lmstack.tokenizers.base import Tokenizer

# The token roles transformers names in tokenizer_config.json / special_tokens_map.json.
ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def installed() -> bool:
    """Whether Hugging Face's tokenizers library, the engine of this kind, can be imported."""
    try:
        importlib.import_module("tokenizers")
    except ImportError:
        return False
    return True


def load_tokenizer_json(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer | None:
    """A Hugging Face tokenizer.json with its ids: lmstack's own exact BPE where it represents the
    file (byte-level BPE), else the file run by Hugging Face's tokenizers library; None when that
    library is not installed."""
    from lmstack.tokenizers.hf import load_hf

    try:
        return load_hf(path)
    except FormatError:
        return HFTokenizer.from_dir(path, vocab_size) if installed() else None


def _engine():
    if not installed():
        raise InputError(
            "this tokenizer runs on Hugging Face's tokenizers library, which is not installed; pip install 'lmstack[hf]'"
        )
    return importlib.import_module("tokenizers")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer; `roles` maps HF's role names (eos_token, sep_token, ...) to tokens.

    `vocab_size` may exceed the file's vocabulary when the model's does (T5 pads 32100 tokens to
    32128 embedding rows): those ids are valid but have no text, as in HF (decode skips them)."""

    kind = "hf"

    def __init__(
        self, hf_json: dict, roles: dict[str, str], special_tokens: dict[str, int] | None = None, vocab_size: int | None = None
    ):
        engine = _engine()
        try:
            hf = engine.Tokenizer.from_str(json.dumps(hf_json))
        except Exception as e:  # the Rust side raises plain Exception for any malformed file
            raise FormatError(
                f"not a Hugging Face tokenizer.json that the tokenizers library reads ({e}); "
                "save it again with transformers' save_pretrained"
            ) from None
        hf.no_truncation()
        hf.no_padding()
        hf.encode_special_tokens = True  # special-token strings in plain text are text (the contract)
        self._hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        self._size = max(len(vocab), vocab_size or 0)
        self.roles = {r: t for r, t in roles.items() if t in vocab}
        if special_tokens is None:
            added = hf.get_added_tokens_decoder()
            special_tokens = {t.content: i for i, t in added.items() if t.special}
            special_tokens |= {t: vocab[t] for t in self.roles.values()}
        super().__init__(special_tokens)

    @classmethod
    def from_dir(cls, hf_dir: str | os.PathLike, vocab_size: int | None = None) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model directory (its `tokenizer.json`, or that file
        itself), with its roles read from the tokenizer_config.json, special_tokens_map.json and
        config.json's eos_token_id beside it; `vocab_size` is the model's."""
        file = Path(hf_dir) if Path(hf_dir).is_file() else Path(hf_dir) / "tokenizer.json"
        p = file.parent
        hf_json = read_json(file, "Hugging Face tokenizer.json")
        roles: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if (p / name).is_file():
                found = read_json(p / name, f"Hugging Face {name}")
                roles |= {r: t for r in ROLES if (t := _content(found.get(r)))}
        try:
            tok = cls(hf_json, roles, vocab_size=vocab_size)
        except FormatError as e:
            raise FormatError(f"{file}: {e}") from None
        config = read_json(p / "config.json", "Hugging Face config") if (p / "config.json").is_file() else {}
        eos = config.get("eos_token_id")
        eos = tok._hf.id_to_token(eos) if isinstance(eos, int) else None
        if "eos_token" not in tok.roles and eos is not None:
            tok.roles["eos_token"] = eos
            tok.add_special_tokens([eos])  # a token of the vocabulary keeps its id
        return tok

    @classmethod
    def train(cls, texts, vocab_size, special_tokens=(), **opts):
        raise InputError(
            "an hf tokenizer is imported with a Hugging Face checkpoint (lmstack convert), not trained; "
            "train a bpe, unigram, char or word tokenizer instead"
        )

    @property
    def base_vocab_size(self) -> int:
        return self._size

    @property
    def eot_id(self) -> int | None:
        token = self.roles.get("eos_token") or self.roles.get("sep_token")
        return None if token is None else self.special_tokens.get(token)

    def role_id(self, role: str) -> int | None:
        """The id of the token with an HF role ("mask_token", "cls_token", ...), None if it has none."""
        token = self.roles.get(role)
        return None if token is None else self.special_tokens.get(token)

    def add_special_tokens(self, tokens: Iterable[str]) -> None:
        """New specials go into the HF engine too, which picks their ids (an existing token keeps its own)."""
        new = [t for t in tokens if t not in self.special_tokens]
        self._hf.add_special_tokens(new)
        self._size = max(self._size, self._hf.get_vocab_size(with_added_tokens=True))
        self.special_tokens |= {t: self._hf.token_to_id(t) for t in new}
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._special_re = None

    def encode_ordinary(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        """A model input as its checkpoint was trained to see one: the post-processor's tokens
        around the text (Llama 2's <s> before it, the </s> that ends a T5 source)."""
        return self._hf.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """HF's decoding of the whole sequence (a WordPiece or Metaspace decoder joins tokens by
        their neighbours); byte-fallback bytes that form no character are already U+FFFD, and
        ids past the file's vocabulary (the model's padding) have no text."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}")
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise InputError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        piece = self._hf.id_to_token(int(i))
        return f"<unused {i}>" if piece is None else piece

    def hf_dict(self) -> dict:
        """The Hugging Face tokenizer.json, as `tokenizers.Tokenizer.from_str` reads it."""
        return json.loads(self._hf.to_str())

    def _state(self) -> dict:
        return {"roles": self.roles, "vocab_size": self._size, "hf": self.hf_dict()}

    @classmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "HFTokenizer":
        return cls(state["hf"], dict(state["roles"]), special_tokens, int(state["vocab_size"]))


def _content(token) -> str | None:
    """A role's token as transformers writes it: a string or an AddedToken dict."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None

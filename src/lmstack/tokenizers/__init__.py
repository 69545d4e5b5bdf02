"""Tokenizers behind one contract (see base.Tokenizer): byte-level BPE, Unigram, char, word, and
"hf" (an imported Hugging Face tokenizer.json, loaded but never trained: not in KINDS)."""

from lmstack.tokenizers.base import (
    BOS,
    CHAT_ROLES,
    EOT,
    MASK,
    PAD,
    Tokenizer,
    from_dict,
    load_tokenizer,
)

KINDS = ("bpe", "unigram", "char", "word")


def registry() -> dict[str, type[Tokenizer]]:
    """kind name -> class; imported lazily so `import lmstack` stays fast."""
    from lmstack.tokenizers.bpe import BPETokenizer
    from lmstack.tokenizers.char import CharTokenizer
    from lmstack.tokenizers.hf_wrapped import HFTokenizer
    from lmstack.tokenizers.word import WordTokenizer

    kinds: dict[str, type[Tokenizer]] = {"bpe": BPETokenizer, "char": CharTokenizer, "word": WordTokenizer, "hf": HFTokenizer}
    try:
        from lmstack.tokenizers.unigram import UnigramTokenizer

        kinds["unigram"] = UnigramTokenizer
    except ImportError:  # pragma: no cover
        pass
    return kinds


__all__ = ["Tokenizer", "load_tokenizer", "from_dict", "registry", "EOT", "PAD", "MASK", "BOS", "CHAT_ROLES", "KINDS"]

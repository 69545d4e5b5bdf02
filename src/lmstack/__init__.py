"""lmstack: the whole language-model stack in one package.

A language model is a probability distribution over token sequences,
p(x_1..x_L) = prod_i p(x_i | x_<i); every model family implements that one contract.
"""

__version__ = "0.1.0"

from lmstack.errors import LmstackError  # noqa: E402

__all__ = ["__version__", "LmstackError"]


def load(path):
    """Load a checkpoint directory (or an ARPA file) -> (model, tokenizer or None)."""
    from lmstack.models.checkpoint import load as _load

    return _load(path)


__all__ += ["load"]

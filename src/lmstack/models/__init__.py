"""Model families on one contract (base.LanguageModel) and the checkpoint format."""

from lmstack.models.base import LanguageModel
from lmstack.models.checkpoint import FAMILIES, load

__all__ = ["LanguageModel", "FAMILIES", "load"]

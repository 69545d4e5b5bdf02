"""Decoding settings, one dataclass per row, so a batch can mix greedy and sampled rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmstack.errors import InputError


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop.

    Transforms apply in this order to the model's log-probabilities: repetition penalty,
    frequency / presence penalties, temperature, top-k, top-p, min-p (the order of Hugging Face
    and vLLM). `temperature=0` is greedy decoding (the penalties still apply)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set holding this much probability; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    # log p -> penalty * log p for every token already in the prompt or the output (CTRL's
    # penalty, applied to log-probabilities: p -> p^penalty, so > 1 always discourages a repeat).
    repetition_penalty: float = 1.0
    # OpenAI's penalties on the output so far: log p -= count * frequency + (count > 0) * presence.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (need a tokenizer); not in the text
    stop_at_eot: bool = True  # end at the tokenizer's <|endoftext|> (never part of the output)
    seed: int | None = None  # makes this row's sampling reproducible, whatever else is in the batch

    def __post_init__(self):
        self.stop = tuple(self.stop)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            check_finite(name, getattr(self, name))
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 0, ">= 0"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 turns it off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 turns it off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 turns it off)"),
            ("stop", all(self.stop), "a list of non-empty strings"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"{name} must be {rule}; got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_finite(name: str, value) -> None:
    """inf and nan pass every comparison check or fail it with a confusing rule, so name them first."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number; got {value!r}")

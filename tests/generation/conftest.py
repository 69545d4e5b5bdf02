"""A toy language model on the contract: a fixed bigram table, so every expected output can be
computed by hand, independently of the model families being written beside this layer."""

import pytest
import torch

from lmstack.models.base import LanguageModel


class BigramLM(LanguageModel):
    """p(next | previous token) = table[previous]. Counts the tokens fed to it, so tests can
    check that decoding never recomputes a prefix."""

    family = "toy-bigram"

    def __init__(self, table: torch.Tensor, max_context: int | None = None, reorderable: bool = True):
        self.table = table.log_softmax(-1)
        self.vocab_size = table.shape[-1]
        self.max_context = max_context
        self.reorderable = reorderable
        self.fed = 0

    def next_token_logprobs(self, tokens):
        return self.table[tokens]

    def start(self, prompt, lengths=None):
        self.check_context(prompt.shape[1])
        self.fed += prompt.numel() if lengths is None else int(lengths.sum())
        return (prompt[:, -1], prompt.shape[1]), self.table[prompt[:, -1]]

    def step(self, state, tokens):
        length = state[1] + 1
        self.check_context(length)
        self.fed += tokens.numel()
        return (tokens, length), self.table[tokens]

    def reorder(self, state, index):
        if not self.reorderable:
            raise NotImplementedError
        return state[0][index], state[1]


def random_bigram(vocab: int, seed: int = 0, sharpness: float = 3.0, **kw) -> BigramLM:
    g = torch.Generator().manual_seed(seed)
    return BigramLM(sharpness * torch.randn(vocab, vocab, generator=g), **kw)


@pytest.fixture
def bigram():
    return random_bigram(12)

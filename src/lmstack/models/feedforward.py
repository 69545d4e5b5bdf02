"""Feed-forward neural n-gram LM (Bengio et al. 2003): p(x_t | x_{t-n+1..t-1}) from an MLP.

The last n-1 token embeddings are concatenated, passed through tanh hidden layers and a softmax
over the vocabulary; an optional direct connection from the concatenated embeddings to the
output is the paper's "W x" term. Positions before the start of a sequence use one extra learned
embedding row (index `vocab_size`), so every position has a full window and the model needs no
special begin token. The window is fixed, so sequences of any length can be scored
(`max_context` is None): the decoding state is just the last n-1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError, InputError
from lmstack.models.base import LanguageModel, padding_mask
from lmstack.models.checkpoint import TorchCheckpoint
from lmstack.models.sizes import Presets

PRESETS = {
    "tiny": dict(order=3, d_embed=8, d_hidden=16),
    # the scale of Bengio et al. 2003's models: 5-gram, 60-d features, 100 hidden units, direct connections
    "bengio-2003": dict(order=5, d_embed=60, d_hidden=100, direct=True),
}


@dataclass
class FeedForwardConfig(Presets):
    FAMILY: ClassVar[str] = "ffn"
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    vocab_size: int = 256
    order: int = 4  # n: the model conditions on the previous n-1 tokens
    d_embed: int = 64
    d_hidden: int = 256
    n_hidden_layers: int = 1
    dropout: float = 0.0
    direct: bool = False  # Bengio's direct embeddings -> output connection

    def __post_init__(self):
        if self.order < 2:
            raise ConfigError(f"order must be >= 2 (an n-gram conditions on n-1 >= 1 tokens), got {self.order}")
        if min(self.vocab_size, self.d_embed, self.d_hidden) < 1 or self.n_hidden_layers < 1:
            raise ConfigError("vocab_size, d_embed, d_hidden and n_hidden_layers must be positive")

    @classmethod
    def sized(cls, dial: int, **overrides) -> "FeedForwardConfig":
        """One size dial: d_embed = 16·dial, d_hidden = 64·dial."""
        return cls(**{"d_embed": 16 * dial, "d_hidden": 64 * dial, **overrides})


class FeedForwardLM(nn.Module, LanguageModel, TorchCheckpoint):
    family = "ffn"
    config_class = FeedForwardConfig

    def __init__(self, config: FeedForwardConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.window = config.order - 1
        self.embed = nn.Embedding(config.vocab_size + 1, config.d_embed)  # last row: "before start"
        d_in = self.window * config.d_embed
        layers: list[nn.Module] = []
        for i in range(config.n_hidden_layers):
            layers += [nn.Linear(d_in if i == 0 else config.d_hidden, config.d_hidden), nn.Tanh(), nn.Dropout(config.dropout)]
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(config.d_hidden, config.vocab_size)
        self.direct = nn.Linear(d_in, config.vocab_size, bias=False) if config.direct else None

    def _windows(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, n-1]: the n-1 tokens ending at each position, left-filled with the start row."""
        pad = idx.new_full((idx.shape[0], self.window - 1), self.vocab_size)
        return torch.cat([pad, idx], dim=1).unfold(1, self.window, 1)

    def _logits(self, windows: torch.Tensor) -> torch.Tensor:
        x = self.embed(windows).flatten(-2)  # [..., (n-1)·d_embed]
        logits = self.out(self.hidden(x))
        return logits + self.direct(x) if self.direct is not None else logits

    def _check_ids(self, idx: torch.Tensor) -> None:
        """Checked on every path, training included: id `vocab_size` would silently read the start row."""
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise InputError(f"token ids must be in [0, {self.vocab_size}); got range [{int(idx.min())}, {int(idx.max())}]")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """[B, T] ids -> logits [B, T, V] for the token after each position (+ mean CE vs targets)."""
        self._check_ids(idx)
        logits = self._logits(self._windows(idx))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def next_token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self(tokens).float(), dim=-1)

    # The state is the last n-1 tokens, start rows included: [B, n-1].
    def start(self, prompt: torch.Tensor, lengths: torch.Tensor | None = None):
        pad = padding_mask(prompt, lengths)
        self._check_ids(prompt if pad is None else prompt.masked_fill(pad, 0))
        if pad is not None:  # padding reads as "before the start", exactly what a shorter prompt sees
            prompt = prompt.masked_fill(pad, self.vocab_size)
        empty = prompt.new_full((prompt.shape[0], self.window), self.vocab_size)
        state = self._windows(prompt)[:, -1] if prompt.shape[1] else empty
        return state, F.log_softmax(self._logits(state).float(), dim=-1)

    def step(self, state: torch.Tensor, tokens: torch.Tensor):
        self._check_ids(tokens)
        state = torch.cat([state[:, 1:], tokens[:, None]], dim=1)
        return state, F.log_softmax(self._logits(state).float(), dim=-1)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; `non_embedding`: only the hidden layers (Kaplan et al.'s N, as for GPT)."""
        return sum(p.numel() for p in (self.hidden if non_embedding else self).parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token, the convention of `GPT.flops_per_token`: forward = 2 × every
        weight matrix (hidden, output, direct; the lookup table and biases excluded), training
        3× forward. `seq_len` does not matter: the window is fixed."""
        forward = 2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 3 * forward if training else forward

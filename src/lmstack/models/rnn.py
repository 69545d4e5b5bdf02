"""Recurrent LMs (vanilla RNN, LSTM, GRU) and a bidirectional encoder for ELMo-style features.

`RNNLM` is the Zaremba et al. (2014) setup: embedding -> dropout -> multi-layer recurrent stack
(dropout between layers, never on the recurrent connections) -> dropout -> softmax, with optional
tied input/output embeddings (Press & Wolf 2017). The decoding state is the hidden state ((h, c)
for an LSTM), so `max_context` is None and any length can be scored. `run(idx, state)` carries the
state across calls for truncated back-propagation through time.

`BiRNNEncoder` is ELMo's biLM (Peters et al. 2018): a forward and a backward recurrent stack that
share the embedding and the softmax; its per-layer features feed a downstream task.
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

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # weight blocks per layer, for FLOP counts


PRESETS = {
    "tiny": dict(d_embed=16, d_hidden=16, n_layers=2),
    # Zaremba et al. 2014, Penn Treebank (10k words): 2-layer LSTMs, dropout 0.5 / 0.65, untied.
    "zaremba-medium": dict(vocab_size=10000, cell="lstm", d_embed=650, d_hidden=650, n_layers=2, dropout=0.5),
    "zaremba-large": dict(vocab_size=10000, cell="lstm", d_embed=1500, d_hidden=1500, n_layers=2, dropout=0.65),
}


@dataclass
class RNNConfig(Presets):
    FAMILY: ClassVar[str] = "rnn"
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    vocab_size: int = 256
    cell: str = "lstm"  # rnn | lstm | gru
    d_embed: int = 256
    d_hidden: int = 256
    n_layers: int = 2
    dropout: float = 0.0  # on the embeddings, between layers and before the softmax
    tie_weights: bool = False

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if min(self.vocab_size, self.d_embed, self.d_hidden, self.n_layers) < 1:
            raise ConfigError("vocab_size, d_embed, d_hidden and n_layers must be positive")
        if self.tie_weights and self.d_embed != self.d_hidden:
            raise ConfigError(f"tie_weights needs d_embed == d_hidden (got {self.d_embed} and {self.d_hidden})")

    @classmethod
    def sized(cls, dial: int, **overrides) -> "RNNConfig":
        """One size dial: 2 layers of 64·dial units, embeddings the same width."""
        return cls(**{"d_embed": 64 * dial, "d_hidden": 64 * dial, "n_layers": 2, **overrides})


def _stack(config: RNNConfig) -> nn.Module:
    return CELLS[config.cell](
        config.d_embed,
        config.d_hidden,
        num_layers=config.n_layers,
        dropout=config.dropout if config.n_layers > 1 else 0.0,
        batch_first=True,
    )


def _check_ids(idx: torch.Tensor, vocab_size: int) -> None:
    if idx.numel() and (idx.min() < 0 or idx.max() >= vocab_size):
        raise InputError(f"token ids must be in [0, {vocab_size}); got range [{int(idx.min())}, {int(idx.max())}]")


def _forward_flops(config: RNNConfig) -> int:
    """Forward matmul FLOPs per token: 2 × the recurrent stack's input and hidden matrices plus
    the output projection (lookups, biases and the elementwise gate maths excluded)."""
    c = config
    per_layer = [_GATES[c.cell] * c.d_hidden * ((c.d_embed if i == 0 else c.d_hidden) + c.d_hidden) for i in range(c.n_layers)]
    return 2 * (sum(per_layer) + c.d_hidden * c.vocab_size)


class RNNLM(nn.Module, LanguageModel, TorchCheckpoint):
    family = "rnn"
    config_class = RNNConfig
    max_context = None

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = _stack(config)
        self.out = nn.Linear(config.d_hidden, config.vocab_size)
        if config.tie_weights:
            self.out.weight = self.embed.weight

    def run(self, idx: torch.Tensor, state=None):
        """[B, T] ids (+ state from a previous call) -> (logits [B, T, V], new state)."""
        _check_ids(idx, self.vocab_size)
        h, state = self.rnn(self.drop(self.embed(idx)), state)
        return self.out(self.drop(h)), state

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, _ = self.run(idx)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def next_token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self(tokens).float(), dim=-1)

    def start(self, prompt: torch.Tensor, lengths: torch.Tensor | None = None):
        if prompt.shape[1] == 0:
            raise InputError("an RNN LM needs at least one prompt token (e.g. the end-of-text id) to start from")
        pad = padding_mask(prompt, lengths)
        if pad is None:
            logits, state = self.run(prompt)
            return state, F.log_softmax(logits[:, -1].float(), dim=-1)
        # Padding would flow through the recurrence, so the rows are left-aligned and packed: each
        # row's state is taken after its own last token.
        T, skip = prompt.shape[1], pad.sum(1)
        aligned = prompt.masked_fill(pad, 0).gather(1, (torch.arange(T, device=prompt.device) + skip[:, None]) % T)
        _check_ids(aligned, self.vocab_size)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.embed(aligned)), (T - skip).cpu(), batch_first=True, enforce_sorted=False
        )
        _, state = self.rnn(packed)
        last = (state[0] if isinstance(state, tuple) else state)[-1]  # the top layer's output at each row's end
        return state, F.log_softmax(self.out(self.drop(last)).float(), dim=-1)

    def step(self, state, tokens: torch.Tensor):
        logits, state = self.run(tokens[:, None], state)
        return state, F.log_softmax(logits[:, -1].float(), dim=-1)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once; `non_embedding`: only the recurrent stack
        (Kaplan et al.'s N, as for GPT: no embedding, no output layer)."""
        return sum(p.numel() for p in (self.rnn if non_embedding else self).parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token, the convention of `GPT.flops_per_token` (training = 3× forward);
        `seq_len` does not matter for an RNN."""
        return (3 if training else 1) * _forward_flops(self.config)


def _reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first `length` steps of each row of [B, T, ...]; the padding after them stays put."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class BiRNNEncoder(nn.Module, TorchCheckpoint):
    """ELMo's biLM: forward and backward stacks over shared embeddings and softmax.

    `forward(idx, mask)` returns the n_layers + 1 feature tensors ELMo mixes: the token
    embeddings, then each layer's [forward; backward] hidden states, each [B, T, width].
    Sequences are left-aligned; `mask` ([B, T], 1 = token) marks their lengths.
    """

    family = "birnn"
    config_class = RNNConfig

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.drop = nn.Dropout(config.dropout)
        # One module per layer (not one multi-layer stack) because ELMo reads every layer's output.
        self.fwd, self.bwd = self._layers(config), self._layers(config)
        self.out = nn.Linear(config.d_hidden, config.vocab_size)
        if config.tie_weights:
            self.out.weight = self.embed.weight

    @staticmethod
    def _layers(c: RNNConfig) -> nn.ModuleList:
        return nn.ModuleList(
            CELLS[c.cell](c.d_embed if i == 0 else c.d_hidden, c.d_hidden, batch_first=True) for i in range(c.n_layers)
        )

    def _directions(self, idx: torch.Tensor, mask: torch.Tensor | None):
        """(embeddings, per-layer forward states, per-layer backward states in forward order)."""
        _check_ids(idx, self.config.vocab_size)
        lengths = mask.long().sum(1) if mask is not None else torch.full((idx.shape[0],), idx.shape[1], device=idx.device)
        e = self.embed(idx)
        hf, hb = [], []
        x_f, x_b = self.drop(e), self.drop(_reverse_padded(e, lengths))
        for i in range(self.config.n_layers):
            x_f, _ = self.fwd[i](x_f if i == 0 else self.drop(x_f))
            x_b, _ = self.bwd[i](x_b if i == 0 else self.drop(x_b))
            hf.append(x_f)
            hb.append(_reverse_padded(x_b, lengths))
        return e, hf, hb

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        e, hf, hb = self._directions(idx, mask)
        return [torch.cat([e, e], -1)] + [torch.cat(pair, -1) for pair in zip(hf, hb)]

    def bilm_loss(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the forward (predict x_{t+1}) and backward (predict x_{t-1}) cross-entropies."""
        _, hf, hb = self._directions(idx, mask)
        keep = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool()
        # The prediction made at position t counts only if t is a token; left-aligned rows make
        # that the same condition for both directions: position 1..T-1 is real.
        nxt = idx[:, 1:].masked_fill(~keep[:, 1:], -100)
        prv = idx[:, :-1].masked_fill(~keep[:, 1:], -100)
        lf = self.out(self.drop(hf[-1][:, :-1]))
        lb = self.out(self.drop(hb[-1][:, 1:]))
        return 0.5 * (
            F.cross_entropy(lf.flatten(0, 1), nxt.flatten(), ignore_index=-100)
            + F.cross_entropy(lb.flatten(0, 1), prv.flatten(), ignore_index=-100)
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Two directions of `RNNLM`'s count (each runs the shared softmax projection)."""
        return 2 * (3 if training else 1) * _forward_flops(self.config)

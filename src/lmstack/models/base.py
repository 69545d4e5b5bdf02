"""The language-model contract every family implements.

A language model is a distribution over token sequences, p(x_1..x_L) = prod_i p(x_i | x_<i).
Perplexity, sampling, beam search and serving are written once against this class, so an
n-gram, an LSTM and a GPT are interchangeable above this layer.

Two views of the same distribution:
- batch view, `next_token_logprobs(tokens)`: log p(x_{t+1} = v | x_<=t) for every position t
  of a [B, T] batch, shape [B, T, V] (training, scoring, perplexity);
- incremental view, `start(prompt, lengths)` then `step(state, token)`: a decoding state (KV cache,
  RNN hidden state, n-gram context) that takes a whole batch of prompts in one pass, then is fed
  one token per row at a time, never recomputing the prefix.
Both return natural-log probabilities that sum to 1 over the vocabulary.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from lmstack.errors import ContextLengthError, InputError

DecodingState = Any


class LanguageModel:
    """Mixin for every causal family (neural ones also inherit from `torch.nn.Module`)."""

    family: str = ""
    vocab_size: int
    #: longest sequence the model can condition on; None means unbounded (n-gram, RNN).
    max_context: int | None = None

    @abstractmethod
    def next_token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, V] log p(next token | tokens up to and including t)."""

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T-1]: log p(x_t | x_<t) for t = 1..T-1 (x_0 is given context).

        Families with a cheaper way to score only the observed tokens override this."""
        lp = self.next_token_logprobs(tokens[:, :-1])
        return lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)

    @abstractmethod
    def start(self, prompt: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[DecodingState, torch.Tensor]:
        """Feed [B, T] prompt ids; return (state, [B, V] log-probs of the next token).

        `lengths` [B] lets prompts of different lengths share a batch: row b is left-padded, its
        prompt is its last lengths[b] ids, and what the padding holds changes nothing (None: every
        row is T tokens). Left padding lines the rows' ends up, so every later `step` appends one
        token to each row at the same place."""

    @abstractmethod
    def step(self, state: DecodingState, tokens: torch.Tensor) -> tuple[DecodingState, torch.Tensor]:
        """Append one [B] token per row; return (new state, [B, V] next-token log-probs)."""

    def reorder(self, state: DecodingState, index: torch.Tensor) -> DecodingState:
        """Rows `index` ([B'] ids into the batch, repeats allowed) of a decoding state, in that
        order: beam search keeps its best beams' states with it. Optional; without it beam search
        restarts the beams from their tokens (correct, but it recomputes the prefix)."""
        raise NotImplementedError

    def check_context(self, length: int) -> None:
        if self.max_context is not None and length > self.max_context:
            raise ContextLengthError(
                f"sequence of {length} tokens is longer than the model's context of {self.max_context}; "
                "shorten the input (prompt plus new tokens); long texts are scored with `eval perplexity --mode stream`"
            )


def padding_mask(prompt: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] True where `start`'s left-padded prompt holds padding, or None if no row is padded."""
    if lengths is None:
        return None
    T = prompt.shape[1]
    lengths = torch.as_tensor(lengths, device=prompt.device)
    if lengths.shape != prompt.shape[:1] or (lengths < 1).any() or (lengths > T).any():
        raise InputError(f"lengths must give one length in [1, {T}] per prompt row; got {lengths.tolist()}")
    if (lengths == T).all():
        return None
    return torch.arange(T, device=prompt.device)[None, :] < (T - lengths)[:, None]


def grow_vocab(model, vocab_size: int):
    """A copy of a neural model with `vocab_size` ids instead of fewer (new special tokens): every
    tensor with a vocabulary dimension (embedding, output head and its bias) keeps its rows, and
    each new row is the mean of the old ones (Hugging Face's mean resizing, without its noise),
    so a new token starts as an average token, not a random one that would disturb the outputs."""
    import dataclasses

    old_vocab = model.config.vocab_size
    if vocab_size < old_vocab:
        raise InputError(f"the tokenizer has {vocab_size} ids but the model {old_vocab}; a vocabulary only grows")
    if model.family == "ffn":  # its embedding's last row means "before the start", so rows cannot simply be added
        raise InputError(
            "a feed-forward model cannot grow its vocabulary; use a tokenizer that already has the "
            "special tokens (e.g. `lmstack tokenizer train --special`)"
        )
    grown = type(model)(dataclasses.replace(model.config, vocab_size=vocab_size))
    old = model.state_dict()
    with torch.no_grad():
        for name, t in grown.state_dict().items():
            src = old[name]
            if t.shape != src.shape:
                dim = next(d for d, (a, b) in enumerate(zip(t.shape, src.shape)) if a != b)
                mean = src.float().mean(dim, keepdim=True).to(src.dtype)
                src = torch.cat(
                    [src, mean.expand(*[vocab_size - old_vocab if d == dim else n for d, n in enumerate(src.shape)])], dim
                )
            t.copy_(src)
    return grown.to(next(model.parameters()).device).train(model.training)


@torch.no_grad()
def input_major(model) -> None:
    """Lay out every linear layer's weight input-major in memory (in place), as transformers'
    Conv1D stores GPT-2's: a CPU (MKL) multiplies a decoding step's few rows by that layout up to
    2.4x faster and splits the product across threads, which it barely does for the row-major one
    (a served GPT of width 512 decodes 32 rows 1.05-1.1x faster on one thread, 1.4x on two; see
    benchmarks/RESULTS.md). Values, shapes and names stay; `weight` becomes the transpose of a
    contiguous [in, out] tensor. A weight an embedding shares (a tied output head) keeps its
    layout, since an embedding reads its rows. For decoding (`lmstack serve`, `lmstack generate`),
    not training, whose gradients would take the same layout. On a GPU, where cuBLAS reads both
    layouts alike, nothing changes."""
    if not isinstance(model, torch.nn.Module):
        return
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and id(weight) not in tied and weight.device.type == "cpu" and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()

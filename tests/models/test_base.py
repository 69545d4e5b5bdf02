"""The contract's batched start: left-padded prompts of different lengths decode exactly as each
prompt alone, for every family that generates (T5 reads its prompt as the source)."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import InputError
from lmstack.models.base import input_major
from lmstack.models.feedforward import FeedForwardConfig, FeedForwardLM
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.ngram import NGramLM
from lmstack.models.rnn import RNNLM, RNNConfig
from lmstack.models.t5 import T5, T5Config

V = 23


def _ngram():
    words = [f"w{i}" for i in range(V - 4)]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(9)) for i in range(40)]
    return NGramLM.train_texts(lines, order=3, discount_fallback=True)


FAMILIES = {
    "gpt-learned": lambda: GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)),
    "gpt-sinusoidal-postnorm": lambda: GPT(
        GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, pos="sinusoidal", prenorm=False)
    ),
    "gpt-llama-gqa": lambda: GPT(GPTConfig.preset("tiny-llama", vocab_size=V)),
    "lstm": lambda: RNNLM(RNNConfig(vocab_size=V, cell="lstm", d_embed=8, d_hidden=8, n_layers=2)),
    "gru": lambda: RNNLM(RNNConfig(vocab_size=V, cell="gru", d_embed=8, d_hidden=8, n_layers=1)),
    "feedforward": lambda: FeedForwardLM(FeedForwardConfig(vocab_size=V, order=4, d_embed=5, d_hidden=7)),
    "ngram": _ngram,
    "t5": lambda: T5(T5Config.preset("tiny", vocab_size=V, dropout=0.0)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_decodes_each_row_as_alone(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if isinstance(model, torch.nn.Module):
        model.eval()
    vocab = model.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (n,), generator=g) for n in (5, 1, 3, 5)]
    T = max(len(p) for p in prompts)
    # Padding filled with real-looking ids: they must change nothing.
    padded = torch.stack([torch.cat([torch.randint(2, vocab, (T - len(p),), generator=g), p]) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    nxt = torch.randint(2, vocab, (3, len(prompts)), generator=g)
    with torch.no_grad():
        state, lp = model.start(padded, lengths)
        batched = [lp]
        for t in range(3):
            state, lp = model.step(state, nxt[t])
            batched.append(lp)
        for b, p in enumerate(prompts):
            alone_state, lp = model.start(p[None])
            alone = [lp]
            for t in range(3):
                alone_state, lp = model.step(alone_state, nxt[t, b : b + 1])
                alone.append(lp)
            for got, want in zip(batched, alone):
                torch.testing.assert_close(got[b : b + 1].double(), want.double(), atol=1e-5, rtol=0)


def test_padded_gpt_cache_reorders_with_its_rows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    with torch.no_grad():
        state, _ = model.start(prompt, torch.tensor([2, 4]))
        state = model.reorder(state, torch.tensor([0, 0]))
        _, got = model.step(state, torch.tensor([3, 3]))
        _, want = model.start(torch.tensor([[4, 5, 3]]))
    torch.testing.assert_close(got, want.expand(2, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [[0, 2], [3, 5], [2]])
def test_bad_lengths_are_refused(lengths):
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(InputError, match="lengths"):
        model.start(torch.zeros(2, 4, dtype=torch.long), torch.tensor(lengths))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("ngram",)])
def test_input_major_changes_layout_not_outputs(family, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    tokens = torch.randint(2, model.vocab_size, (3, 7))
    with torch.no_grad():
        state, first = model.start(tokens)
        _, second = model.step(state, tokens[:, 0])
    input_major(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert any(id(m.weight) not in embeddings for m in linears)
    for m in linears:
        out = m.weight.shape[0]
        if id(m.weight) in embeddings:  # a tied head: an embedding reads its rows
            assert m.weight.is_contiguous()
        else:
            assert m.weight.stride() == (1, out) and m.weight.t().is_contiguous()
    with torch.no_grad():
        state, got = model.start(tokens)
        torch.testing.assert_close(got, first, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.step(state, tokens[:, 0])[1], second, atol=1e-5, rtol=0)
    if hasattr(model, "save"):  # the checkpoint holds the same numbers, stored as always
        model.save(tmp_path)
        reloaded = type(model).load(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded.start(tokens)[1], first, atol=1e-5, rtol=0)

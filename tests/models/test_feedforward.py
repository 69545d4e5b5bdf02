import json

import pytest
import torch

from lmstack.errors import CheckpointError, InputError
from lmstack.models import load
from lmstack.models.feedforward import FeedForwardConfig, FeedForwardLM


def _model(**kw):
    torch.manual_seed(0)
    return FeedForwardLM(FeedForwardConfig(**{"vocab_size": 11, "order": 4, "d_embed": 5, "d_hidden": 7, **kw})).eval()


def test_matches_hand_written_bengio_formula():
    m = _model(direct=True, n_hidden_layers=1)
    idx = torch.randint(0, 11, (2, 6))
    got = m.next_token_logprobs(idx)
    start = m.vocab_size  # the learned "before start" row
    W_h, b_h = m.hidden[0].weight, m.hidden[0].bias
    for b in range(2):
        for t in range(6):
            ctx = [start] * max(0, 3 - (t + 1)) + idx[b, max(0, t - 2) : t + 1].tolist()
            x = m.embed.weight[ctx].flatten()
            y = m.out.bias + m.out.weight @ torch.tanh(W_h @ x + b_h) + m.direct.weight @ x
            torch.testing.assert_close(got[b, t], torch.log_softmax(y, -1), atol=1e-5, rtol=0)


def test_only_the_last_n_minus_1_tokens_matter():
    m = _model()
    idx = torch.randint(0, 11, (1, 8))
    far = idx.clone()
    far[0, 2] = (far[0, 2] + 1) % 11  # outside the 3-token window of position 7
    assert torch.equal(m.next_token_logprobs(idx)[0, 7], m.next_token_logprobs(far)[0, 7])
    near = idx.clone()
    near[0, 5] = (near[0, 5] + 1) % 11
    assert not torch.allclose(m.next_token_logprobs(idx)[0, 7], m.next_token_logprobs(near)[0, 7])


@pytest.mark.parametrize("prompt_len", [0, 1, 5])
def test_incremental_decoding_matches_full_forward(prompt_len):
    m = _model(n_hidden_layers=2, direct=True)
    idx = torch.randint(0, 11, (3, 9))
    full = m.next_token_logprobs(idx)
    state, lp = m.start(idx[:, :prompt_len])
    if prompt_len:
        torch.testing.assert_close(lp, full[:, prompt_len - 1], atol=1e-5, rtol=0)
    for t in range(prompt_len, 9):
        state, lp = m.step(state, idx[:, t])
        torch.testing.assert_close(lp, full[:, t], atol=1e-5, rtol=0)


def test_learns_a_deterministic_sequence():
    m = _model(order=3).train()
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 4])
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(150):
        _, loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_save_load_round_trip(tmp_path):
    m = _model(direct=True)
    m.save(tmp_path / "ck")
    m2, tok = load(tmp_path / "ck")
    assert isinstance(m2, FeedForwardLM) and tok is None and m2.config == m.config
    idx = torch.randint(0, 11, (2, 7))
    assert torch.equal(m.next_token_logprobs(idx), m2.next_token_logprobs(idx))


def test_bad_checkpoints_are_named(tmp_path):
    m = _model()
    m.save(tmp_path / "ck")
    (tmp_path / "ck/checksums.json").unlink()  # edited by hand below, as a checkpoint without checksums
    cfg = json.loads((tmp_path / "ck/config.json").read_text())
    (tmp_path / "ck/config.json").write_text(json.dumps({**cfg, "d_hidden": 9}))
    with pytest.raises(CheckpointError, match="shape"):
        FeedForwardLM.load(tmp_path / "ck")
    (tmp_path / "ck/config.json").write_text(json.dumps({**cfg, "family": "rnn"}))
    with pytest.raises(CheckpointError, match="not 'ffn'"):
        FeedForwardLM.load(tmp_path / "ck")
    (tmp_path / "ck/config.json").write_text(json.dumps({**cfg, "direct": True}))
    with pytest.raises(CheckpointError, match="missing: \\['direct.weight'\\]"):
        FeedForwardLM.load(tmp_path / "ck")


def test_out_of_vocabulary_ids_are_rejected():
    m = _model()
    with pytest.raises(InputError, match="token ids must be in"):
        m(torch.tensor([[3, 11]]))  # 11 = vocab_size would otherwise read the start row
    state, _ = m.start(torch.tensor([[3]]))
    with pytest.raises(InputError, match="token ids must be in"):
        m.step(state, torch.tensor([11]))


def test_size_and_flops_counts():
    m = _model(direct=True)
    # embeddings (V+1)·d, hidden (3d)·h + h, out h·V + V, direct (3d)·V
    assert m.num_params() == 12 * 5 + (15 * 7 + 7) + (7 * 11 + 11) + 15 * 11
    assert m.flops_per_token() == 6 * (15 * 7 + 7 * 11 + 15 * 11)  # weight matrices, no biases
    assert m.flops_per_token(training=False) == 2 * (15 * 7 + 7 * 11 + 15 * 11)
    assert FeedForwardConfig.sized(2).d_hidden < FeedForwardConfig.sized(4).d_hidden
    assert FeedForwardConfig.preset("tiny", vocab_size=50).vocab_size == 50
    with pytest.raises(InputError, match="unknown ffn preset .huge."):
        FeedForwardConfig.preset("huge")
    assert m.num_params(non_embedding=True) == 15 * 7 + 7

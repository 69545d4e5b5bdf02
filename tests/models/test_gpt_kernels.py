"""GPT's shortcuts for training speed (hand-written RoPE and CPU RMSNorm passes, hidden states of
kept positions only) give what the plain computation gives, values and gradients."""

import torch

from lmstack.models.gpt import GPT, GPTConfig, RMSNorm, apply_rope, rope_tables


def test_rmsnorm_equals_torchs_with_gradients():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    got = torch.autograd.grad(ours(x), (x, ours.weight), g)
    want = torch.autograd.grad(theirs(x), (x, theirs.weight), g)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.autograd.gradcheck(RMSNorm(4, eps=1e-6).double(), torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True))


def test_rope_equals_the_rotate_half_expression_with_gradients():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(7, 8, 10000.0))
    x = torch.randn(2, 3, 7, 8, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 3, 7, 8, dtype=torch.double)
    for c, s in ((cos, sin), (cos[None, None].expand(2, 1, 7, 8), sin[None, None].expand(2, 1, 7, 8))):  # shared, per row
        x1, x2 = x.chunk(2, dim=-1)
        plain = x * c + torch.cat((-x2, x1), dim=-1) * s
        torch.testing.assert_close(apply_rope(x, c, s), plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(apply_rope(x, c, s), x, g), torch.autograd.grad(plain, x, g))


def test_hidden_states_of_kept_positions_equal_the_full_pass():
    """`keep` (the answer positions of a loss) gives those rows of the full pass, with their
    gradients, pre- and post-norm, packed rows too."""
    for prenorm in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("tiny-llama", vocab_size=50, prenorm=prenorm)).double()
        idx = torch.randint(0, 50, (2, 12))
        segments = torch.tensor([[1] * 5 + [2] * 7, [1] * 12])
        keep = torch.rand(2, 12) > 0.4
        g = torch.randn(int(keep.sum()), 64, dtype=torch.double)
        got = model.hidden_states(idx, segments, keep=keep)
        want = model.hidden_states(idx, segments)[keep]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        params = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]  # the head reads the states
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

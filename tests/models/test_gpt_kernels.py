"""GPT's hand-written forward/backward pieces (RoPE, RMSNorm on CPU) give what the textbook
expressions give under autograd, values and gradients, so training through them is unchanged."""

import torch

from lmstack.models.gpt import RMSNorm, apply_rope, rope_tables


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

"""Several LoRA adapters in one batch (`models.multi_lora`): each row's output equals the base with
that row's adapter alone, whatever mix of adapters, group sizes and base rows the batch holds."""

import pytest
import torch

from lmstack.models import lora
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.multi_lora import MultiLora

V = 40


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A base checkpoint and four adapters of different ranks and targets for it ("d" adapts q and v
    but not k, which then stays a plain linear layer beside them)."""
    tmp = tmp_path_factory.mktemp("multi_lora")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, mlp="swiglu", bias=False)).save(tmp / "base")
    dirs = {}
    kinds = (("a", 2, ("attn",)), ("b", 4, ("attn", "mlp")), ("c", 8, ("mlp",)), ("d", 3, ("*.q", "*.v")))
    for seed, (name, r, targets) in enumerate(kinds, 1):
        model = GPT.load(tmp / "base")
        lora.attach(model, lora.LoraConfig(r=r, alpha=2 * r, targets=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
        dirs[name] = lora.save_adapter(model, tmp / name, tmp / "base")
    return tmp / "base", dirs


def alone(base_dir, adapter_dir):
    model = GPT.load(base_dir).eval()
    if adapter_dir is not None:
        lora.load_adapter(model, adapter_dir)
    return model


@pytest.mark.parametrize(
    "names",
    [
        ["b", None, "a", "b", "b", None, "c"],  # groups of 3, 1, 1: two padded
        ["a", "a", "a", "a"],  # one adapter for every row
        [None, "c", None],  # one adapted row among base rows
        ["d", "a", None, "d"],  # q and v adapted by both, k by "a" alone
        ["d", None, "d"],  # k left a plain linear layer between q and v
    ],
)
def test_each_row_equals_its_adapter_alone(adapters, names):
    """Only the adapters named are loaded, so some layers have none and stay plain."""
    base_dir, dirs = adapters
    model = GPT.load(base_dir).eval()
    multi = MultiLora(model)
    slots = {name: multi.install(multi.read(dirs[name])) for name in dict.fromkeys(n for n in names if n)}
    x = torch.randint(0, V, (len(names), 7), generator=torch.Generator().manual_seed(0))
    multi.set_rows([slots[n] if n else -1 for n in names])
    with torch.no_grad():
        mixed = model.next_token_logprobs(x)
        for row, name in enumerate(names):
            ref = alone(base_dir, dirs[name] if name else None).next_token_logprobs(x[row : row + 1])[0]
            assert (mixed[row] - ref).abs().max() <= 1e-5
        # and again one token at a time through the KV cache (the decoding path)
        state, lp = model.start(x[:, :3])
        for t in range(3, 7):
            state, lp = model.step(state, x[:, t])
        assert (lp - mixed[:, 6]).abs().max() <= 1e-5


def test_a_removed_slot_is_reused_and_the_others_keep_their_outputs(adapters):
    base_dir, dirs = adapters
    model = GPT.load(base_dir).eval()
    multi = MultiLora(model)
    a, b = multi.install(multi.read(dirs["a"])), multi.install(multi.read(dirs["b"]))
    multi.remove(a)
    c = multi.install(multi.read(dirs["c"]))
    assert c == a
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    multi.set_rows([c, b])
    with torch.no_grad():
        got = model.next_token_logprobs(x)
        for row, name in enumerate(("c", "b")):
            assert (got[row] - alone(base_dir, dirs[name]).next_token_logprobs(x[row : row + 1])[0]).abs().max() <= 1e-5

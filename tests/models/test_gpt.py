import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lmstack
from lmstack.errors import CheckpointError, ContextLengthError, InputError
from lmstack.models.gpt import GPT, GPTConfig, mfu

V = 97

VARIANTS = {
    "gpt2": GPTConfig.preset("tiny", vocab_size=V),
    "llama-gqa": GPTConfig.preset("tiny-llama", vocab_size=V),
    "postnorm-sinusoidal": GPTConfig.preset("tiny", vocab_size=V, prenorm=False, pos="sinusoidal", bias=False),
    "rmsnorm-learned-swiglu-mqa": GPTConfig.preset("tiny", vocab_size=V, norm="rmsnorm", mlp="swiglu", n_kv_head=1),
}


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # move norms and biases off their 1/0 init so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_matches_full_forward(name):
    model = _model(VARIANTS[name])
    x = torch.randint(0, V, (3, 40))
    full = model.next_token_logprobs(x)
    state, lp = model.start(x[:, :7])
    incremental = [lp]
    for t in range(7, 40):
        state, lp = model.step(state, x[:, t])
        incremental.append(lp)
    torch.testing.assert_close(torch.stack(incremental[:-1], 1), full[:, 6:39], atol=1e-5, rtol=0)
    assert state.pos == 40


@pytest.mark.parametrize("name", VARIANTS)
def test_logprobs_are_causal_and_normalised(name):
    model = _model(VARIANTS[name])
    x = torch.randint(0, V, (2, 30))
    lp = model.next_token_logprobs(x)
    assert lp.shape == (2, 30, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 30))
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % V  # change only the future
    torch.testing.assert_close(model.next_token_logprobs(y)[:, :20], lp[:, :20])
    assert not torch.allclose(model.next_token_logprobs(y)[:, 20:], lp[:, 20:])


def test_forward_loss_is_mean_cross_entropy_and_it_learns():
    model = _model(VARIANTS["llama-gqa"]).train()
    x = torch.randint(0, V, (4, 32))
    logits, loss = model(x[:, :-1], x[:, 1:])
    lp = torch.log_softmax(logits, -1)
    assert math.isclose(loss.item(), -lp.gather(-1, x[:, 1:, None]).mean().item(), rel_tol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
    assert loss.item() < first / 2  # memorises a fixed batch


def test_dropout_only_in_training():
    model = _model(GPTConfig.preset("tiny", vocab_size=V, dropout=0.5))
    x = torch.randint(0, V, (2, 16))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_too_long_input_and_bad_ids_are_clear_errors():
    model = _model(VARIANTS["gpt2"])  # block_size 64
    with pytest.raises(ContextLengthError, match="65 tokens is longer than the model's context of 64"):
        model.next_token_logprobs(torch.zeros(1, 65, dtype=torch.long))
    state, _ = model.start(torch.zeros(1, 63, dtype=torch.long))
    state, _ = model.step(state, torch.zeros(1, dtype=torch.long))  # position 64 of 64 fits
    with pytest.raises(ContextLengthError, match="65 tokens"):
        model.step(state, torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputError, match=r"token ids must be in \[0, 97\)"):
        model.next_token_logprobs(torch.tensor([[1, V]]))
    with pytest.raises(InputError, match="at least one token"):
        model.start(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_save_load_round_trip(tmp_path, name):
    from lmstack.tokenizers.char import CharTokenizer

    model = _model(VARIANTS[name])
    tok = CharTokenizer.train(["hello world"], special_tokens=["<|endoftext|>"])
    model.save(tmp_path / "ckpt", tok)
    loaded, tok2 = lmstack.load(tmp_path / "ckpt")
    assert isinstance(loaded, GPT) and loaded.config == model.config
    assert tok2.encode("hello") == tok.encode("hello")
    x = torch.randint(0, V, (2, 20))
    torch.testing.assert_close(loaded.next_token_logprobs(x), model.next_token_logprobs(x), atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings


def test_gpt_load_names_a_wrong_family(tmp_path):
    from lmstack.models.rnn import RNNConfig, RNNLM

    RNNLM(RNNConfig.preset("tiny")).save(tmp_path)
    with pytest.raises(CheckpointError, match="family is 'rnn', not 'gpt'"):
        GPT.load(tmp_path)


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match="pos must be one of"):
        GPTConfig(pos="alibi")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)
    with pytest.raises(InputError, match="unknown gpt preset 'gpt5'"):
        GPTConfig.preset("gpt5")


def test_presets_and_depth_dial():
    assert GPTConfig.preset("d12") == GPTConfig.preset("gpt2-124m")
    d6 = GPTConfig.preset("d6", pos="rope")
    assert (d6.n_layer, d6.n_embd, d6.head_dim, d6.pos) == (6, 384, 64, "rope")


def test_param_counts_match_transformers():
    """GPT-2 124M and a Llama-7B-shaped model have exactly the parameter count transformers gives
    (built on the meta device: no memory, no time)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        ours = GPT(GPTConfig.preset("gpt2-124m"))
        ref = GPT2LMHeadModel(GPT2Config())
        assert ours.num_params() == ref.num_parameters() == 124_439_808
        llama = dict(vocab_size=32000, n_embd=4096, n_layer=32, n_head=32, block_size=2048, mlp_hidden=11008)
        ours = GPT(GPTConfig.preset("tiny-llama", **llama, n_kv_head=None))
        ref = LlamaForCausalLM(LlamaConfig())
        assert ours.num_params() == ref.num_parameters()
    small = GPT(GPTConfig.preset("tiny", vocab_size=V))
    embeddings = small.wte.weight.numel() + small.wpe.weight.numel()
    assert small.num_params(non_embedding=True) == small.num_params() - embeddings


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_flops_per_token_matches_torch_flop_counter(name):
    """Forward FLOPs are what torch counts for the matmuls and SDPA; training is 3x forward."""
    model = _model(VARIANTS[name]).train()
    T = 48
    x = torch.randint(0, V, (2, T))
    # torch's FLOP table lacks the fused CPU attention kernel; the math backend is plain matmuls.
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            logits = model(x)
        with FlopCounterMode(display=False) as bwd:
            logits.sum().backward()
    per_token = fwd.get_total_flops() / x.numel()
    assert per_token == model.flops_per_token(T, training=False)
    assert (fwd.get_total_flops() + bwd.get_total_flops()) / x.numel() == model.flops_per_token(T)


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(flops_per_token=6e9, tokens_per_s=1e4, device_peak_flops=1.2e14) == pytest.approx(0.5)


def test_extend_feeds_chunks_after_a_prefix():
    """A chunk fed to a non-empty cache (a chat's next turn) needs the offset causal mask; the
    log-probs must equal the full forward's."""
    model = _model(VARIANTS["llama-gqa"])
    x = torch.randint(0, V, (2, 30))
    full = model.next_token_logprobs(x)
    state, first = model.start(x[:, :10])
    state, middle = model.extend(state, x[:, 10:11])
    state, last = model.extend(state, x[:, 11:])
    torch.testing.assert_close(first, full[:, 9], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([middle, last], 1), full[:, 10:], atol=1e-5, rtol=0)


def test_reorder_follows_beams():
    """Beam search keeps rows [1, 1, 0] of a cache; stepping them must equal starting afresh."""
    model = _model(VARIANTS["llama-gqa"])
    x = torch.randint(0, V, (2, 12))
    state, _ = model.start(x)
    index = torch.tensor([1, 1, 0])
    nxt = torch.tensor([5, 6, 7])
    _, got = model.step(model.reorder(state, index), nxt)
    _, want = model.start(torch.cat([x[index], nxt[:, None]], 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_kv_cache_memory_follows_the_tokens_not_the_context():
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=V, block_size=4096)).eval()
    state, _ = model.start(torch.zeros(2, 5, dtype=torch.long))
    for _ in range(20):
        state, _ = model.step(state, torch.zeros(2, dtype=torch.long))
    assert 25 <= state.k[0].shape[2] <= 50  # at most double what 25 tokens need, far below 4096


def _decode_trace(model, prompt, lengths, steps):
    """Log-probs of a padded batch through start, `steps` one-token steps, a beam-style reorder and
    a multi-token extend."""
    out = []
    with torch.no_grad():
        state, lp = model.start(prompt, lengths)
        out.append(lp)
        for t in steps:
            state, lp = model.step(state, t)
            out.append(lp)
        state = model.reorder(state, torch.tensor([1, 0, 0]))
        state, lp = model.extend(state, torch.tensor([[3, 4], [5, 6], [7, 8]]))
        out.append(lp.flatten(0, 1))
    return torch.cat(out), state


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_static_cache_decodes_as_the_growing_one(name):
    """The static cache (what a compiled step reads) attends over every slot through a mask; its
    log-probs must equal the growing cache's, padding and beam reordering included."""
    model = _model(VARIANTS[name])
    prompt = torch.randint(0, V, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    steps = list(torch.randint(0, V, (5, 3)))
    want, _ = _decode_trace(model, prompt, lengths, steps)
    model.static_capacity = 20
    got, state = _decode_trace(model, prompt, lengths, steps)
    assert state.slot is not None and state.k[0].shape[2] == 20 and int(state.slot) == state.pos == 13
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ContextLengthError, match="static KV cache holds 20"):
        for _ in range(8):
            state, _ = model.step(state, torch.zeros(3, dtype=torch.long))


@pytest.mark.slow
def test_compiled_decoding_generates_what_eager_decoding_does():
    from lmstack.generation import GenerationConfig, generate_tokens

    model = _model(VARIANTS["llama-gqa"])
    prompts = [[1, 2, 3, 4], [5, 6]]
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    want = generate_tokens(model, prompts, config)
    model.compile_decoding(capacity=32)
    got = generate_tokens(model, prompts, config)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], abs=1e-4)

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
    # Qwen's and Mistral's switches at once: heads of 24 (q is 96 wide in a 64-wide model), a window of 8.
    "qwen-mistral-switches": GPTConfig.preset(
        "tiny-llama", vocab_size=V, qkv_bias=True, qk_norm=True, head_dim=24, sliding_window=8
    ),
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
    from lmstack.models.rnn import RNNLM, RNNConfig

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


@pytest.mark.parametrize("name", ["llama-gqa", "qwen-mistral-switches"])
def test_extend_feeds_chunks_after_a_prefix(name):
    """A chunk fed to a non-empty cache (a chat's next turn) needs the offset causal mask (and
    the window); the log-probs must equal the full forward's."""
    model = _model(VARIANTS[name])
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


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen-mistral-switches"])
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


def test_sliding_window_sees_only_the_last_w_tokens():
    """With one layer and RoPE (attention scores depend only on relative positions), the logits
    after token t with a window of W are those of running the W tokens ending at t alone."""
    W = 6
    model = _model(GPTConfig.preset("tiny-llama", vocab_size=V, n_layer=1, sliding_window=W))
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = model(x)
        for t in range(W - 1, 30):
            torch.testing.assert_close(full[:, t], model(x[:, t - W + 1 : t + 1])[:, -1], atol=1e-5, rtol=0)
        assert not torch.allclose(full[:, W:], _model(GPTConfig.preset("tiny-llama", vocab_size=V, n_layer=1))(x)[:, W:])


PACKABLE = ["gpt2", "llama-gqa", "postnorm-sinusoidal", "qwen-mistral-switches"]  # learned, RoPE, sinusoidal, windowed


def _packed(lengths_per_row, pad):
    """Rows of documents of the given lengths followed by `pad` padding tokens: (ids, segments, docs)."""
    ids, segments, docs = [], [], []
    for lengths in lengths_per_row:
        row_docs = [torch.randint(1, V, (n,)) for n in lengths]
        docs.append(row_docs)
        ids.append(torch.cat([*row_docs, torch.zeros(pad, dtype=torch.long)]))
        ids_of_docs = [torch.full((n,), d + 1) for d, n in enumerate(lengths)]
        segments.append(torch.cat([*ids_of_docs, torch.zeros(pad, dtype=torch.long)]))
    return torch.stack(ids), torch.stack(segments), docs


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_documents_equal_each_document_run_alone(name):
    model = _model(VARIANTS[name])
    ids, segments, docs = _packed([[5, 12, 3], [12, 3, 5]], pad=4)  # 12 > the window of 8
    with torch.no_grad():
        packed = model(ids, segments=segments)
        assert torch.isfinite(packed).all()  # padding included
        for row, row_docs in enumerate(docs):
            start = 0
            for doc in row_docs:
                alone = model(doc[None])[0]
                torch.testing.assert_close(packed[row, start : start + len(doc)], alone, atol=1e-5, rtol=0)
                start += len(doc)


@pytest.mark.parametrize("name", ["gpt2", "qwen-mistral-switches"])
def test_one_segment_is_the_plain_forward(name):
    model = _model(VARIANTS[name])
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x, segments=torch.ones_like(x)), model(x), atol=1e-6, rtol=0)


def test_packed_loss_ignores_padding_and_trains():
    model = _model(VARIANTS["llama-gqa"]).train()
    ids, segments, _ = _packed([[5, 12, 3], [12, 3, 5]], pad=4)
    targets = torch.randint(0, V, ids.shape)  # padding's targets are real ids: forward must drop them
    logits, loss = model(ids, targets, segments)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert math.isclose(loss.item(), -lp[segments > 0].mean().item(), rel_tol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(InputError, match="segments must have the shape of the ids"):
        model(ids, segments=segments[:, :-1])


def test_checkpoints_saved_before_the_new_switches_load_unchanged(tmp_path):
    """A config.json without head_dim, qkv_bias, qk_norm, sliding_window (older lmstack) gives
    the same model."""
    import json

    model = _model(VARIANTS["llama-gqa"])
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("head_dim", "qkv_bias", "qk_norm", "sliding_window")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checksums.json").unlink()  # older checkpoints had none
    loaded = GPT.load(tmp_path)
    assert loaded.config == model.config
    x = torch.randint(0, V, (2, 20))
    torch.testing.assert_close(loaded.next_token_logprobs(x), model.next_token_logprobs(x), atol=0, rtol=0)


def test_head_dim_and_window_are_checked():
    assert GPTConfig(n_embd=30, n_head=4, head_dim=8).head_dim == 8  # heads need not tile the width
    with pytest.raises(ValueError, match="or set head_dim"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="sliding_window must be positive"):
        GPTConfig(sliding_window=0)


def test_qwen3_param_count_matches_transformers():
    """Qwen3-0.6B's shape (heads of 128 in a 1024-wide model, q/k norms, tied): transformers' count."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(
        vocab_size=151936,
        n_embd=1024,
        n_layer=28,
        n_head=16,
        n_kv_head=8,
        head_dim=128,
        block_size=40960,
        mlp_hidden=3072,
        qk_norm=True,
        tie_embeddings=True,
    )
    with torch.device("meta"):
        ours = GPT(GPTConfig.preset("tiny-llama", **shape))
        ref = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=151936,
                hidden_size=1024,
                intermediate_size=3072,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=128,
                tie_word_embeddings=True,
            )
        )
        assert ours.num_params() == ref.num_parameters()

"""Hugging Face interop against `transformers` itself: tiny random models built locally from
configs (nothing downloaded), imported, exported, and compared logit for logit."""

import dataclasses
import json

import pytest
import torch

from lmstack.errors import CheckpointError
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 300  # room for a byte-level BPE: 256 bytes + merges + <|endoftext|>
TOL = 1e-4

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    ),
    "gpt2-untied-n_inner": lambda: transformers.GPT2Config(
        vocab_size=V,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # Llama 3.1-style RoPE scaling; with head_dim 8 and an original context of 64 the four
    # frequencies (wavelengths 6, 63, 628, 6283) hit all three branches: kept, blended, slowed.
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-tied-bias-mqa": lambda: transformers.LlamaConfig(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    # SmolLM2-135M's shape scaled down: a Llama config with 3 heads sharing 1 KV head, tied embeddings.
    "smollm2": lambda: transformers.LlamaConfig(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # Qwen2.5-0.5B's switches: tied embeddings, a window configured but off.
    "qwen2.5-tied": lambda: transformers.Qwen2Config(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=16,
        max_window_layers=1,
    ),
    # head_dim 16 with 4 heads of a 32-wide model: q is 64 wide, twice the hidden size.
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    # A window of 8 on 40-token inputs: most keys are outside it.
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    ),
    "qwen3-window": lambda: transformers.Qwen3Config(
        vocab_size=V,
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    ),
}


def _perturb(model, seed=0, scale=0.05):
    """Random init leaves norms at 1 and biases at 0, which would hide a swapped norm or bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _hf_model(name, tmp_path, scale=0.05):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]())
    _perturb(model, scale=scale).eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_import_matches_transformers(tmp_path, name):
    ref, path = _hf_model(name, tmp_path)
    ours, _ = from_hf(path)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    want = _hf_logits(ref, x)
    with torch.no_grad():
        assert (ours(x) - want).abs().max() <= TOL
    # The incremental (KV cache) path against the reference's full forward.
    want_lp = torch.log_softmax(want, -1)
    state, lp = ours.start(x[:, :5])
    got = [lp]
    for t in range(5, 40):
        state, lp = ours.step(state, x[:, t])
        got.append(lp)
    assert (torch.stack(got[:-1], 1) - want_lp[:, 4:39]).abs().max() <= TOL


def test_import_keeps_the_architecture(tmp_path):
    _, path = _hf_model("llama-gqa", tmp_path)
    cfg = from_hf(path)[0].config
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        2,
        500000.0,
        False,
    )


@pytest.mark.parametrize(
    "name, switches",
    [
        ("qwen2", dict(bias=False, qkv_bias=True, qk_norm=False, head_dim=8, sliding_window=None, tie_embeddings=False)),
        ("qwen2.5-tied", dict(bias=False, qkv_bias=True, qk_norm=False, head_dim=8, sliding_window=None, tie_embeddings=True)),
        ("qwen3", dict(bias=False, qkv_bias=False, qk_norm=True, head_dim=16, sliding_window=None, tie_embeddings=True)),
        ("mistral", dict(bias=False, qkv_bias=False, qk_norm=False, head_dim=8, sliding_window=8, tie_embeddings=False)),
        ("qwen3-window", dict(bias=False, qkv_bias=False, qk_norm=True, head_dim=8, sliding_window=8, tie_embeddings=False)),
    ],
)
def test_import_reads_each_familys_switches(tmp_path, name, switches):
    _, path = _hf_model(name, tmp_path)
    cfg = from_hf(path)[0].config
    assert {k: getattr(cfg, k) for k in switches} == switches


@pytest.mark.parametrize("name", ["mistral", "qwen3-window", "qwen2"])
def test_greedy_generation_matches_transformers_generate(tmp_path, name):
    """Left-padded prompts of 3 and 9 tokens, 24 new tokens each: the windowed models decode far
    past their window of 8, through the KV cache and through the static cache of compiled decoding."""
    from lmstack.generation import GenerationConfig, generate_tokens

    ref, path = _hf_model(name, tmp_path, scale=0.3)  # larger weights: decisive argmaxes
    ours, _ = from_hf(path)
    prompts = [[5, 17, 42], [7, 1, 99, 23, 250, 64, 3, 11, 80]]
    ids = torch.tensor([[0] * 6 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 6 + [1] * 3, [1] * 9])
    n = 24
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)[
            :, 9:
        ].tolist()
    config = GenerationConfig(max_new_tokens=n, temperature=0)
    assert [g.tokens for g in generate_tokens(ours, prompts, config)] == want
    ours.static_capacity = 40  # what compile_decoding sets, without paying for the compile
    assert [g.tokens for g in generate_tokens(ours, prompts, config)] == want


def test_sliding_window_changes_what_is_generated(tmp_path):
    """The check above is only worth something if the window matters: without it, the same
    weights continue differently."""
    from lmstack.generation import GenerationConfig, generate_tokens

    _, path = _hf_model("mistral", tmp_path, scale=0.3)
    windowed, _ = from_hf(path)
    full = GPT(dataclasses.replace(windowed.config, sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    config = GenerationConfig(max_new_tokens=24, temperature=0)
    prompt = [[7, 1, 99, 23, 250, 64, 3, 11, 80]]
    assert generate_tokens(windowed, prompt, config)[0].tokens != generate_tokens(full, prompt, config)[0].tokens


EXPORTABLE = {  # name: (the class transformers loads, config)
    "gpt2": ("GPT2LMHeadModel", GPTConfig.preset("tiny", vocab_size=V, n_embd=32)),
    "gpt2-untied": ("GPT2LMHeadModel", GPTConfig.preset("tiny", vocab_size=V, n_embd=32, tie_embeddings=False, mlp_hidden=40)),
    "llama-gqa": ("LlamaForCausalLM", GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, rope_theta=1e5)),
    "llama3-rope-scaling": (
        "LlamaForCausalLM",
        GPTConfig.preset(
            "tiny-llama",
            vocab_size=V,
            n_embd=32,
            rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "llama-tied-bias": (
        "LlamaForCausalLM",
        GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, bias=True, tie_embeddings=True),
    ),
    "qwen2": ("Qwen2ForCausalLM", GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, qkv_bias=True, tie_embeddings=True)),
    "qwen2-window": (
        "Qwen2ForCausalLM",
        GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, qkv_bias=True, sliding_window=8),
    ),
    "qwen3": ("Qwen3ForCausalLM", GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, qk_norm=True, head_dim=16)),
    "mistral": ("MistralForCausalLM", GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, sliding_window=8)),
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_loads_in_transformers_and_matches(tmp_path, name):
    hf_class, config = EXPORTABLE[name]
    torch.manual_seed(0)
    ours = _perturb(GPT(config)).eval()
    to_hf(ours, tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == hf_class
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - _hf_logits(ref, x)).abs().max() <= TOL
    # ... and imports back to the same model.
    back, _ = from_hf(tmp_path / "hf")
    assert back.config == ours.config
    torch.testing.assert_close(back.state_dict(), ours.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig.preset("tiny", vocab_size=V, prenorm=False, pos="sinusoidal"),
        GPTConfig.preset("tiny-llama", vocab_size=V, bias=True, sliding_window=8),  # Mistral has no biases
        GPTConfig.preset("tiny-llama", vocab_size=V, qkv_bias=True, qk_norm=True),  # Qwen2's biases + Qwen3's norm
    ],
)
def test_export_refuses_variants_without_hf_equivalent(tmp_path, config):
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent"):
        to_hf(GPT(config), tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _hf_model("llama-gqa", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]"):
        from_hf(path)


def test_mismatched_tensor_shape_is_named(tmp_path):
    _, path = _hf_model("gpt2", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "n_positions": 128}))
    with pytest.raises(CheckpointError, match=r"'wpe.weight' has shape \(64, 32\) but the config needs \(128, 32\)"):
        from_hf(path)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("llama-gqa", {"model_type": "gemma"}, "model_type 'gemma'"),
        ("llama-gqa", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling 'linear'"),
        ("llama-gqa", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        # Qwen2's window from layer 1 of 2 up: half full, half sliding attention.
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": None},
            "sliding-window attention on only some layers",
        ),
        (
            "qwen3",
            {"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": True, "sliding_window": 8},
            "sliding-window attention on only some layers",
        ),
        ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, name, change, message):
    _, path = _hf_model(name, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        from_hf(path)


def test_pickle_weights_are_not_read(tmp_path):
    _, path = _hf_model("gpt2", tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        from_hf(path)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. Café, 東京, 😀!"


@pytest.fixture(scope="module")
def hf_tokenizer(shared):
    """A byte-level BPE trained by Hugging Face `tokenizers` (its special token gets id 0)."""
    from tokenizers import ByteLevelBPETokenizer

    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=V, min_frequency=2, special_tokens=["<|endoftext|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def test_tokenizer_json_imports_with_the_same_ids_and_exports_back(tmp_path, hf_tokenizer):
    _, path = _hf_model("gpt2", tmp_path)
    hf_tokenizer.save_pretrained(path)
    model, tok = from_hf(path)
    assert tok.encode(TEXT) == hf_tokenizer.encode(TEXT)
    assert tok.encode("<|endoftext|>", allowed_special="all") == hf_tokenizer.encode("<|endoftext|>") == [0]

    to_hf(model, tmp_path / "out", tok)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.encode(TEXT) == hf_tokenizer.encode(TEXT)
    assert back.decode(back.encode(TEXT)) == TEXT


def test_gpt2_vocab_and_merges_files_import(tmp_path, shared):
    """Older GPT-2 directories carry vocab.json + merges.txt: OpenAI's encoder.json + vocab.bpe."""
    import shutil

    gpt2 = shared / "fixtures" / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    shutil.copy(gpt2 / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copy(gpt2 / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    _, tok = from_hf(tmp_path / "hf")
    ref = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert tok.encode(TEXT) == ref.encode(TEXT)
    assert tok.eot_id == ref.eos_token_id == 50256


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, hf_tokenizer):
    _, path = _hf_model("gpt2", tmp_path)
    hf_tokenizer.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": V - 1}))
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][: V - 1].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tokenizer has {V} ids but the model only {V - 1}"):
        from_hf(path)


CHAT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def test_chat_template_comes_along_and_exports_back(tmp_path, hf_tokenizer):
    """transformers now saves the template as chat_template.jinja; import keeps it through an
    lmstack checkpoint, and export hands it back to AutoTokenizer."""
    import lmstack

    _, path = _hf_model("qwen2", tmp_path)
    hf_tokenizer.chat_template = CHAT
    hf_tokenizer.save_pretrained(path)
    model, tok = from_hf(path)
    assert tok.chat_template == CHAT
    model.save(tmp_path / "ours", tok)
    model, tok = lmstack.load(tmp_path / "ours")
    assert tok.chat_template == CHAT
    to_hf(model, tmp_path / "out", tok)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == CHAT


@pytest.mark.parametrize(
    "stored", [CHAT, [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": CHAT}]]
)
def test_chat_template_in_tokenizer_config(tmp_path, hf_tokenizer, stored):
    """Older directories keep it in tokenizer_config.json: one string, or named templates of which
    apply_chat_template uses "default"."""
    _, path = _hf_model("qwen2", tmp_path)
    hf_tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": stored}))
    assert from_hf(path)[1].chat_template == CHAT

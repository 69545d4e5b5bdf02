"""Hugging Face interop against `transformers` itself: tiny random models built locally from
configs (nothing downloaded), imported, exported, and compared logit for logit."""

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
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0),
    "gpt2-untied-n_inner": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                           n_inner=48, tie_word_embeddings=False,
                                                           bos_token_id=0, eos_token_id=0),
    "llama-gqa": lambda: transformers.LlamaConfig(vocab_size=V, max_position_embeddings=64, hidden_size=32,
                                                  intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, rms_norm_eps=1e-5,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Llama 3.1-style RoPE scaling; with head_dim 8 and an original context of 64 the four
    # frequencies (wavelengths 6, 63, 628, 6283) hit all three branches: kept, blended, slowed.
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        vocab_size=V, max_position_embeddings=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-tied-bias-mqa": lambda: transformers.LlamaConfig(vocab_size=V, max_position_embeddings=64, hidden_size=32,
                                                            intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=1,
                                                            attention_bias=True, mlp_bias=True,
                                                            tie_word_embeddings=True),
}


def _perturb(model, seed=0):
    """Random init leaves norms at 1 and biases at 0, which would hide a swapped norm or bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _hf_model(name, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]())
    _perturb(model).eval()
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
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == \
        ("rope", "rmsnorm", "swiglu", 2, 500000.0, False)


EXPORTABLE = {
    "gpt2": GPTConfig.preset("tiny", vocab_size=V, n_embd=32),
    "gpt2-untied": GPTConfig.preset("tiny", vocab_size=V, n_embd=32, tie_embeddings=False, mlp_hidden=40),
    "llama-gqa": GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, rope_theta=1e5),
    "llama3-rope-scaling": GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, rope_scaling=dict(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama-tied-bias": GPTConfig.preset("tiny-llama", vocab_size=V, n_embd=32, bias=True, tie_embeddings=True),
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_loads_in_transformers_and_matches(tmp_path, name):
    torch.manual_seed(0)
    ours = _perturb(GPT(EXPORTABLE[name])).eval()
    to_hf(ours, tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - _hf_logits(ref, x)).abs().max() <= TOL
    # ... and imports back to the same model.
    back, _ = from_hf(tmp_path / "hf")
    assert back.config == ours.config
    torch.testing.assert_close(back.state_dict(), ours.state_dict(), atol=0, rtol=0)


def test_export_refuses_variants_without_hf_equivalent(tmp_path):
    model = GPT(GPTConfig.preset("tiny", vocab_size=V, prenorm=False, pos="sinusoidal"))
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent"):
        to_hf(model, tmp_path / "hf")
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


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    _, path = _hf_model("llama-gqa", tmp_path)
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

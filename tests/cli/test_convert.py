"""`lmstack convert` as a user runs it: HF -> lmstack -> HF, checked against transformers."""

import json

import pytest
import torch

import lmstack

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 300  # room for a byte-level BPE: 256 bytes + merges + <|endoftext|>
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V,
        max_position_embeddings=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def _save_hf(cfg, path, build=None):
    torch.manual_seed(0)
    model = (build or transformers.AutoModelForCausalLM.from_config)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _hf_tokenizer(shared):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    bpe.train_from_iterator([text], vocab_size=V, special_tokens=["<|endoftext|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.mark.parametrize("arch", CONFIGS)
def test_hf_to_lmstack_to_hf(cli, tmp_path, shared, arch):
    ref = _save_hf(CONFIGS[arch](), tmp_path / "hf")
    with_tokenizer = arch == "gpt2"
    if with_tokenizer:
        hf_tok = _hf_tokenizer(shared)
        hf_tok.save_pretrained(tmp_path / "hf")
    r = cli("convert", tmp_path / "hf", tmp_path / "ours", check=True)  # --to defaults to the other format
    assert r.stdout.startswith(f"wrote lmstack checkpoint to {tmp_path / 'ours'}")
    assert ("weights only" in r.stdout) != with_tokenizer
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        want = ref(x).logits
        model, tok = lmstack.load(tmp_path / "ours")
        assert (model(x) - want).abs().max() <= 1e-4
    text = "Let us kill him, and we'll have corn at our own price."
    if with_tokenizer:
        assert tok.encode(text) == hf_tok.encode(text)

    cli("convert", tmp_path / "ours", tmp_path / "hf2", "--to", "hf", check=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max() <= 1e-4
    if with_tokenizer:
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2").encode(text) == hf_tok.encode(text)


def test_errors_are_one_line_and_write_nothing(cli, tmp_path):
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = cli("convert", tmp_path / "neox", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'neox'}: not a supported Hugging Face model "
        "(model_type 'gpt_neox'); lmstack imports gpt2, llama, mistral, qwen2, qwen3, bert and t5"
    ]
    assert not (tmp_path / "out").exists()

    from lmstack.models.rnn import RNNLM, RNNConfig

    RNNLM(RNNConfig.preset("tiny")).save(tmp_path / "rnn")
    r = cli("convert", tmp_path / "rnn", tmp_path / "out", "--to", "hf")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: only GPT models export to Hugging Face format; this is a 'rnn' model"]
    assert not (tmp_path / "out").exists()

    r = cli("convert", tmp_path / "rnn", tmp_path / "rnn", "--to", "hf")
    assert r.returncode == 2 and "already holds a checkpoint; pass --force" in r.stderr


def test_bert_imports_through_convert(cli, tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    ref = _save_hf(cfg, tmp_path / "hf", transformers.BertForMaskedLM)
    cli("convert", tmp_path / "hf", tmp_path / "ours", check=True)
    model, _ = lmstack.load(tmp_path / "ours")
    assert model.family == "bert"
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() <= 1e-4

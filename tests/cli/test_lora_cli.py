"""`lmstack lora merge|show` and adapter directories in commands that load a checkpoint."""

import json

import torch

import lmstack
from lmstack.models import lora
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers.char import CharTokenizer

TEXT = "hello world, the cat sat on the mat"


def _adapter(tmp_path):
    """A base checkpoint (relative path in the adapter) and an adapter with random non-zero B."""
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32)).eval()
    model.save(tmp_path / "base", tok)
    lora.attach(model, lora.LoraConfig(r=2, alpha=4, targets=("attn",)))
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.2)
    lora.save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    return model, tok


def test_merge_writes_an_ordinary_checkpoint(tmp_path, lmstack_cli, cli):
    model, tok = _adapter(tmp_path)
    x = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        want = model(x)
    # lmstack.load reads the adapter directory as it is (base, adapter, the base's tokenizer).
    loaded, loaded_tok = lmstack.load(tmp_path / "adapter")
    assert loaded_tok.encode(TEXT) == tok.encode(TEXT)
    with torch.no_grad():
        assert (loaded(x) - want).abs().max() <= 1e-5
    lmstack_cli("lora", "merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    merged, _ = lmstack.load(tmp_path / "merged")
    assert not lora.lora_modules(merged)
    with torch.no_grad():
        assert (merged(x) - want).abs().max() <= 1e-5
    again = cli("lora", "merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr
    # A command that loads a checkpoint takes the adapter directory too.
    scored = json.loads(lmstack_cli("score", "--model", tmp_path / "adapter", "--prompt", "the cat", "--json"))
    assert scored["tokens"]


def test_show_and_errors(tmp_path, lmstack_cli, cli):
    _adapter(tmp_path)
    info = json.loads(lmstack_cli("lora", "show", tmp_path / "adapter", "--json"))
    assert info["r"] == 2 and info["alpha"] == 4 and info["family"] == "gpt"
    # attn on a 1-layer GPT-2-style base: c_attn (rank 3·2, fused q/k/v) and c_proj; A [r, 32], B [out, r].
    assert info["targets"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert info["parameters"] == 6 * 32 + 96 * 6 + 2 * 32 + 32 * 2
    text = lmstack_cli("lora", "show", tmp_path / "adapter")
    assert "r:" in text and str(tmp_path / "base") in text.replace("adapter/../", "")
    bad = cli("lora", "show", tmp_path / "base")
    assert bad.returncode != 0 and "not a LoRA adapter directory" in bad.stderr

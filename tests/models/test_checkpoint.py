"""A damaged or mismatched checkpoint directory gives one clear CheckpointError naming the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.errors import CheckpointError, FormatError
from lmstack.models.gpt import GPT, GPTConfig


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", vocab_size=50)).save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(path, **change):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))


def test_a_good_checkpoint_loads_with_its_tie_restored(ckpt):
    stored = load_file(ckpt / "model.safetensors")
    assert len({"wte.weight", "lm_head.weight"} & set(stored)) == 1  # a tied matrix is stored once
    model, tokenizer = lmstack.load(ckpt)
    assert tokenizer is None
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight, next(v for k, v in stored.items() if k in ("wte.weight", "lm_head.weight")))


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["blocks.1.attn.k.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: \['blocks.1.attn.k.weight'\]"):
        lmstack.load(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["blocks.7.attn.k.weight"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: \['blocks.7.attn.k.weight'\]"):
        lmstack.load(ckpt)


def test_mismatched_tensor_shape_is_named(ckpt):
    _edit_config(ckpt, vocab_size=60)
    with pytest.raises(CheckpointError, match=r"'(wte|lm_head).weight' has shape \(50, 64\) but the config needs \(60, 64\)"):
        lmstack.load(ckpt)


def test_wrong_or_unknown_family(ckpt):
    _edit_config(ckpt, family="rnn")
    with pytest.raises(CheckpointError, match="unknown RNNConfig fields"):
        lmstack.load(ckpt)
    _edit_config(ckpt, family="mamba")
    with pytest.raises(CheckpointError, match="unknown model family 'mamba'"):
        lmstack.load(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["family"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'family' field"):
        lmstack.load(ckpt)


def test_invalid_config_value_is_named(ckpt):
    _edit_config(ckpt, pos="alibi")
    with pytest.raises(CheckpointError, match=r"config.json: invalid GPTConfig: pos must be one of"):
        lmstack.load(ckpt)


def test_corrupt_or_missing_files(ckpt):
    blob = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        lmstack.load(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        lmstack.load(ckpt)
    (ckpt / "config.json").write_text('{"family": "gpt", ')
    with pytest.raises(FormatError, match="corrupt checkpoint config"):
        lmstack.load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        lmstack.load(ckpt)


def test_a_hugging_face_directory_points_to_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(CheckpointError, match=r"a Hugging Face 'gpt2' checkpoint, not an lmstack one; import it with `lmstack convert"):
        lmstack.load(tmp_path)

"""A damaged or mismatched checkpoint directory gives one clear CheckpointError naming the problem;
checksums catch the damage that safetensors loads without complaint."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.cli import main
from lmstack.errors import CheckpointError, ConfigError, FormatError, InputError
from lmstack.models.checkpoint import family_class
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers import load_tokenizer
from lmstack.tokenizers.char import CharTokenizer


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint as an older lmstack saved it (no checksums.json): the tests below edit its
    files by hand and check that the structural checks still name each problem."""
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", vocab_size=50)).save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checksums.json").unlink()
    return tmp_path / "ckpt"


@pytest.fixture
def summed(tmp_path):
    """A checkpoint as lmstack saves it now, with its tokenizer and checksums.json."""
    torch.manual_seed(0)
    tok = CharTokenizer.train(["hello world"])
    GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path / "summed", tok)
    return tmp_path / "summed"


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


def test_checksums_list_the_sha256_of_each_file(summed):
    sums = json.loads((summed / "checksums.json").read_text())["sha256"]
    assert set(sums) == {"model.safetensors", "config.json", "tokenizer.json"}
    for name, digest in sums.items():
        assert digest == hashlib.sha256((summed / name).read_bytes()).hexdigest()


def _flip_a_weight_byte(path):
    """Flip one bit in the middle of the tensor data (past the header): safetensors still reads it."""
    blob = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    blob[(header + len(blob)) // 2] ^= 0x10
    path.write_bytes(bytes(blob))


def test_a_flipped_bit_in_the_weights_is_caught_on_load_and_by_verify(summed, capsys):
    before = {k: v.clone() for k, v in load_file(summed / "model.safetensors").items()}
    _flip_a_weight_byte(summed / "model.safetensors")
    after = load_file(summed / "model.safetensors")  # the class of damage: it loads without complaint
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt: its sha256 differs from checksums.json"):
        lmstack.load(summed)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        GPT.load(summed)
    capsys.readouterr()
    assert main(["verify", str(summed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors: corrupt" in err[0] and "earlier checkpoint" in err[0]


def test_verify_passes_intact_checkpoints_old_and_new(summed, ckpt, capsys):
    assert main(["verify", str(summed), str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok {summed}", f"ok {ckpt} (no checksums.json: saved by an older lmstack, so only file sizes were checked)"]
    model, tok = lmstack.load(summed)  # checked and loaded
    assert tok.encode("hello") == load_tokenizer(summed / "tokenizer.json").encode("hello")
    assert main(["verify", str(summed.parent / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {summed.parent / 'nope'}: no such directory; pass a checkpoint or training run directory"
    ]


def test_a_tampered_tokenizer_or_config_is_caught(summed):
    (summed / "tokenizer.json").write_text((summed / "tokenizer.json").read_text() + "\n")
    with pytest.raises(CheckpointError, match="tokenizer.json: corrupt"):
        lmstack.load(summed)
    (summed / "checksums.json").unlink()  # a deliberate edit: dropping the checksums accepts it
    lmstack.load(summed)


def test_a_truncated_file_is_named_with_or_without_checksums(summed, ckpt, capsys):
    for d in (summed, ckpt):
        blob = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt: its sha256 differs"):
        lmstack.load(summed)
    assert main(["verify", str(ckpt)]) == 2
    assert "model.safetensors: damaged: " in capsys.readouterr().err


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


BAD_CONFIGS = {
    "gpt": ({"n_embd": 64, "n_head": 3}, "must be divisible by n_head"),
    "rnn": ({"cell": "xyz"}, "cell must be"),
    "ffn": ({"order": 1}, "order must be >= 2"),
    "bert": ({"d_model": 30, "n_heads": 4}, "must be divisible"),
    "t5": ({"activation": "swish"}, "activation must be"),
}


@pytest.mark.parametrize("family", BAD_CONFIGS)
def test_an_invalid_model_config_is_an_input_error(family):
    """One exception family: the CLI prints a bad size as one line (InputError); code that caught
    the ValueError these configs raised before still catches it."""
    values, message = BAD_CONFIGS[family]
    with pytest.raises(ConfigError, match=message) as raised:
        family_class(family).config_class(**values)
    assert isinstance(raised.value, InputError) and isinstance(raised.value, ValueError)


def test_a_hugging_face_directory_points_to_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(
        CheckpointError, match=r"a Hugging Face 'gpt2' checkpoint, not an lmstack one; import it with `lmstack convert"
    ):
        lmstack.load(tmp_path)


def test_a_training_run_passed_as_a_checkpoint_names_its_newest_checkpoint(ckpt, tmp_path):
    run = tmp_path / "run"
    for step in ("step_0000010", "step_0000020"):
        shutil.copytree(ckpt, run / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="is a training run, not a checkpoint.*step_0000020"):
        lmstack.load(run)

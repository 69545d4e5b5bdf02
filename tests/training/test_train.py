import json
import math

import pytest
import torch

from lmstack.cli import main
from lmstack.cli.train import shipped_configs
from lmstack.errors import InputError
from lmstack.models import load
from lmstack.training import checkpoint
from lmstack.training.metrics import read_metrics
from lmstack.training.pretrain import train
from lmstack.training.step import DivergenceError


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_metrics_validation_and_checkpoints(tiny, tmp_path):
    last = train(tiny(tmp_path, max_steps=8, eval_interval=2, ckpt_interval=2, keep_last=1, peak_flops=1e12))
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(steps[0])
    assert steps[-1]["tokens"] == 8 * 4 * 32
    assert [r["step"] for r in vals] == [2, 4, 6, 8]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in vals)
    model, tok = load(checkpoint.list_checkpoints(tmp_path)[-1])
    flops = model.flops_per_token(32)
    assert steps[-1]["mfu"] == pytest.approx(flops * steps[-1]["tokens_per_s"] / 1e12)
    assert last["val_loss"] == vals[-1]["val_loss"]
    # kept: the last checkpoint and the best-validated one
    best = min(vals, key=lambda r: r["val_loss"])["step"]
    assert {p.name for p in checkpoint.list_checkpoints(tmp_path)} == {f"step_{8:07d}", f"step_{best:07d}"}
    # a checkpoint is a model directory: reloaded, it scores text
    ids = torch.tensor([tok.encode("ROMEO: hello")])
    assert torch.isfinite(model.token_logprobs(ids)).all()
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["max_steps"] == 8 and saved["model"] == {"n_layer": 1, "n_head": 2, "n_embd": 32}
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_mfu_is_null_on_cpu_without_a_peak(tiny, tmp_path):
    train(tiny(tmp_path, max_steps=1))
    assert read_metrics(tmp_path)[0]["mfu"] is None


def test_nan_loss_stops_with_a_clear_message_or_is_skipped(tiny, tmp_path):
    with pytest.raises(DivergenceError, match=r"loss is nan at step \d+; lower --lr"):
        train(tiny(tmp_path / "a", lr=1e30, min_lr=0.0, warmup_steps=0, max_steps=10))
    train(tiny(tmp_path / "b", lr=1e30, min_lr=0.0, warmup_steps=0, max_steps=4, skip_nonfinite=True))
    records = losses(tmp_path / "b")
    assert len(records) == 4 and any(r is None for r in records)


def test_an_existing_run_must_be_resumed_explicitly(tiny, tmp_path):
    train(tiny(tmp_path, max_steps=1))
    with pytest.raises(InputError, match="already holds checkpoints; continue it with `lmstack train --resume"):
        train(tiny(tmp_path, max_steps=2))


# Shrinks each shipped config to a few seconds, keeping its family, objective and tokenizer kind.
SHRINK = {
    "gpt": ["--model", "n_layer=1", "--model", "n_head=2", "--model", "n_embd=32"],
    "rnn": ["--preset", "tiny"],
    "bert": ["--model", "d_model=32", "--model", "n_layers=1", "--model", "n_heads=2", "--model", "d_ff=64"],
    "t5": [
        "--model",
        "d_model=32",
        "--model",
        "d_kv=8",
        "--model",
        "d_ff=64",
        "--model",
        "n_layers=1",
        "--model",
        "n_decoder_layers=1",
        "--model",
        "n_heads=2",
    ],
}
TRAIN_CONFIGS = ["shakespeare-char", "shakespeare-bpe", "lstm-zaremba-medium", "bert-mlm", "t5-span", "gpt2-124m"]
CASES = [(name, None) for name in TRAIN_CONFIGS] + [("bert-mlm", "nsp"), ("bert-mlm", "rtd")]


@pytest.mark.parametrize("name,objective", CASES, ids=[f"{n}-{o}" if o else n for n, o in CASES])
def test_each_shipped_config_trains_end_to_end(name, objective, small_text, tmp_path):
    from lmstack.training.config import read_file

    family = read_file(shipped_configs()[name]).get("family", "gpt")
    args = [
        "train",
        "--config",
        name,
        "--data",
        str(small_text),
        "--out-dir",
        str(tmp_path),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--tokens-per-step",
        "0",
        "--eval-batches",
        "1",
        "--vocab-size",
        "300",
        "--no-compile",
        *SHRINK[family],
    ]
    if name == "gpt2-124m":
        args += ["--preset", "tiny"]
    if objective:
        args += ["--objective", objective]
    assert main(args) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("val_loss" in r for r in records)
    model, _ = load(checkpoint.latest(tmp_path))
    assert model.family == family


def test_cli_reports_bad_input_in_one_line(cli, tmp_path):
    r = cli("train", "--data", tmp_path / "missing.txt", "--out-dir", tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: no such file; check the path"]
    r = cli("train", "--config", "no-such-config")
    assert r.returncode == 2 and "not a shipped config" in r.stderr
    r = cli("train", "--resume", tmp_path)
    assert r.returncode == 2 and "train_config.json" in r.stderr


def test_out_of_memory_names_the_micro_batch_setting(tiny, tmp_path, monkeypatch):
    from lmstack.training import objectives

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(objectives.CausalLM, "forward", oom)
    with pytest.raises(InputError, match=r"out of memory with micro-batches of 4 × 32 tokens; lower --batch-size"):
        train(tiny(tmp_path, max_steps=1))


def test_prepare_only_then_train_from_the_shard_directory(small_text, tmp_path, capsys):
    assert (
        main(["train", "--prepare-only", "--data", str(small_text), "--out-dir", str(tmp_path / "prep"), "--tokenizer", "word"])
        == 0
    )
    assert "prepared" in capsys.readouterr().out
    shard_dir = tmp_path / "prep" / "data"
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert (
        main(
            [
                "train",
                "--data",
                str(shard_dir),
                "--out-dir",
                str(tmp_path / "run"),
                "--max-steps",
                "1",
                "--block-size",
                "16",
                "--batch-size",
                "2",
                "--model",
                "n_layer=1",
                "--model",
                "n_embd=16",
                "--model",
                "n_head=2",
            ]
        )
        == 0
    )
    _, tok = load(checkpoint.latest(tmp_path / "run"))
    assert tok.kind == "word" and tok.fingerprint() == manifest["tokenizer"]
    assert not (tmp_path / "run" / "data").exists()  # the given shards were used, not re-made


def test_float16_loss_scale_is_checkpointed_and_resumed(tiny, tmp_path):
    def scaler():
        return json.loads((checkpoint.latest(tmp_path) / checkpoint.STATE_FILE).read_text())["scaler"]

    train(tiny(tmp_path, max_steps=3, dtype="float16"))
    assert scaler()["scale"] == 2.0**16 and scaler()["_growth_tracker"] == 3  # three finite steps
    train(tiny(tmp_path, max_steps=5, dtype="float16"), resume=True)
    assert scaler()["_growth_tracker"] == 5  # counted on from the checkpoint, not from zero
    assert train(tiny(tmp_path / "bf16", max_steps=1, dtype="bfloat16"))["loss"] > 0

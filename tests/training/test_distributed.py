"""Two processes with gloo on CPU train exactly like one process with the same global batch."""

import os
import subprocess
import sys

import pytest

from lmstack.training import checkpoint
from lmstack.training.config import TrainConfig
from lmstack.training.metrics import read_metrics
from lmstack.training.pretrain import train

ARGS = [
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--max-steps",
    "4",
    "--warmup-steps",
    "1",
    "--eval-interval",
    "2",
    "--eval-batches",
    "2",
    "--model",
    "n_layer=1",
    "--model",
    "n_embd=32",
    "--model",
    "n_head=2",
]


def curve(run_dir):
    return [r.get("loss", r.get("val_loss")) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def single(small_text, tmp_path_factory):
    """One process, batch 4 with 2 accumulation steps = a global batch of 8 sequences."""
    out = tmp_path_factory.mktemp("single")
    train(
        TrainConfig(
            out_dir=str(out),
            data=[str(small_text)],
            block_size=32,
            batch_size=4,
            tokens_per_step=8 * 32,
            max_steps=4,
            warmup_steps=1,
            eval_interval=2,
            eval_batches=2,
            model={"n_layer": 1, "n_embd": 32, "n_head": 2},
        )
    )
    return small_text, curve(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(single, parallel, tmp_path):
    data, expected = single
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lmstack.cli",
        "train",
        "--data",
        str(data),
        "--out-dir",
        str(tmp_path),
        "--parallel",
        parallel,
        *ARGS,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, LMSTACK_NO_PROGRESS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("done:") == 1  # rank 0 alone reports
    assert curve(tmp_path) == pytest.approx(expected, rel=1e-5)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000004"]
    assert sorted(p.name for p in checkpoint.latest(tmp_path).glob("rng_*")) == ["rng_0.safetensors", "rng_1.safetensors"]

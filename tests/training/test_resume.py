"""Exact resume: from a checkpoint, and after SIGTERM stops a run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmstack.training import checkpoint
from lmstack.training.metrics import read_metrics
from lmstack.training.pretrain import train


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny, tmp_path):
    # dropout and gradient accumulation on, so RNG state and micro-batch positions must resume exactly
    kw = dict(model={"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.2}, tokens_per_step=8 * 32, decay_steps=20)
    train(tiny(tmp_path / "a", max_steps=20, **kw))
    train(tiny(tmp_path / "b", max_steps=10, **kw))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "b")] == ["step_0000010"]
    train(tiny(tmp_path / "b", max_steps=20, **kw), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 20
    assert a == b  # bit for bit
    assert a[-1] < a[0]


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues(cli, small_text, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lmstack.cli",
        "train",
        "--data",
        str(small_text),
        "--out-dir",
        str(run),
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "100000",
        "--eval-interval",
        "0",
        "--ckpt-interval",
        "0",
        "--model",
        "n_layer=1",
        "--model",
        "n_embd=32",
        "--model",
        "n_head=2",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, LMSTACK_NO_PROGRESS="1")
    )
    for _ in range(300):  # wait (up to about a minute) for the first logged step
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text():
            break
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training logged no step within about a minute")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as a shell reports a terminated process
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and last.endswith(f"continue with `lmstack train --resume {run}`")
    ckpt = checkpoint.latest(run)
    step = json.loads((ckpt / checkpoint.STATE_FILE).read_text())["step"]
    cli("train", "--resume", run, "--max-steps", step + 2, check=True)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, step + 3))

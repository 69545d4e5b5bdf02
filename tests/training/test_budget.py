"""--max-minutes: the run times its first steps, fits the schedule into the budget, stops in time."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import InputError
from lmstack.training import budget, checkpoint, pretrain
from lmstack.training.config import TrainConfig
from lmstack.training.metrics import read_metrics
from lmstack.training.optim import lr_at
from lmstack.training.pretrain import train

SLACK_S = 30  # a generous allowance for a loaded machine: the assertions are about structure
PLAN = dict(max_steps=10**6, max_minutes=0.1, schedule="wsd", warmup_steps=10, lr=1e-3, min_lr=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    """Time steps on one thread: on a loaded 2-core machine a spinning thread pool stalls at random."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_records(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def saved_max_steps(run_dir):
    return json.loads((run_dir / "train_config.json").read_text())["max_steps"]


def test_the_schedule_is_fitted_to_the_budget_and_completes(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "MARGIN", 0.5)  # half the budget spare, so a load spike cannot stop it early
    cfg = tiny(tmp_path, eval_interval=50, **{**PLAN, "max_minutes": 0.2})
    t0 = time.perf_counter()
    last = train(cfg)
    seconds = time.perf_counter() - t0
    planned = saved_max_steps(tmp_path)
    records = step_records(tmp_path)
    assert 10 <= planned < cfg.max_steps and last["stopped"] is None
    assert [r["step"] for r in records] == list(range(1, planned + 1))
    # every step, the timed ones included, had the planned schedule's rate: warm-up to lr, decay to min_lr
    planned_cfg = dataclasses.replace(cfg, max_steps=planned)
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, planned_cfg) for s in range(planned)])
    assert records[-1]["lr"] == pytest.approx(cfg.min_lr) and max(r["lr"] for r in records) == pytest.approx(cfg.lr)
    assert checkpoint.latest(tmp_path).name == f"step_{planned:07d}" and last.get("val_loss") is not None
    assert seconds < 60 * cfg.max_minutes + SLACK_S
    assert f"budget 0.2 min: {planned} steps of ~" in capsys.readouterr().out


def test_out_of_time_ends_the_run_early_and_resume_keeps_the_plan(tiny, tmp_path, monkeypatch):
    """Steps slower than the timed ones: the run stops in time as at the end of a run
    (validated and checkpointed, not an error); --resume then finishes the same schedule."""

    def slower_after_planning(step, cfg):
        if step >= 10:
            time.sleep(0.05)
        return lr_at(step, cfg)

    with monkeypatch.context() as m:
        m.setattr(pretrain, "lr_at", slower_after_planning)
        t0 = time.perf_counter()
        last = train(tiny(tmp_path, **PLAN))
        seconds = time.perf_counter() - t0
    planned = saved_max_steps(tmp_path)
    assert last["stopped"] == "time" and 10 <= last["step"] < planned
    assert seconds < 60 * PLAN["max_minutes"] + SLACK_S
    assert checkpoint.latest(tmp_path).name == f"step_{last['step']:07d}" and last.get("val_loss") is not None

    # the plan is in the saved config; on resume --max-minutes bounds only the new invocation
    assert main(["train", "--resume", str(tmp_path), "--max-minutes", "1"]) == 0
    assert saved_max_steps(tmp_path) == planned
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, planned + 1))
    assert records[-1]["lr"] == pytest.approx(PLAN["min_lr"])


def test_a_negative_budget_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(InputError, match=r"max_minutes must be >= 0"):
        TrainConfig(max_minutes=-0.5)
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--out-dir", str(tmp_path / "run"), "--max-minutes", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: invalid training config: max_minutes must be >= 0 (0 = no time limit)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_two_processes_agree_on_the_plan_and_the_stop(small_text, tmp_path):
    """Under torchrun each rank times its own steps; all must plan the same max_steps and stop at
    the same step, or their collectives would hang or fail."""
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
        str(small_text),
        "--out-dir",
        str(tmp_path),
        "--max-minutes",
        "0.1",
        "--max-steps",
        "100000",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--warmup-steps",
        "10",
        "--eval-interval",
        "50",
        "--eval-batches",
        "2",
        "--model",
        "n_layer=1",
        "--model",
        "n_embd=32",
        "--model",
        "n_head=2",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, LMSTACK_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    planned = saved_max_steps(tmp_path)
    assert r.stdout.count("budget 0.1 min:") == 1 and f"{planned} steps of ~" in r.stdout  # rank 0 alone reports
    steps = [s["step"] for s in step_records(tmp_path)]
    assert 10 <= steps[-1] <= planned < 100000 and steps == list(range(1, steps[-1] + 1))
    assert checkpoint.latest(tmp_path).name == f"step_{steps[-1]:07d}"
    assert sorted(p.name for p in checkpoint.latest(tmp_path).glob("rng_*")) == ["rng_0.safetensors", "rng_1.safetensors"]

"""Training runs that fail cleanly and resume through damage.

- a run that fails before its first checkpoint leaves its directory as it found it (but for
  reusable token shards, and says so), and what can be checked is checked before any write;
- a run killed before its first checkpoint is started again, not resumed, and its metrics are
  not repeated; a cut-off last metrics line is dropped;
- resume skips damaged checkpoints (truncated weights or optimizer state, a missing rng file,
  a flipped bit) and goes on from the newest intact one, bit for bit;
- SIGINT / SIGTERM exit 130 / 143 and say how to resume;
- kill -9 at random moments, inside a checkpoint write too, then damage: still bit-identical.

Runs train from a prepared shard directory (no tokenizing) on one thread: these tests share two
cores with others, and one thread is faster there and gives the same numbers in every process.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import CheckpointError, DivergenceError, InputError
from lmstack.models import load
from lmstack.training import checkpoint
from lmstack.training.config import TrainConfig
from lmstack.training.metrics import METRICS_FILE, read_metrics
from lmstack.training.pretrain import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(small_text, tmp_path_factory):
    """A prepared shard directory (with its tokenizer) for --data: runs skip tokenizing."""
    out = tmp_path_factory.mktemp("prep")
    assert main(["train", "--prepare-only", "--data", str(small_text), "--out-dir", str(out)]) == 0
    return out / "data"


def config(out, shards, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out),
        data=[str(shards)],
        block_size=32,
        batch_size=4,
        max_steps=8,
        warmup_steps=2,
        eval_interval=0,
        eval_batches=1,
        ckpt_interval=2,
        keep_last=2,
        model=dict(TINY),
        decay_steps=12,
    )
    return TrainConfig(**{**base, **kw})


def flags(cfg: TrainConfig) -> list[str]:
    """The `lmstack train` flags for a config built by `config`."""
    out = ["--data", *cfg.data, "--out-dir", cfg.out_dir]
    for name in (
        "block_size",
        "batch_size",
        "max_steps",
        "warmup_steps",
        "eval_interval",
        "eval_batches",
        "ckpt_interval",
        "keep_last",
        "decay_steps",
    ):
        out += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return out + [a for k, v in cfg.model.items() for a in ("--model", f"{k}={v}")]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def snapshot(path) -> dict:
    """Every file under `path` with its bytes: "as the command found it" compares these."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- failing before the first checkpoint ---------------------------------------------------


def test_a_bad_model_config_fails_before_tokenizing_and_writes_nothing(small_text, tmp_path, monkeypatch, capsys):
    from lmstack.training import pretrain

    monkeypatch.setattr(pretrain, "prepare_shards", lambda *a, **k: pytest.fail("the corpus was tokenized"))
    monkeypatch.setattr(pretrain, "_base_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    out = tmp_path / "run"
    args = ["train", "--data", str(small_text), "--out-dir", str(out)]
    cases = [
        (
            ["--model", "n_embd=64", "--model", "n_head=3"],
            "invalid gpt model config: n_embd (64) must be divisible by n_head (3)",
        ),
        (["--family", "transformer"], "--family 'transformer': not a model family; known: "),
        (["--model", "n_layers=2"], "--model: GPTConfig has no fields ['n_layers']"),
        (["--tokenizer", "sentencepiece"], "--tokenizer 'sentencepiece' is neither a tokenizer file/directory nor a kind"),
    ]
    for extra, message in cases:
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
        assert not out.exists()


def test_a_failed_run_removes_what_it_made_but_reusable_shards(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the run directory stays untouched
    bad = TrainConfig(
        out_dir=str(out),
        data=[str(small_text)],
        block_size=32,
        batch_size=4,
        max_steps=4,
        warmup_steps=0,
        eval_interval=0,
        ckpt_interval=0,
        model=dict(TINY),
        lr=1e30,
        min_lr=0.0,
    )
    with pytest.raises(DivergenceError):
        train(bad)
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert f"kept the token shards in {out / 'data'}; the same command reuses them" in capsys.readouterr().out
    manifest = (out / "data" / "manifest.json").stat().st_mtime_ns
    train(TrainConfig(**{**bad.to_dict(), "lr": 1e-3, "min_lr": 1e-4}))  # the same command, fixed
    assert (out / "data" / "manifest.json").stat().st_mtime_ns == manifest  # shards reused, not made again
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 4]  # four steps and the final validation, once each

    fresh = tmp_path / "fresh"  # a directory the run created goes entirely (here: no data cached in it)
    with pytest.raises(DivergenceError):
        train(config(fresh, shards=out / "data", lr=1e30, min_lr=0.0, warmup_steps=0, ckpt_interval=0))
    assert not fresh.exists()


def test_a_run_killed_before_its_first_checkpoint_is_started_again(shards, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, shards, max_steps=3, ckpt_interval=0)
    train(cfg)
    first = losses(run)
    # what a kill -9 before the first checkpoint leaves: no checkpoint, and metrics with a cut-off last line
    shutil.rmtree(run / checkpoint.CHECKPOINTS)
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "tok')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 3]  # the cut-off line is dropped, not fatal
    with pytest.raises(
        CheckpointError,
        match=r"stopped before its first checkpoint, so there is nothing to resume; "
        r"start it again with the same command",
    ):
        train(cfg, resume=True)
    train(cfg)  # started again: the records are the new run's, not appended to the dead one's
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 3]
    assert losses(run) == first


def test_an_output_dir_that_is_a_file_is_refused(shards, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="--out-dir .*file: is a file, not a directory; pick another --out-dir"):
        train(config(tmp_path / "file", shards))
    assert (tmp_path / "file").read_text() == "mine"


# --- resuming through damage ---------------------------------------------------------------


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bit(path):
    blob = bytearray(path.read_bytes())
    blob[-9] ^= 0x01  # inside the last tensor's data: safetensors would load it without complaint
    path.write_bytes(bytes(blob))


DAMAGE = {
    "truncated optimizer": ("optimizer.safetensors", truncate),
    "truncated weights": ("model.safetensors", truncate),
    "missing rng": ("rng_0.safetensors", lambda p: p.unlink()),
    "flipped bit in weights": ("model.safetensors", flip_bit),
}


def test_resume_falls_back_past_a_damaged_checkpoint_bit_for_bit(shards, tmp_path, capsys):
    train(config(tmp_path / "ref", shards, max_steps=10))
    base = tmp_path / "base"
    train(config(base, shards, max_steps=6))  # checkpoints at steps 4 and 6
    for name, (file, damage) in DAMAGE.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(base, run)
        damage(run / checkpoint.CHECKPOINTS / "step_0000006" / file)
        capsys.readouterr()
        train(config(run, shards, max_steps=10), resume=True)
        said = capsys.readouterr().out
        assert (
            f"checkpoint step_0000006 is damaged, so the run resumes from step_0000004 (step_0000006 is set aside as "
            f"damaged_step_0000006): {run / 'checkpoints' / 'step_0000006' / file}"
        ) in said, name
        assert losses(run) == losses(tmp_path / "ref"), name  # steps 5..10 retrained from step 4, bit for bit
        assert (run / checkpoint.CHECKPOINTS / "damaged_step_0000006").is_dir(), name  # kept for a look, out of the way


def test_no_intact_checkpoint_says_to_start_again(shards, tmp_path):
    run = tmp_path / "run"
    train(config(run, shards, max_steps=2))
    truncate(checkpoint.latest(run) / "optimizer.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"no intact checkpoint to resume from \(.*optimizer.safetensors: corrupt.*\); "
        r"delete .*checkpoints and start the run again",
    ):
        train(config(run, shards, max_steps=4), resume=True)


def test_verify_names_the_damaged_checkpoint_of_a_run(shards, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(run, shards, max_steps=4))
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok {p}" for p in checkpoint.list_checkpoints(run)]
    (checkpoint.latest(run) / "rng_0.safetensors").unlink()
    assert main(["verify", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 damaged checkpoint(s): " in err[0] and "step_0000004/rng_0.safetensors: missing" in err[0]


# --- signals -------------------------------------------------------------------------------


def test_sigint_checkpoints_exits_130_and_says_how_to_resume(shards, tmp_path, monkeypatch, capsys):
    from lmstack.training import objectives

    forward, calls = objectives.CausalLM.forward, []

    def interrupted_at_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third step
        return forward(self, batch)

    monkeypatch.setattr(objectives.CausalLM, "forward", interrupted_at_step_3)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    assert main(["train", *flags(config(run, shards, max_steps=100, ckpt_interval=0))]) == 130
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"stopped by SIGINT at step 3; checkpoint {run / 'checkpoints' / 'step_0000003'}; "
        f"continue with `lmstack train --resume {run}`"
    )
    assert signal.getsignal(signal.SIGINT) is handler  # put back after the run


# --- the fault test ------------------------------------------------------------------------

# Runs `lmstack train ARGS`, killing itself with SIGKILL inside the second checkpoint write after
# it starts: every file of the checkpoint is written but its checksums, and it is not yet renamed.
KILLED_IN_A_WRITE = """
import os, signal, sys
from lmstack.training import checkpoint
from lmstack.cli import main
write, calls = checkpoint.write_checksums, []
def write_checksums(*args):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    write(*args)
checkpoint.write_checksums = write_checksums
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow  # about 30 s: a handful of interpreter starts
def test_kill_9_at_random_moments_then_damage_then_resume_is_bit_identical(shards, tmp_path, capsys):
    cfg = config(tmp_path / "run", shards, max_steps=40, ckpt_interval=3, decay_steps=40)
    run = tmp_path / "run"
    reference = tmp_path / "ref"
    train(config(reference, shards, max_steps=40, ckpt_interval=3, decay_steps=40))
    env = dict(os.environ, LMSTACK_NO_PROGRESS="1", OMP_NUM_THREADS="1")

    def start(script=None):
        """The run continued as a user would: resumed once it has a checkpoint, else started again."""
        args = ["--resume", str(run), *flags(cfg)[4:]] if checkpoint.list_checkpoints(run) else flags(cfg)
        head = ["-c", script] if script else ["-m", "lmstack.cli", "train"]
        return subprocess.Popen([sys.executable, *head, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def last_step() -> int:
        return max([r["step"] for r in read_metrics(run)], default=0)

    def resumed_from() -> int:
        found = checkpoint.list_checkpoints(run)
        return checkpoint.read_state(found[-1])["step"] if found else 0

    proc = start(KILLED_IN_A_WRITE)
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()
    assert list((run / checkpoint.CHECKPOINTS).glob(".step_*.tmp")), "the kill did not land inside a checkpoint write"
    rng = random.Random(15)
    kills = 0
    while kills < 3 or len(checkpoint.list_checkpoints(run)) < 2:  # a fallback needs an older checkpoint
        # kill -9 at a random moment: a random 0-100 ms after the run logs a random step 1-7 past its checkpoint
        target, proc = resumed_from() + rng.randint(1, 7), start()
        while last_step() < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        assert proc.poll() is None, f"the run ended before kill {kills + 1}: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert kills < 8
    newest = checkpoint.latest(run)
    truncate(newest / "optimizer.safetensors")  # and damage the newest checkpoint
    capsys.readouterr()
    train(cfg, resume=True)
    assert f"checkpoint {newest.name} is damaged" in capsys.readouterr().out
    assert losses(run) == losses(reference)  # every step's loss, bit for bit
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(reference)]
    mine, theirs = load(checkpoint.latest(run))[0].state_dict(), load(checkpoint.latest(reference))[0].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    state = json.loads((checkpoint.latest(run) / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 40 and not list((run / checkpoint.CHECKPOINTS).glob(".step_*.tmp"))

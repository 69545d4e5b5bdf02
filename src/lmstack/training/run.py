"""The run context every recipe shares: processes, the run directory, metrics, the time budget,
signals, checkpoints and exact resume.

A recipe reads:

    with Run(cfg, resume) as run:                 # processes, run dir, saved config
        ...build the model and objective...
        stepper = run.optimizer_step(objective)   # resumes weights, optimizer and rng
        run.begin(flops_per_token, eval_cost)     # metrics, progress bar, budget
        while not run.done:
            result = stepper(batch, accum, lr_at(run.step, run.cfg), run.step)
            run.end_step(result, lr, tokens)
            if run.eval_due: run.log_eval({"val_loss": ...})
            if run.checkpoint_due: run.save(stepper, tokenizer)
        return run.finish()

The run directory is created here, after the recipe has checked what it can; until the first
checkpoint is saved, a run that fails (or is interrupted) removes what it created there, but for
what the recipe asked to keep (`keep_on_failure`: pretraining's token shards, which the same
command reuses), and says so. `--resume` starts from the newest intact checkpoint, setting aside
damaged newer ones (see `checkpoint.resume_point`).

SIGINT / SIGTERM set a flag; the run checkpoints and stops at the end of the current step, and
`finish()` reports the signal so that the command exits 128 + its number (130, 143). With
`max_minutes`, the first steps are timed and max_steps lowered to what fits (see `budget`); the
resolved max_steps goes back into the run's train_config.json, so a resumed run keeps the plan.
tokens/s counts the tokens trained on (every process's, padding excluded); MFU = flops_per_token
× tokens/s ÷ (peak FLOP/s of one device × processes), null on a CPU (peak unknown).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path

import torch

from lmstack.errors import CheckpointError, InputError
from lmstack.progress import progress
from lmstack.training import checkpoint, distributed
from lmstack.training import config as config_mod
from lmstack.training.budget import Budget, calibration_steps
from lmstack.training.config import RunConfig
from lmstack.training.metrics import MetricsLog, peak_flops
from lmstack.training.step import OptimizerStep, StepResult


class _StopSignal:
    """SIGINT / SIGTERM set a flag; the run saves a checkpoint and returns after the step."""

    def __init__(self):
        self.stop = False
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_code(last: dict) -> int:
    """A command's exit status for a run's last metrics: 128 + the signal's number when a signal
    stopped it (130 for SIGINT, 143 for SIGTERM, as a shell reports a killed process), else 0."""
    return 128 + last["signal"] if last.get("stopped") == "signal" else 0


class NewEntries:
    """What a command adds to a directory, to remove if it fails: the directory itself if it did
    not exist, else the entries it did not hold before."""

    def __init__(self, path: Path):
        self.path = path
        self.before = {p.name for p in path.iterdir()} if path.is_dir() else None

    def new(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if self.before is None or p.name not in self.before]

    def remove(self, keep: list[Path]) -> list[Path]:
        """Remove the new entries but those in `keep`; returns the new entries kept."""
        keep_names = {p.name for p in keep if p.resolve().parent == self.path.resolve()}
        kept = []
        for entry in self.new():
            if entry.name in keep_names:
                kept.append(entry)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self.before is None and not kept:
            shutil.rmtree(self.path, ignore_errors=True)
        return kept


class Run:
    def __init__(self, cfg: RunConfig, resume: bool, command: str = "lmstack train"):
        self.cfg, self.resume, self.command = cfg, resume, command
        self.dir = Path(cfg.out_dir)
        self.start_time = time.perf_counter()
        self.saved = resume  # a checkpoint exists: from here on a failure keeps the run directory
        self._kept: dict[Path, str] = {}
        self._signals = _StopSignal()

    # --- setup ------------------------------------------------------------------------------

    def __enter__(self) -> "Run":
        self.d, self.device = distributed.setup(self.cfg.device)
        self.main = self.d.main
        try:
            self._open()
        except BaseException:
            distributed.teardown(self.d)
            raise
        return self

    def _open(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise InputError(f"--out-dir {self.dir}: is a file, not a directory; pick another --out-dir")
        if self.resume:
            self.ckpt = self._resume_point()
        elif checkpoint.list_checkpoints(self.dir):
            raise InputError(
                f"{self.dir} already holds checkpoints; continue it with `{self.command} --resume {self.dir}` "
                "or pick another --out-dir"
            )
        self.state: dict = checkpoint.read_state(self.ckpt) if self.resume else {}
        self.created = NewEntries(self.dir)
        if self.main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                config_mod.save(self.cfg, self.dir)
            except BaseException:
                self.created.remove(keep=[])
                raise

    def _resume_point(self) -> Path:
        """The newest intact checkpoint; damaged newer ones are named and set aside."""
        ckpt, damaged = checkpoint.resume_point(self.dir)
        if ckpt is None and not damaged:
            raise CheckpointError(
                f"{self.dir}: the run stopped before its first checkpoint, so there is nothing to resume; "
                f"start it again with the same command (its settings are saved: `{self.command} "
                f"--config {self.dir / config_mod.CONFIG_FILE}`)"
            )
        if ckpt is None:
            reasons = "; ".join(why for _, why in damaged)
            raise CheckpointError(
                f"{self.dir}: no intact checkpoint to resume from ({reasons}); delete "
                f"{self.dir / checkpoint.CHECKPOINTS} and start the run again with the same command"
            )
        distributed.barrier(self.d)  # every rank has chosen before any checkpoint is renamed
        if self.main:
            for bad, why in damaged:
                aside = checkpoint.set_aside(bad)
                self.write(
                    f"checkpoint {bad.name} is damaged, so the run resumes from {ckpt.name} ({bad.name} is set aside "
                    f"as {aside.name}): {why}"
                )
        distributed.barrier(self.d)
        return ckpt

    def keep_on_failure(self, path: Path, what: str) -> None:
        """Keep `path` (inside the run directory) should the run fail before its first checkpoint."""
        self._kept[Path(path)] = what

    def __exit__(self, exc_type, exc, tb) -> None:
        self._signals.__exit__()
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.log.close()
        if exc_type is not None and not self.saved and self.main:
            self._discard()
        distributed.teardown(self.d)

    def _discard(self) -> None:
        """A run that failed before its first checkpoint leaves its directory as it found it, but
        for what the recipe asked to keep."""
        what = {p.name: w for p, w in self._kept.items()}
        for p in self.created.remove(keep=list(self._kept)):
            print(f"kept {what[p.name]} in {p}; the same command reuses them")

    def optimizer_step(self, objective: torch.nn.Module) -> OptimizerStep:
        """The objective wrapped for the processes with its optimizer; on resume its weights,
        optimizer state and random state come from the checkpoint. Build the objective after
        `torch.manual_seed(cfg.seed)` so every rank starts alike (FSDP does not broadcast)."""
        if self.resume:
            checkpoint.load_weights(self.ckpt, objective)
        stepper = OptimizerStep(objective, self.cfg, self.d, self.device)
        if self.resume:
            checkpoint.load_optimizer(self.ckpt, stepper.wrapped, stepper.optimizer, self.state)
            checkpoint.load_rng(self.ckpt, self.d, self.device)
            if self.state.get("scaler"):
                stepper.scaler.load_state_dict(self.state["scaler"])
        else:
            torch.manual_seed(self.cfg.seed + self.d.rank)  # dropout differs across ranks
        self.stepper = stepper
        return stepper

    def begin(self, flops_per_token: float | None, eval_cost: float = 0.0, banner: str = "") -> None:
        """Start the clock, the metrics log and the progress bar. `eval_cost`: one validation
        pass in optimizer steps, for the time budget's plan."""
        s = self.state
        self.step, self.tokens = s.get("step", 0), s.get("tokens", 0)
        self.best, self.elapsed = s.get("best_val_loss"), s.get("elapsed_s", 0.0)
        self.flops, self.peak = flops_per_token, peak_flops(self.cfg.peak_flops, self.device)
        self.log = MetricsLog(self.dir, self.main, self.cfg.tensorboard, resume_step=self.step if self.resume else None)
        self.budget = Budget(self.cfg.max_minutes, self.start_time, eval_cost) if self.cfg.max_minutes else None
        self.last: dict = {}
        self.stopped: str | None = None
        self.out_of_time = self.stopping = False
        self.val_loss = None
        self._signals.__enter__()
        if banner:
            self.write(f"{banner}, device {self.device}, {self.stepper.dtype}; run dir {self.dir}")
        self.bar = progress(total=self.cfg.max_steps, initial=self.step, desc="training", unit="step")
        self.stepper.objective.train()
        self._t0 = time.perf_counter()

    def write(self, message: str) -> None:
        if self.main:
            bar = getattr(self, "bar", None)
            (bar.write if bar is not None else print)(message)

    # --- each step ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.max_steps or self.stopped is not None

    @property
    def at_end(self) -> bool:
        return self.step == self.cfg.max_steps or self.out_of_time

    @property
    def eval_due(self) -> bool:
        return bool(self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0) or self.at_end

    @property
    def checkpoint_due(self) -> bool:
        return self.at_end or self.stopping or bool(self.cfg.ckpt_interval and self.step % self.cfg.ckpt_interval == 0)

    def end_step(self, result: StepResult, lr: float, tokens: int | None = None, **extra) -> None:
        """Count the step (`tokens` trained on, all processes; default: the step's own count), log
        it, and decide whether the run stops here (schedule done, out of time, or a signal)."""
        tokens = result.tokens if tokens is None else tokens
        self.step += 1
        self.tokens += tokens
        dt = time.perf_counter() - self._t0
        self.elapsed += dt
        tps = tokens / dt
        mfu = self.flops * tps / (self.peak * self.d.world) if self.peak and self.flops else None
        self.last = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tps,
            "mfu": mfu,
            "skipped": not result.finite,
            **extra,
        }
        self.log.log(self.last)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        self.val_loss = None
        if self.budget:
            self.budget.record(time.perf_counter() - self._t0)  # the step with its logging, without validation
            if self.step == calibration_steps(self.cfg.warmup_steps) and self.step < self.cfg.max_steps:
                self._plan()
            # the budget's hard stop, for steps slower than the plan assumed
            self.out_of_time = self.step < self.cfg.max_steps and distributed.any_(self.budget.out_of_time(), self.d)
        self.stopping = distributed.any_(self._signals.stop, self.d)
        if self.stopping or self.out_of_time:
            self.stopped = "signal" if self.stopping else "time"
        self._t0 = time.perf_counter()

    def log_eval(self, record: dict) -> None:
        """Log a validation record (its `val_loss`, if any, picks the best checkpoint)."""
        self.val_loss = record.get("val_loss")
        if self.val_loss is not None:
            self.best = self.val_loss if self.best is None else min(self.best, self.val_loss)
        self.log.log({"step": self.step, "tokens": self.tokens, **record})
        self.last.update(record)
        shown = [f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)]
        if "loss" in self.last:
            shown.insert(0, f"train loss {self.last['loss']:.4f}")
        self.write(f"step {self.step}: {', '.join(shown)}")
        self._t0 = time.perf_counter()  # validation time is not step time

    def save(self, tokenizer, adapter_base: str | None = None, **extra_state) -> Path:
        """Checkpoint the step (every rank must call this: FSDP gathers shards collectively); a
        LoRA run's as an adapter directory naming its base."""
        s = self.stepper
        state = {
            "tokens": self.tokens,
            "val_loss": self.val_loss,
            "best_val_loss": self.best,
            "elapsed_s": self.elapsed,
            "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None,
            **extra_state,
        }
        path = checkpoint.save(
            self.dir,
            self.step,
            s.wrapped,
            s.objective,
            s.optimizer,
            state,
            tokenizer,
            self.d,
            self.device,
            self.cfg.keep_last,
            adapter_base,
        )
        self.saved = True
        if self.stopping:
            self.write(
                f"stopped by {self._signal().name} at step {self.step}; checkpoint {path}; "
                f"continue with `{self.command} --resume {self.dir}`"
            )
        elif self.out_of_time:
            self.write(
                f"out of time ({self.cfg.max_minutes:g} min) at step {self.step} of {self.cfg.max_steps}; checkpoint "
                f"{path}; finish the schedule with `{self.command} --resume {self.dir}`"
            )
        self._t0 = time.perf_counter()
        return path

    def finish(self) -> dict:
        """The last metrics, with `stopped`: None, "signal" (and `signal`, its number: see
        `exit_code`) or "time"."""
        if self.last:
            self.last["stopped"] = self.stopped
            if self.stopped == "signal":
                self.last["signal"] = int(self._signal())
        return self.last

    def _signal(self) -> signal.Signals:
        """The signal that stopped the run (on a rank that did not receive it: SIGTERM, which
        torchrun forwards)."""
        return signal.Signals(self._signals.signum or signal.SIGTERM)

    def _plan(self) -> None:
        """Lower max_steps to the steps that fit the budget and save it in the run directory. Every
        rank plans from the same numbers (averaged over ranks) so all agree."""
        cfg, budget = self.cfg, self.budget
        agreed = distributed.mean(torch.tensor([budget.elapsed(), budget.step_seconds()], device=self.device), self.d).tolist()
        steps = budget.plan(self.step, cfg.max_steps, cfg.eval_interval, *agreed)
        note = " (all of --max-steps fit)" if steps == cfg.max_steps else ""
        if steps <= cfg.warmup_steps:
            note += (
                f"; the warm-up ({cfg.warmup_steps} steps) does not end in time, so the learning rate never decays: "
                "lower --warmup-steps"
            )
        self.write(f"budget {cfg.max_minutes:g} min: {steps} steps of ~{agreed[1]:.3g} s{note}")
        if steps == cfg.max_steps:
            return
        self.cfg = dataclasses.replace(cfg, max_steps=steps)
        self.stepper.cfg = self.cfg
        if self.main:
            config_mod.save(self.cfg, self.dir)
        self.bar.total = steps
        self.bar.refresh()

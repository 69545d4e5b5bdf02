"""The optimizer step every recipe shares.

One step: set the learning rate; run `accum` micro-batches, each forward under autocast and
backward with the loss divided by `accum` (gradients synchronise across processes only on the
last one: DDP's `no_sync`, FSDP's `set_requires_gradient_sync`); stop on a NaN/inf loss (or skip
the step, by option); unscale (fp16), clip the gradient norm, step, zero the gradients.

A recipe brings an objective (a module whose `forward(batch)` returns the loss and whose
`.model` is the model it trains) and a function from micro-batch index to batch; the step
brings everything else. Only parameters that require grad are optimised, so a LoRA run's
optimizer holds state for its adapters alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmstack.errors import DivergenceError, InputError
from lmstack.training import distributed
from lmstack.training.config import RunConfig
from lmstack.training.distributed import Dist
from lmstack.training.optim import make_optimizer


def autocast_for(dtype: str, device: torch.device):
    """(autocast context, dtype name) for `--dtype` on `device`."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(device.type, dtype=getattr(torch, dtype)), dtype


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and processes
    grad_norm: float
    finite: bool  # False: the step was skipped (--skip-nonfinite)
    tokens: int | None = None  # tokens trained on, all processes (when the step was given `count`)


class OptimizerStep:
    """Wraps `objective` for the processes (DDP / FSDP), builds its optimizer and runs steps."""

    def __init__(self, objective: torch.nn.Module, cfg: RunConfig, d: Dist, device: torch.device):
        self.objective, self.cfg, self.d, self.device = objective, cfg, d, device
        objective.to(device)
        if cfg.compile:
            objective.compile()
        self.wrapped = distributed.wrap(objective, d, cfg.parallel, device)
        self.optimizer = make_optimizer(objective, cfg, device.type)
        self.autocast, self.dtype = autocast_for(cfg.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == "float16")
        self.fsdp = d.enabled and cfg.parallel == "fsdp"

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss(self, batch: dict) -> torch.Tensor:
        """The objective's loss on one batch, under autocast (for evaluation: call in no_grad)."""
        with self.autocast:
            return self.wrapped(self.to_device(batch))

    def __call__(
        self, batch: Callable[[int], dict], accum: int, lr: float, step: int, count: Callable[[dict], torch.Tensor] | None = None
    ) -> StepResult:
        """One optimizer step over micro-batches `batch(0) .. batch(accum - 1)`; `count(batch)`
        gives the tokens a micro-batch trains on (padding excluded), summed into `tokens`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        trained = torch.zeros((), dtype=torch.long)
        shape = "?"
        try:
            for micro in range(accum):
                sync = micro == accum - 1
                if self.fsdp:
                    self.wrapped.set_requires_gradient_sync(sync)
                no_sync = self.wrapped.no_sync() if self.d.enabled and not self.fsdp and not sync else contextlib.nullcontext()
                micro_batch = batch(micro)
                if count is not None:
                    trained += count(micro_batch)
                shape = " × ".join(map(str, next(v for v in micro_batch.values() if torch.is_tensor(v)).shape))
                with no_sync:
                    loss = self.loss(micro_batch)
                    self.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float()
        except torch.OutOfMemoryError:
            raise InputError(
                f"out of memory with micro-batches of {shape} tokens; lower --batch-size (gradient "
                "accumulation keeps the tokens per step) or the sequence length"
            ) from None
        loss_val = float(distributed.mean(loss_sum / accum, self.d))
        finite = math.isfinite(loss_val)
        if not finite and not self.cfg.skip_nonfinite:
            raise DivergenceError(
                f"loss is {loss_val} at step {step}; lower --lr, raise --warmup-steps, check the data, or resume "
                f"from the last checkpoint in {self.cfg.out_dir} (--skip-nonfinite skips such steps)"
            )
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.objective.parameters() if p.requires_grad], self.cfg.grad_clip or float("inf")
        )
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(distributed.sum_(trained.to(self.device), self.d)) if count is not None else None
        return StepResult(loss_val, norm, finite, tokens)

    @torch.no_grad()
    def mean_loss(self, batch: Callable[[int], dict], n: int) -> float:
        """The mean loss over `n` batches split over the processes (`batch(k)`, k = 0..n-1)."""
        self.objective.eval()
        total = torch.zeros(2, device=self.device)
        world = self.d.world
        for k in range(math.ceil(n / world)):  # equal counts per rank (FSDP collectives)
            total[0] += self.loss(batch(k * world + self.d.rank)).float()
            total[1] += 1
        self.objective.train()
        total = distributed.sum_(total, self.d)
        return float(total[0] / total[1])

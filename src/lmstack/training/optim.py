"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules.

Weight decay pulls weights toward zero; that regularises matrices (and embeddings) but only
hurts biases and norm gains, which are vectors, so those go in a group without decay (the
nanoGPT and GPT-3 practice). The schedule is a pure function of the step, so resuming a run
needs only the step number.
"""

from __future__ import annotations

import math

import torch

from lmstack.training.config import RunConfig


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device_type: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied matrix once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CUDA and, since torch 2.4, the CPU) updates all parameters in one pass.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device_type in ("cuda", "cpu") or None
    )


def lr_at(step: int, cfg: RunConfig) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr,
    then cosine to min_lr at `decay_steps`, or warmup-stable-decay (flat at lr, then linear to
    min_lr over the last `wsd_decay_fraction`), or constant. After the schedule ends: min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.decay_steps or cfg.max_steps
    if step >= total:
        return cfg.min_lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    decay_start = total - max(round(cfg.wsd_decay_fraction * total), 1)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start + 1) / (total - decay_start)
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)

"""Direct preference optimisation and its variants, as one recipe: the policy learns from
preference pairs directly, with no reward model and no sampling.

DPO (Rafailov et al. 2023) shows that the RLHF optimum under a KL penalty β to a reference
policy π_ref has the implicit reward r(x, y) = β log π(y|x)/π_ref(y|x), so the Bradley–Terry
likelihood of the pairs becomes a loss on the policy itself. With
    h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
(log-probabilities summed over the response tokens, end-of-turn included), `--loss`:
- sigmoid (DPO):  −log σ(β h)             (ln 2 when the policy is the reference)
- ipo (IPO, Azar et al. 2023):  (h̄ − 1/(2β))², with h̄ the same difference of log-ratios averaged per
  response token (the form the paper's results use, as TRL computes it; summed log-probs would make
  the squared loss grow with the length)
- hinge (SLiC, Zhao et al. 2023):  max(0, 1 − β h)
- simpo (SimPO, Meng et al. 2024), reference-free, on per-token averages:
      −log σ(β [log π(y_c|x)/|y_c| − log π(y_r|x)/|y_r|] − γ)
The reference log-probs are computed once, before the first step, by the model the run starts
from (in eval mode), and kept per pair beside the data: no second model is held while training
or saved in any checkpoint. Under LoRA that model is the base with the new adapters, whose B
matrices start at zero, so it is exactly the base with the adapters off. A resumed run computes
them again from --init-from (the same numbers). Every process computes them for every pair.

Logged each step (training rows) and at each evaluation (held-out rows, `val_` prefix): the loss,
the mean summed log-probs of the chosen and rejected responses, the mean implicit-reward margin
β h (SimPO: β times the difference of averages) and the reward accuracy, how often it is > 0.
Checkpoints are ordinary model directories, or PEFT adapter directories under LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.pairs import PairBatches
from lmstack.errors import InputError
from lmstack.training import distributed
from lmstack.training.config import _field
from lmstack.training.finetune import CAUSAL, apply_lora, save_model
from lmstack.training.optim import lr_at
from lmstack.training.reward import PreferenceConfig, load_pairs, pair_tokens
from lmstack.training.run import Run

LOSSES = ("sigmoid", "ipo", "simpo", "hinge")
STATS = ("logp_chosen", "logp_rejected", "reward_margin", "reward_accuracy")


@dataclass
class DPOConfig(PreferenceConfig):
    """Preference optimisation (`lmstack align dpo`)."""

    out_dir: str = _field("runs/dpo", "run directory: config, metrics, checkpoints")
    loss: str = _field("sigmoid", "sigmoid (DPO) | ipo | simpo | hinge")
    beta: float = _field(0.1, "the KL strength β (SimPO: the reward scale, usually 2-10)")
    simpo_gamma: float = _field(0.5, "SimPO's target margin γ")
    lr: float = _field(1e-6, "peak learning rate (LoRA usually wants ~10x more)")
    min_lr: float = _field(1e-7, "learning rate at the end of the schedule")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
            (self.beta > 0, "beta must be > 0"),
        ]


def preference_loss(
    kind: str,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] losses, [B] implicit-reward margins) of summed response log-probs (see the module docstring)."""
    if kind == "simpo":
        margin = beta * (chosen / chosen_len - rejected / rejected_len)
        return -F.logsigmoid(margin - gamma), margin
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = ((chosen - ref_chosen) / chosen_len - (rejected - ref_rejected) / rejected_len - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise InputError(f"unknown preference loss {kind!r}; use one of {', '.join(LOSSES)}")
    return losses, beta * h


def response_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows] summed log-probs of the target tokens, [rows] their count) of right-padded rows."""
    logits = model(batch["idx"], segments=batch["segments"]) if model.family == "gpt" else model(batch["idx"])
    targets = batch["targets"]
    keep = targets != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(1), keep.sum(1)


class PreferenceLoss(nn.Module):
    """The `--loss` on a batch of pairs (chosen rows first) carrying their `reference` log-probs
    [B, 2]; keeps the sums of the logged statistics until `take_stats`."""

    def __init__(self, model: nn.Module, cfg: DPOConfig):
        super().__init__()
        self.model, self.kind, self.beta, self.gamma = model, cfg.loss, cfg.beta, cfg.simpo_gamma
        self.sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)  # the stats, then the pairs they cover

    def losses(self, batch: dict) -> torch.Tensor:
        logp, count = response_logprobs(self.model, batch)
        (chosen, rejected), (n_c, n_r) = logp.chunk(2), count.chunk(2)
        ref = batch["reference"].to(logp)
        losses, margin = preference_loss(self.kind, self.beta, chosen, rejected, ref[:, 0], ref[:, 1], n_c, n_r, self.gamma)
        stats = torch.stack([chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).sum(), margin.new_tensor(len(margin))])
        self.sums = self.sums.to(stats.device) + stats.detach().double()
        return losses

    def forward(self, batch: dict) -> torch.Tensor:
        return self.losses(batch).mean()

    def take_stats(self, d, prefix: str = "") -> dict:
        """The mean of each logged statistic since the last call (over all processes), and reset."""
        sums, self.sums = distributed.sum_(self.sums, d), torch.zeros_like(self.sums)
        return {prefix + name: float(v / sums[-1]) for name, v in zip(STATS, sums[:-1])}


@torch.no_grad()
def reference_logprobs(model: nn.Module, batches: list[dict], device) -> torch.Tensor:
    """[N, 2] summed log-probs of each pair's chosen and rejected response under `model` as it is now."""
    was_training = model.training
    model.eval().to(device)
    out = []
    for batch in batches:
        logp, _ = response_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        out.append(torch.stack(logp.chunk(2), 1).cpu())
    model.train(was_training)
    return torch.cat(out).double()


@torch.no_grad()
def held_out(objective: PreferenceLoss, batches: list[dict], stepper) -> dict:
    """The mean loss and statistics over the held-out pairs."""
    objective.eval()
    objective.take_stats(stepper.d)  # drop anything left from training
    total = torch.zeros(2, dtype=torch.float64, device=stepper.device)
    for batch in batches[stepper.d.rank :: stepper.d.world]:
        with stepper.autocast:
            losses = objective.losses(stepper.to_device(batch))
        total += torch.stack([losses.sum().double(), total.new_tensor(len(losses))])
    objective.train()
    total = distributed.sum_(total, stepper.d)
    return {"val_loss": float(total[0] / total[1]), **objective.take_stats(stepper.d, "val_")}


def dpo(cfg: DPOConfig, resume: bool = False) -> dict:
    """Optimise a policy on preference pairs (or continue, with resume=True); returns the last metrics."""
    model, tok, length, grew, train_pairs, val_pairs, reports = load_pairs(cfg, CAUSAL)
    trains = apply_lora(model, cfg, grew)

    with Run(cfg, resume, command="lmstack align dpo") as run:
        d = run.d
        per_step = cfg.batch_size * d.world * cfg.grad_accum
        train_batches = PairBatches(train_pairs, cfg.batch_size, cfg.seed, per_step)
        val_batches = PairBatches(val_pairs, cfg.batch_size, cfg.seed, per_step)
        for batches in (train_batches, val_batches):  # before any step (or resumed weights): the reference
            refs = reference_logprobs(model, batches.in_order(), run.device) if batches.pairs and cfg.loss != "simpo" else None
            batches.extras = {"reference": refs if refs is not None else torch.zeros(len(batches.pairs), 2)}
        val_batches = val_batches.in_order() if val_pairs else []
        objective = PreferenceLoss(model, cfg)
        stepper = run.optimizer_step(objective)
        for report in reports:
            run.write(str(report))
        run.begin(
            model.flops_per_token(length),
            eval_cost=len(val_batches) / (3 * cfg.grad_accum),
            banner=(
                f"{cfg.loss} preference optimisation (beta {cfg.beta:g}) of {model.family} from {cfg.init_from}; "
                f"{trains}; "
                f"{len(train_pairs)} train / {len(val_pairs)} held-out pairs of at most {length} tokens; "
                f"{per_step} pairs per step"
            ),
        )
        if val_batches and run.step == 0:
            run.log_eval(held_out(objective, val_batches, stepper))
        path = None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(
                lambda micro: train_batches.make(step, micro * d.world + d.rank), cfg.grad_accum, lr, step, count=pair_tokens
            )
            run.end_step(result, lr, epoch=round(train_batches.epoch(run.step + 1), 3), **objective.take_stats(d))
            if val_batches and run.eval_due:
                run.log_eval(held_out(objective, val_batches, stepper))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg)
        return {**run.finish(), "checkpoint": str(path) if path else None}

"""GRPO: reinforcement learning on verifiable answers, as one recipe (DeepSeekMath's Group
Relative Policy Optimization, with the Dr. GRPO and RLOO baselines).

Each step draws `batch_size` problems of the task (`evaluation.cot.load_task`: the arithmetic
generator, GSM8K, SVAMP or a JSONL file) and samples a group of `group` replies to each. A prompt
is read once and its decoding state forked `group` ways (`generation.generate_groups`, through the
contract's `reorder`). A verifier scores each reply: 1 for the right number (read as `eval tasks`
reads it), plus `format_reward` for a reasoning block before the answer line. Advantages compare a
reply with its own group, so no value model is needed:
- grpo: (r - mean) / (std + 1e-4), std over the group (unbiased, as TRL);
- dr_grpo: r - mean (no std, and the loss is not normalised by each reply's length);
- rloo: r minus the mean of the other replies of the group, G/(G-1) (r - mean).
A group whose rewards are all equal teaches nothing: its advantages are zero, so it is left out
of the update (it would only shrink the mean over replies). A reply cut at `max_new_tokens` scores
0 whatever number it holds, so the policy keeps ending its turn.

The loss is PPO's clipped surrogate per reply token, -min(ρ A, clip(ρ, 1-ε, 1+ε) A) with ρ the
ratio of the policy's probability to the one at rollout time (`old` log-probs, taken once after
sampling; ρ moves away from 1 when a rollout batch is reused for several `updates`), plus
`kl` × the k3 estimate of KL(policy ‖ reference), exp(q - p) - (q - p) - 1 with q the frozen start
model's log-prob. `loss_agg` says how token losses become one number: sequence (mean per reply,
then over replies: GRPO), token (mean over every token of the batch: DAPO) or constant (sum over
tokens / (replies × max_new_tokens): Dr. GRPO, the default with --advantage dr_grpo).

Logged per step: reward mean and std, the fraction of groups with zero reward variance, accuracy,
the fraction of replies cut unfinished, reply length, KL and the clipped fraction; every
`eval_interval` steps (and before the first), held-out greedy exact-match accuracy. The loss
itself reads ~0 (at ratio 1 it is minus the mean advantage, centred in each group), so the run
ends by printing how the reward and held-out accuracy moved instead. The optimizer step, run directory, time budget, resume and
checkpoints (LoRA adapters too) are the shared `training.step` and `training.run`.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.chat import turn_end_id
from lmstack.errors import InputError
from lmstack.evaluation.cot import correct, load_task, question_ids, reply_config, reward, uses_chat
from lmstack.generation import generate_groups, generate_tokens
from lmstack.training.config import RunConfig, _field
from lmstack.training.finetune import CAUSAL, FinetuneConfig, apply_lora, load_base, save_model
from lmstack.training.metrics import read_metrics
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSS_AGGS = ("auto", "sequence", "token", "constant")


@dataclass
class GRPOConfig(RunConfig):
    """GRPO on verifiable answers (`lmstack align grpo`)."""

    out_dir: str = _field("runs/grpo", "run directory: config, metrics, checkpoints")
    init_from: str = _field("", "the model to start from (an SFT checkpoint): lmstack, adapter or Hugging Face directory")
    lora: dict = _field({}, "LoRA adapters instead of full training: r (16), alpha (32), dropout (0.0), targets, rslora")
    task: str = _field(
        "arithmetic", "arithmetic (generated) | gsm8k | svamp (shared files) | a JSONL file of {question, answer} rows"
    )
    eval_task: str = _field("", 'held-out problems for accuracy; "" = the task\'s test split (a file: none)')
    n_train: int = _field(2000, "problems drawn from the task (arithmetic: generated; files: the first N)")
    n_eval: int = _field(200, "held-out problems scored every eval_interval steps")
    lang: str = _field("mix", "arithmetic: en | zh | mix")
    levels: str = _field("1,2,3,4", "arithmetic: steps per problem, comma-separated (1 to 4)")
    group: int = _field(8, "replies sampled per problem (G)")
    advantage: str = _field("grpo", "grpo ((r-mean)/std) | dr_grpo (r-mean) | rloo (leave-one-out baseline)")
    loss_agg: str = _field("auto", "sequence | token | constant | auto (constant for dr_grpo, else sequence)")
    kl: float = _field(0.0, "weight of the k3 KL penalty to the start model; 0 = none (no reference kept)")
    clip: float = _field(0.2, "PPO clip range ε of the probability ratio")
    updates: int = _field(1, "optimizer steps on each rollout batch (μ); >1 makes the ratio and clip matter")
    format_reward: float = _field(0.0, "extra reward for a reasoning block before the answer line")
    max_new_tokens: int = _field(128, "longest reply sampled")
    temperature: float = _field(1.0, "sampling temperature of the rollouts")
    # the recipe's own defaults
    batch_size: int = _field(8, "problems per rollout batch (each sampled `group` times)")
    max_steps: int = _field(200, "optimizer steps to train for")
    lr: float = _field(1e-5, "peak learning rate")
    min_lr: float = _field(1e-5, "learning rate at the end of the schedule")
    warmup_steps: int = _field(0, "")
    weight_decay: float = _field(0.0, "applied to matrices and embeddings, never to biases and norms")
    eval_interval: int = _field(25, "held-out accuracy every N steps (and before the first and at the end)")
    ckpt_interval: int = _field(0, "save every N steps (and at the end); 0 = only at the end")
    keep_last: int = _field(1, "checkpoints kept besides the best one")

    lora_config = FinetuneConfig.lora_config  # the [lora] table as LoraConfig, or None

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.group >= 2, "group must be >= 2 (advantages compare replies within a group)"),
            (self.advantage in ADVANTAGES, f"advantage must be one of {', '.join(ADVANTAGES)}"),
            (self.loss_agg in LOSS_AGGS, f"loss_agg must be one of {', '.join(LOSS_AGGS)}"),
            (self.kl >= 0 and self.clip > 0, "need kl >= 0 and clip > 0"),
            (self.updates >= 1 and self.max_new_tokens >= 1, "updates and max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (rollouts sample)"),
            (self.n_train >= 1 and self.n_eval >= 1, "n_train and n_eval must be >= 1"),
        ]

    def __post_init__(self):
        super().__post_init__()
        self.lora_config()  # the [lora] table, checked
        if self.loss_agg == "auto":
            self.loss_agg = "constant" if self.advantage == "dr_grpo" else "sequence"


# --- advantages and the loss (pure tensor functions) -----------------------------------------


def advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards of P groups -> [P, G] advantages (see the module docstring)."""
    mean = rewards.mean(-1, keepdim=True)
    if kind == "grpo":
        return (rewards - mean) / (rewards.std(-1, keepdim=True) + eps)
    if kind == "dr_grpo":
        return rewards - mean
    if kind == "rloo":
        G = rewards.shape[-1]
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)
    raise InputError(f"unknown advantage {kind!r}; use one of {', '.join(ADVANTAGES)}")


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy ‖ reference) per sampled token: unbiased and >= 0."""
    d = ref_logp - logp
    return d.exp() - d - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "sequence",
    ref_logp: torch.Tensor | None = None,
    kl: float = 0.0,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (+ kl × k3) over reply tokens. logp, old_logp, ref_logp, mask: [B, T]
    (mask True on reply tokens); adv: [B]. Returns (loss, {"kl", "clipped"} as floats)."""
    mask = mask.to(logp.dtype)
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl_tok = k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl:
        per_token = per_token + kl * kl_tok
    lengths = mask.sum(-1).clamp(min=1)
    if agg == "sequence":
        loss = ((per_token * mask).sum(-1) / lengths).mean()
    elif agg == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif agg == "constant":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    else:
        raise InputError(f"unknown loss_agg {agg!r}; use sequence, token or constant")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = (((ratio - 1).abs() > clip).to(mask.dtype) * mask).sum() / n
        stats = {"kl": float((kl_tok * mask).sum() / n), "clipped": float(clipped)}
    return loss, stats


def sequence_logprobs(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T]: log p(idx[t] | idx[<t]) at t >= 1 (0 at t = 0), from one forward."""
    logits = model(idx)
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, idx[:, 1:, None])[..., 0]
    return F.pad(lp, (1, 0))


class GRPOLoss(nn.Module):
    """The objective the shared optimizer step runs: a rollout batch in, the GRPO loss out."""

    def __init__(self, model: nn.Module, cfg: GRPOConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.stats: dict = {}

    def forward(self, batch: dict) -> torch.Tensor:
        logp = sequence_logprobs(self.model, batch["idx"])
        loss, self.stats = grpo_loss(
            logp,
            batch["old_logp"],
            batch["adv"],
            batch["mask"],
            self.cfg.clip,
            self.cfg.loss_agg,
            batch.get("ref_logp"),
            self.cfg.kl,
            self.cfg.max_new_tokens,
        )
        return loss

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)


# --- rollouts ----------------------------------------------------------------------------------


@torch.no_grad()
def rollout(model, tok, items, cfg: GRPOConfig, step: int, device) -> tuple[dict, dict]:
    """Sample a group of replies to each problem, score them, and lay them out as a batch:
    idx (prompt + reply, right-padded), mask (reply tokens), adv [B], and old (and reference)
    log-probs filled in by the caller. Returns (batch, rollout metrics).

    A reply cut at max_new_tokens scores 0 even with the right number in it, so the policy keeps
    its end-of-turn stop. Groups with all-equal rewards have zero advantages; they are left out of
    the batch (when another group remains), so they neither cost a backward pass nor dilute the
    mean of the loss over replies."""
    G = cfg.group
    prompts = [question_ids(tok, it.question) for it in items]
    configs = [
        reply_config(tok, cfg.max_new_tokens, cfg.temperature, seed=hash((cfg.seed, step, k)) % 2**31)
        for k in range(len(items) * G)
    ]
    was_training = model.training
    model.eval()
    groups = generate_groups(model, prompts, G, configs, tok)
    model.train(was_training)
    rewards, right, ended = score_groups(groups, items, cfg.format_reward)
    adv = advantages(rewards, cfg.advantage)
    varied = rewards.std(-1) > 0
    keep = varied if varied.any() else torch.ones_like(varied)
    end = turn_end_id(tok) if uses_chat(tok) else None
    rows, masks, kept_adv = [], [], []
    for prompt, grp, a, k in zip(prompts, groups, adv, keep):
        if not k:
            continue
        kept_adv += a.tolist()
        for g in grp:
            reply = _reply_ids(g, end, tok.eot_id)
            rows.append(prompt + reply)
            masks.append([False] * len(prompt) + [True] * len(reply))
    width = max(map(len, rows))
    idx = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([m + [False] * (width - len(m)) for m in masks], device=device)
    lengths = torch.tensor([[len(g.tokens) for g in grp] for grp in groups]).float()
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(-1).mean()),
        "zero_variance_groups": float(1 - varied.float().mean()),
        "accuracy": float(right.mean()),
        "unfinished": float(1 - ended.float().mean()),
        "reply_length": float(lengths.mean()),
    }
    return {"idx": idx, "mask": mask, "adv": torch.tensor(kept_adv, device=device)}, metrics


def score_groups(groups, items, format_reward: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[P, G] rewards, right answers and ended replies of P groups of generations: the reward is
    `cot.reward` for a reply that ended (end of turn or text), 0 for one cut at max_new_tokens."""
    ended = torch.tensor([[g.finish_reason == "stop" for g in grp] for grp in groups])
    right = torch.tensor([[reward(g.text, it.answer) for g in grp] for it, grp in zip(items, groups)])
    rewards = torch.tensor([[reward(g.text, it.answer, format_reward) for g in grp] for it, grp in zip(items, groups)])
    return rewards * ended, right, ended


def _reply_ids(generation, turn_end: int | None, eot: int | None) -> list[int]:
    """A reply's tokens as the model wrote them: generation keeps a chat end-of-turn token that
    stopped it, but not an end-of-text, which is put back so the model learns where to stop."""
    ids = generation.tokens
    if generation.finish_reason == "stop" and eot is not None and not (ids and ids[-1] == turn_end):
        return ids + [eot]
    return ids


@torch.no_grad()
def held_out_accuracy(model, tok, items, cfg: GRPOConfig, batch_size: int = 32) -> dict:
    """Greedy exact-match accuracy on held-out problems, and the mean reply length."""
    was_training = model.training
    model.eval()
    hits, length = 0, 0
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        outs = generate_tokens(
            model, [question_ids(tok, it.question) for it in batch], reply_config(tok, cfg.max_new_tokens), tok
        )
        hits += sum(correct(o.text, it.answer) for o, it in zip(outs, batch))
        length += sum(len(o.tokens) for o in outs)
    model.train(was_training)
    return {"val_accuracy": hits / len(items), "val_reply_length": length / len(items)}


# --- the recipe --------------------------------------------------------------------------------


def _tasks(cfg: GRPOConfig):
    """(training problems, held-out problems or [])."""
    try:
        levels = tuple(int(k) for k in cfg.levels.split(","))
    except ValueError:
        raise InputError(f"--levels takes comma-separated steps per problem (e.g. 1,2,3); got {cfg.levels!r}") from None
    train = load_task(cfg.task, "train", cfg.n_train, cfg.seed, cfg.lang, levels)
    if cfg.eval_task:
        held = load_task(cfg.eval_task, "test", cfg.n_eval, cfg.seed + 1, cfg.lang, levels)
    elif cfg.task in ("arithmetic", "gsm8k"):  # the tasks with a test split of their own
        held = load_task(cfg.task, "test", cfg.n_eval, cfg.seed + 1, cfg.lang, levels)
    else:
        held = []
    return train, held


def grpo(cfg: GRPOConfig, resume: bool = False) -> dict:
    """Train (or continue, with resume=True) the GRPO run in cfg.out_dir; returns the last metrics."""
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.init_from)
    if model.family not in CAUSAL:
        raise InputError(f"GRPO trains causal models ({', '.join(CAUSAL)}); {cfg.init_from} is a {model.family!r} model")
    train_items, held = _tasks(cfg)
    context = model.max_context
    longest = max(len(question_ids(tok, it.question)) for it in train_items + held)
    if context is not None and longest + cfg.max_new_tokens > context:
        raise InputError(
            f"a prompt of {longest} tokens plus --max-new-tokens {cfg.max_new_tokens} exceeds the model's "
            f"context ({context}); lower --max-new-tokens or pick shorter problems"
        )
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl else None
    trains = apply_lora(model, cfg, grew=False)

    with Run(cfg, resume, command="lmstack align grpo") as run:
        objective = GRPOLoss(model, cfg)
        stepper = run.optimizer_step(objective)
        if reference is not None:
            reference.to(run.device)
        rows = cfg.batch_size * cfg.group
        run.begin(
            objective.flops_per_token(longest + cfg.max_new_tokens),
            eval_cost=len(held) / (4 * rows),
            banner=(
                f"GRPO on {cfg.task}: {len(train_items)} problems, {len(held)} held out; {trains}; {cfg.batch_size} problems x "
                f"{cfg.group} replies per batch, advantage {cfg.advantage}, loss {cfg.loss_agg}, kl {cfg.kl:g}"
            ),
        )
        if held and run.step == 0:
            run.log_eval(held_out_accuracy(model, tok, held, cfg))
        path, batch, metrics, rewards = None, None, {}, []
        while not run.done:
            step = run.step
            if step % cfg.updates == 0 or batch is None:  # a fresh rollout batch every `updates` steps
                rng = random.Random(hash((cfg.seed, step // cfg.updates)))
                items = rng.sample(train_items, min(cfg.batch_size, len(train_items)))
                batch, metrics = rollout(model, tok, items, cfg, step, run.device)
                rewards.append(metrics["reward_mean"])
                with torch.no_grad(), stepper.autocast:
                    batch["old_logp"] = sequence_logprobs(model, batch["idx"]).float()
                    if reference is not None:
                        batch["ref_logp"] = sequence_logprobs(reference, batch["idx"]).float()
            lr = lr_at(step, run.cfg)
            result = stepper(lambda micro: batch, 1, lr, step)
            run.end_step(result, lr, int(batch["mask"].sum()), **metrics, **objective.stats)
            if held and run.eval_due:
                run.log_eval(held_out_accuracy(model, tok, held, cfg))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg)
        return {**_summary(run, rewards), "checkpoint": str(path) if path else None}


def _summary(run: Run, rewards: list[float]) -> dict:
    """The run's last metrics without its loss, and one line on what moved. The clipped loss reads
    ~0 whatever the policy learns: at ratio 1 it is minus the mean advantage, and advantages are
    centred within each group; the reward and held-out accuracy are the numbers to watch."""
    last = {k: v for k, v in run.finish().items() if k != "loss"}
    if rewards:
        k = max(1, min(10, len(rewards) // 2))
        last["reward_mean"] = sum(rewards[-k:]) / k
        run.write(
            f"train reward mean {sum(rewards[:k]) / k:.3f} (first {k} rollout batches) -> {last['reward_mean']:.3f} (last {k})"
        )
    evals = [r["val_accuracy"] for r in read_metrics(run.dir) if "val_accuracy" in r]
    if evals:
        run.write(f"held-out accuracy {evals[0]:.3f} (first evaluation) -> {evals[-1]:.3f} (last)")
    return last

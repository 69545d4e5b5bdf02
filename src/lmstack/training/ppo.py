"""RLHF with PPO, as one recipe: the policy samples replies, a reward model scores them, and
proximal policy optimisation raises the reward while a KL penalty keeps the policy near where it
started (Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022; the "N implementation
details of RLHF with PPO" of Huang et al. 2024 for the choices below).

Every `ppo_epochs` optimizer steps the run draws a rollout: `batch_size × grad_accum` prompts per
process, seeded by (seed, step), each answered by the policy through `lmstack.generation` (the
same engine as `lmstack generate`; temperature `--temperature`, at most `--max-new-tokens`, a
reply ends at the chat format's end-of-turn token, which is part of the action). Then, without
gradients:
- log π_old(a_t|s_t), the value V(s_t) (a linear head on the policy's last-layer state: the
  policy and the critic share the trunk), and log π_ref(a_t|s_t) of each reply token;
- the score s of each reply by the reward model (`training.reward.RewardScorer`), which reads
  the conversation and the reply as text with its own tokenizer — so the reward model may
  tokenise differently from the policy (documented re-tokenisation, not an error). An empty
  reply gets the lowest score of its rollout. With `whiten_rewards` the scores are whitened
  over the rollout (mean 0, std 1);
- per-token rewards r_t = −kl_coef · (log π_old − log π_ref), plus s on the reply's last token;
- advantages by GAE(γ, λ): δ_t = r_t + γ V(s_{t+1}) − V(s_t), A_t = Σ_l (γλ)^l δ_{t+l} (the
  value after the last token is 0), returns R_t = A_t + V(s_t); advantages are whitened over
  the rollout's reply tokens.
Each step then minimises, over the reply tokens (token mean), the clipped policy loss
max(−A ρ, −A clip(ρ, 1 ± ε)) with ρ = π/π_old, plus vf_coef × the clipped value loss
½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²).

The reference π_ref is the starting model: a frozen copy kept in memory beside the run (never
part of the objective, so never in a checkpoint), or under LoRA the same model with its adapters
switched off (scaling 0) for the reference pass. The value head is saved in the checkpoint's
`objective.safetensors`. A resumed run starts a new rollout at its step. GPT policies only (the
value head reads `hidden_states`). Logged: reward (the raw score's mean), kl (the mean over
replies of Σ_t log π_old − log π_ref), reply length, the policy and value losses, the clipped
fraction; every `eval_interval` steps, on held-out prompts with fixed sampling seeds,
`val_reward` and `val_kl`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmstack.data.pairs import prompt_messages
from lmstack.data.sft import Example, collate
from lmstack.errors import InputError
from lmstack.io import check_readable, iter_lines
from lmstack.training import distributed
from lmstack.training.config import _field
from lmstack.training.finetune import AdaptConfig, apply_lora, fit_vocab, load_base, save_model
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

STATS = ("pg_loss", "vf_loss", "clipfrac")


@dataclass
class PPOConfig(AdaptConfig):
    """RLHF with PPO (`lmstack align ppo`)."""

    out_dir: str = _field("runs/ppo", "run directory: config, metrics, checkpoints")
    init_from: str = _field(
        "",
        "the policy to start from (and the KL reference): an lmstack GPT checkpoint, an adapter "
        "directory or a Hugging Face model directory",
    )
    reward_model: str = _field("", "a checkpoint of `lmstack align reward`")
    prompts: list[str] = _field(
        [],
        "JSONL files of {prompt} rows (a string, an hh-rlhf transcript or chat messages; "
        "preference-pair files work too) or text files, one prompt per line",
    )
    max_new_tokens: int = _field(32, "the longest reply")
    temperature: float = _field(1.0, "sampling temperature of the rollouts")
    ppo_epochs: int = _field(2, "optimizer steps on each rollout")
    clip: float = _field(0.2, "the policy ratio's clip range ε")
    value_clip: float = _field(0.2, "the value's clip range around the rollout's values")
    vf_coef: float = _field(0.1, "weight of the value loss")
    gamma: float = _field(1.0, "discount γ")
    lam: float = _field(0.95, "GAE's λ")
    kl_coef: float = _field(0.05, "the KL penalty's weight in the per-token reward")
    whiten_rewards: bool = _field(True, "whiten the reward model's scores over each rollout")
    max_steps: int = _field(100, "optimizer steps to train for")
    lr: float = _field(1e-5, "peak learning rate")
    min_lr: float = _field(1e-6, "learning rate at the end of the schedule")
    warmup_steps: int = _field(5, "")
    batch_size: int = _field(8, "prompts per micro-batch on each process")
    eval_interval: int = _field(20, "evaluate on held-out prompts every N steps (and before the first and at the end)")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (PPO samples its rollouts)"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.clip > 0 and self.value_clip > 0 and self.vf_coef >= 0, "need clip > 0, value_clip > 0, vf_coef >= 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
        ]


# --- the pieces of PPO ----------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), [B, T] each, of per-token `rewards` and `values` on the actions `mask`
    marks (one contiguous run per row); both are 0 off the mask."""
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * nxt if t + 1 < T else nxt
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * nxt * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(x − mean) / std over the entries `mask` marks (all by default)."""
    if mask is None:
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-8)
    m = mask.to(x.dtype)
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) * m) ** 2).sum() / m.sum()
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class PolicyWithValue(nn.Module):
    """The policy and a value head on its last-layer states; `forward` is the PPO loss of a rollout micro-batch."""

    def __init__(self, model: nn.Module, cfg: PPOConfig):
        super().__init__()
        if model.family != "gpt":
            raise InputError(f"PPO trains GPT policies (the value head reads their hidden states); got a {model.family!r} model")
        self.model, self.cfg = model, cfg
        self.value_head = nn.Linear(model.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.sums = torch.zeros(len(STATS) + 1, dtype=torch.float64)

    def logprobs_values(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-prob of each target token and [B, T] value of the state before it."""
        hidden = self.model.hidden_states(batch["idx"], segments=batch["segments"])
        logits = self.model.lm_head(hidden).float()
        logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
        return logp, self.value_head(hidden).squeeze(-1).float()

    def forward(self, batch: dict) -> torch.Tensor:
        c = self.cfg
        mask = (batch["targets"] != -100).float()
        logp, values = self.logprobs_values(batch)
        ratio = torch.exp(logp - batch["old_logp"])
        adv = batch["advantages"]
        pg = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip, 1 + c.clip)), mask)
        old_v, ret = batch["old_values"], batch["returns"]
        clipped = old_v + (values - old_v).clamp(-c.value_clip, c.value_clip)
        vf = 0.5 * masked_mean(torch.max((values - ret) ** 2, (clipped - ret) ** 2), mask)
        clipfrac = masked_mean(((ratio - 1).abs() > c.clip).float(), mask)
        self.sums = self.sums.to(pg.device) + torch.stack([pg, vf, clipfrac, pg.new_tensor(1.0)]).detach().double()
        return pg + c.vf_coef * vf

    def take_stats(self, d) -> dict:
        sums, self.sums = distributed.sum_(self.sums, d), torch.zeros_like(self.sums)
        return {name: float(v / sums[-1]) for name, v in zip(STATS, sums[:-1])}


class Reference:
    """log π_ref of target tokens: a frozen copy of the starting model, or under LoRA the policy
    with its adapters switched off."""

    def __init__(self, model: nn.Module):
        from lmstack.models.lora import lora_modules

        self.adapters = lora_modules(model)
        self.model = model if self.adapters else copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def _adapters_off(self):
        scales = {name: m.scaling for name, m in self.adapters.items()}
        for m in self.adapters.values():
            m.scaling = 0.0
        try:
            yield
        finally:
            for name, m in self.adapters.items():
                m.scaling = scales[name]

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        with self._adapters_off():
            logits = self.model(batch["idx"], segments=batch["segments"]).float()
        return torch.log_softmax(logits, -1).gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]


# --- prompts and rollouts -------------------------------------------------------------------


def read_prompts(path) -> list[tuple[list[dict], str]]:
    """(conversation, "file:line") of each prompt: JSONL rows with a "prompt", or lines of a text file."""
    p = check_readable(path)
    out = []
    for lineno, line in enumerate(iter_lines(p), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        if p.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f'{where}: not valid JSON ({e.msg}); each line must be an object such as {{"prompt": "..."}}'
                ) from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise InputError(f'{where}: no "prompt" field; each line must be an object such as {{"prompt": "..."}}')
            out.append((prompt_messages(row["prompt"], where), where))
        else:
            out.append((prompt_messages(line.rstrip("\n"), where), where))
    if not out:
        raise InputError(f'{p}: holds no prompts; pass a JSONL file of {{"prompt": ...}} rows or one prompt per line')
    return out


@dataclass
class Rollout:
    batch: dict  # idx, targets, segments, old_logp, old_values, advantages, returns: [B, T]
    stats: dict


@torch.no_grad()
def sample_replies(model, tok, prompts: list[list[int]], cfg: PPOConfig, seed: int, end: int | None) -> list[list[int]]:
    """Each prompt's sampled reply, through its end-of-turn token when it has one."""
    from lmstack.generation import GenerationConfig
    from lmstack.generation.engine import generate_tokens

    stop = (tok.decode([end]),) if end is not None else ()
    configs = [
        GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop=stop, seed=seed + i)
        for i in range(len(prompts))
    ]
    was_training = model.training
    model.eval()
    outs = generate_tokens(model, prompts, configs, tok)
    model.train(was_training)
    replies = []
    for out in outs:
        ids = list(out.tokens)
        replies.append(ids[: ids.index(end) + 1] if end in ids else ids)
    return replies


@torch.no_grad()
def rollout(
    objective: PolicyWithValue,
    reference: Reference,
    scorer,
    tok,
    conversations,
    prompts,
    cfg: PPOConfig,
    seed: int,
    end: int | None,
    device,
) -> Rollout:
    """Sample replies to `prompts` and compute everything PPO's steps need (see the module docstring)."""
    replies = sample_replies(objective.model, tok, prompts, cfg, seed, end)
    rows = [Example(np.array(p + r, dtype=np.int64), np.arange(len(p) + len(r)) >= len(p)) for p, r in zip(prompts, replies)]
    batch = {k: v.to(device) for k, v in collate([[e] for e in rows], max(len(e.ids) for e in rows)).items()}
    mask = batch["targets"] != -100
    was_training = objective.training
    objective.eval()
    old_logp, old_values = objective.logprobs_values(batch)
    objective.train(was_training)
    ref_logp = reference.logprobs(batch)
    texts = [tok.decode([t for t in r if t != end]).strip() for r in replies]
    scores = torch.full((len(replies),), float("nan"))
    spoken = [i for i, t in enumerate(texts) if t]
    if spoken:
        scores[spoken] = scorer.score([conversations[i] for i in spoken], [texts[i] for i in spoken])
    scores = torch.nan_to_num(scores, nan=float(scores[spoken].min()) if spoken else 0.0).to(device)
    shaped = whiten(scores) if cfg.whiten_rewards and len(scores) > 1 else scores
    kl = (old_logp - ref_logp) * mask
    rewards = -cfg.kl_coef * kl
    last = mask.long().cumsum(1).argmax(1)  # the reply's last token: where its running count peaks
    rewards[torch.arange(len(rows), device=device), last] += shaped
    advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
    batch.update(old_logp=old_logp, old_values=old_values * mask, advantages=whiten(advantages, mask), returns=returns)
    stats = {
        "reward": float(scores.mean()),
        "kl": float(kl.sum(1).mean()),
        "response_length": float(np.mean([len(r) for r in replies])),
    }
    return Rollout(batch, stats)


def rows_of(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def encode_prompts(tok, items, context: int, max_new_tokens: int) -> list[list[int]]:
    """The chat-format ids of each prompt; one that leaves no room for a reply is an error naming its row."""
    from lmstack.data.chat import prompt_ids

    out = []
    for messages, where in items:
        ids = prompt_ids(tok, messages)
        if len(ids) + max_new_tokens > context:
            raise InputError(
                f"{where}: the prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it needs "
                f"{len(ids) + max_new_tokens}, more than the model's context of {context}; shorten or drop it, "
                "or lower --max-new-tokens"
            )
        out.append(ids)
    return out


def evaluate(objective, reference, scorer, tok, val, cfg: PPOConfig, end, device) -> dict:
    """Mean score and KL of sampled replies to the held-out prompts, with the same seeds every time."""
    conversations, prompts = val
    got = [
        rollout(
            objective,
            reference,
            scorer,
            tok,
            conversations[i : i + cfg.batch_size],
            prompts[i : i + cfg.batch_size],
            cfg,
            cfg.seed + 10**6 + i,
            end,
            device,
        ).stats
        for i in range(0, len(prompts), cfg.batch_size)
    ]
    weights = [min(cfg.batch_size, len(prompts) - i) for i in range(0, len(prompts), cfg.batch_size)]
    return {f"val_{k}": float(np.average([g[k] for g in got], weights=weights)) for k in ("reward", "kl", "response_length")}


# --- the recipe -----------------------------------------------------------------------------


def ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    """Train a policy with PPO against a reward model (or continue, with resume=True); returns the last metrics."""
    from lmstack.data.chat import add_chat_tokens, turn_end_id
    from lmstack.data.sft import split
    from lmstack.training.reward import load_reward_model

    if not cfg.prompts:
        raise InputError('no prompts; pass --prompts FILE (JSONL {"prompt": ...} rows or one prompt per line)')
    if not cfg.reward_model:
        raise InputError("no reward model; pass --reward-model DIR (a checkpoint of `lmstack align reward`)")
    # Everything that can fail on the user's input fails here, before the run directory exists.
    torch.manual_seed(cfg.seed)
    scorer = load_reward_model(cfg.reward_model)
    model, tok = load_base(cfg.init_from)
    add_chat_tokens(tok)
    model, grew = fit_vocab(model, tok)
    objective = PolicyWithValue(model, cfg)
    items = [item for f in cfg.prompts for item in read_prompts(f)]
    encoded = encode_prompts(tok, items, model.max_context or 1024, cfg.max_new_tokens)
    train_idx, val_idx = split(list(range(len(items))), cfg.val_fraction, cfg.seed)
    conversations = [m for m, _ in items]
    trains = apply_lora(model, cfg, grew)
    end = turn_end_id(tok)

    with Run(cfg, resume, command="lmstack align ppo") as run:
        d = run.d
        scorer.objective.to(run.device)
        reference = Reference(model)  # before any step or resumed weights: the starting policy
        stepper = run.optimizer_step(objective)
        if not reference.adapters:
            reference.model.to(run.device)
        val = ([conversations[i] for i in val_idx], [encoded[i] for i in val_idx])
        per_rollout = cfg.batch_size * cfg.grad_accum
        run.begin(
            model.flops_per_token(),
            banner=(
                f"PPO of {model.family} from {cfg.init_from} against {cfg.reward_model}; {trains}; {len(train_idx)} train / "
                f"{len(val_idx)} held-out prompts; {per_rollout * d.world} replies per rollout, {cfg.ppo_epochs} steps each"
            ),
        )
        if val_idx and run.step == 0:
            run.log_eval(evaluate(objective, reference, scorer, tok, val, cfg, end, run.device))
        path, current = None, None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            if current is None or step % cfg.ppo_epochs == 0:
                rng = np.random.default_rng([cfg.seed, step, d.rank])
                picked = [train_idx[i] for i in rng.choice(len(train_idx), per_rollout, replace=per_rollout > len(train_idx))]
                current = rollout(
                    objective,
                    reference,
                    scorer,
                    tok,
                    [conversations[i] for i in picked],
                    [encoded[i] for i in picked],
                    cfg,
                    cfg.seed + 7919 * step + 104729 * d.rank,
                    end,
                    run.device,
                )
                fresh = current.stats
            else:
                fresh = {}
            result = stepper(
                lambda micro: rows_of(current.batch, slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)),
                cfg.grad_accum,
                lr,
                step,
            )
            tokens = int(distributed.sum_((current.batch["targets"] != -100).sum(), d))
            run.end_step(result, lr, tokens, **fresh, **objective.take_stats(d))
            if val_idx and run.eval_due:
                run.log_eval(evaluate(objective, reference, scorer, tok, val, cfg, end, run.device))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg)
        return {**run.finish(), "checkpoint": str(path) if path else None}

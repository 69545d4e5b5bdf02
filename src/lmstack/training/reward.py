"""Reward modelling: a scalar head trained on preference pairs with the Bradley–Terry loss, as one
recipe, and `load_reward_model` to score responses with the result.

A reward model maps (prompt, response) to one number r. People's choices between two responses
are modelled as P(chosen ≻ rejected) = σ(r_chosen − r_rejected) (Bradley & Terry 1952; the RLHF
reward model of Ouyang et al. 2022), so the loss is −log σ(r_c − r_r), averaged over pairs, and
the held-out pairwise accuracy is how often r_c > r_r. The feature under the head is a GPT's
last-layer state at the last real token (the only position that has read the whole response)
or BERT's pooled [CLS] (tanh(W h_[CLS] + b)); the head is one linear unit. A micro-batch holds B
pairs as 2B rows (chosen first), so both sides of a pair pass through the same weights together.
Rows are rendered by `data.pairs`: a causal model reads the conversation in its chat format
(hh-rlhf transcripts split into turns; lmstack's role tokens are added and the embedding grows
when the tokenizer has no template), BERT reads `[CLS] prompt [SEP] response [SEP]` with
segment ids 0 / 1. With LoRA only the adapters and the head train; the LM heads never train.

The checkpoint is the run's model (or PEFT adapter) directory plus the head in
`objective.safetensors` (`head.weight` [1, width], `head.bias`), with the row lengths kept in
trainer_state.json under "reward". `RewardScorer.score(conversations, responses)` re-tokenises
text with the reward model's own tokenizer, so a policy with another tokenizer can be scored:
PPO decodes its samples to text and hands them over (see `training.ppo`).

`PreferenceConfig` holds what the preference recipes (this one and `training.dpo`) share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmstack.data.pairs import PairBatches, PairRow, encode_pair, pair_examples, read_pairs
from lmstack.errors import CheckpointError, InputError
from lmstack.training import distributed
from lmstack.training.checkpoint import OBJECTIVE_FILE
from lmstack.training.config import _field
from lmstack.training.embed import LM_HEADS, check_encoder, encoder_flops, freeze_unused, last_states, pool, saved_task, width
from lmstack.training.finetune import AdaptConfig, apply_lora, fit_vocab, load_base, max_length, save_model
from lmstack.training.optim import lr_at
from lmstack.training.run import Run


@dataclass
class PreferenceConfig(AdaptConfig):
    """What the recipes on preference pairs share (`lmstack align reward`, `lmstack align dpo`)."""

    out_dir: str = _field("runs/align", "run directory: config, metrics, checkpoints")
    data: list[str] = _field(
        [], "JSONL files of {prompt, chosen, rejected} rows (prompt: a string, an hh-rlhf transcript or a list of chat messages)"
    )
    max_length: int = _field(0, "tokens per row (prompt plus response); 0 = the model's context, at most 1024")
    max_prompt_length: int = _field(
        0, "keep the last N tokens of longer prompts; 0 = a prompt that leaves no room for a response is an error"
    )
    skip_bad_pairs: bool = _field(False, "skip (and count) rows with an empty or missing side instead of stopping")
    max_steps: int = _field(200, "optimizer steps to train for")
    lr: float = _field(1e-5, "peak learning rate")
    min_lr: float = _field(1e-6, "learning rate at the end of the schedule")
    warmup_steps: int = _field(10, "")
    batch_size: int = _field(8, "pairs per micro-batch on each process (2x rows): lower it on out-of-memory")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.max_length >= 0 and self.max_prompt_length >= 0, "max_length and max_prompt_length must be >= 0"),
        ]


@dataclass
class RewardConfig(PreferenceConfig):
    """Reward modelling (`lmstack align reward`)."""

    out_dir: str = _field("runs/reward", "run directory: config, metrics, checkpoints")
    lr: float = _field(5e-5, "peak learning rate")
    min_lr: float = _field(5e-6, "learning rate at the end of the schedule")


# --- the model and its loss ---------------------------------------------------------------


class RewardModel(nn.Module):
    """A scalar head over a GPT's last-token state or BERT's pooled [CLS]; `forward` is the
    Bradley–Terry loss of a batch whose first half is the chosen rows."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_encoder(model, "the reward model", "a reward model")
        self.model = model
        self.head = nn.Linear(width(model), 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def rewards(self, batch: dict) -> torch.Tensor:
        """[rows] rewards of right-padded rows (`idx`, `segments` > 0 on real tokens)."""
        idx, mask = batch["idx"], batch["segments"] > 0
        if self.model.family == "bert":  # segment 1 from the first response token on
            types = torch.zeros_like(idx)
            types[:, 1:] = batch["targets"][:, :-1] != -100
            features = self.model.pooled(idx, mask, types)
        else:
            features = pool(last_states(self.model, idx, mask), mask, "last")
        return self.head(features).squeeze(-1).float()

    def forward(self, batch: dict) -> torch.Tensor:
        chosen, rejected = self.rewards(batch).chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def pair_metrics(objective: RewardModel, batches: list[dict], stepper) -> dict:
    """On held-out pairs: the mean loss, the pairwise accuracy (r_c > r_r) and the mean margin r_c − r_r."""
    objective.eval()
    total = torch.zeros(4, dtype=torch.float64, device=stepper.device)  # loss, correct, margin, pairs
    for batch in batches[stepper.d.rank :: stepper.d.world]:
        with stepper.autocast:
            chosen, rejected = objective.rewards(stepper.to_device(batch)).chunk(2)
        margin = (chosen - rejected).double()
        total += torch.stack([-F.logsigmoid(margin).sum(), (margin > 0).sum(), margin.sum(), margin.new_tensor(len(margin))])
    objective.train()
    loss, correct, margin, n = distributed.sum_(total, stepper.d).tolist()
    return {"val_loss": loss / n, "val_accuracy": correct / n, "val_margin": margin / n}


# --- setup shared with DPO ----------------------------------------------------------------


def load_pairs(cfg: PreferenceConfig, families: tuple[str, ...]):
    """(model, tokenizer, row length, grew, train pairs, held-out pairs, reports): everything that can fail
    on the user's input, checked before a run directory exists. Causal models get the chat tokens."""
    from lmstack.data.chat import add_chat_tokens
    from lmstack.data.sft import split

    if not cfg.data:
        raise InputError(
            'no preference pairs; pass --data PAIRS.jsonl with rows such as {"prompt": "...", "chosen": "...", "rejected": "..."}'
        )
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.init_from)
    if model.family not in families:
        raise InputError(f"{cfg.init_from} is a {model.family!r} model; this recipe trains {' or '.join(families)} models")
    frame = None
    if model.family == "bert":
        frame = ([model.config.cls_token_id], [model.config.sep_token_id])
        if None in frame[0] + frame[1]:
            raise CheckpointError(
                f"{cfg.init_from}: the BERT config names no [CLS] / [SEP] ids; set cls_token_id and sep_token_id"
            )
    else:
        add_chat_tokens(tok)
    model, grew = fit_vocab(model, tok)
    length = max_length(cfg, model)
    pairs, reports = [], []
    for f in cfg.data:
        got, report = read_pairs(f, tok, length, cfg.max_prompt_length, cfg.skip_bad_pairs, frame)
        pairs += got
        reports.append(report)
    train_pairs, val_pairs = split(pairs, cfg.val_fraction, cfg.seed)
    return model, tok, length, grew, train_pairs, val_pairs, reports


def pair_tokens(batch: dict) -> torch.Tensor:
    return (batch["segments"] > 0).sum()


# --- the recipe ---------------------------------------------------------------------------


def train_reward(cfg: RewardConfig, resume: bool = False) -> dict:
    """Train a reward model (or continue, with resume=True) in cfg.out_dir; returns the last metrics."""
    model, tok, length, grew, train_pairs, val_pairs, reports = load_pairs(cfg, ("gpt", "bert"))
    freeze_unused(model, *LM_HEADS[model.family])
    trains = apply_lora(model, cfg, grew)

    with Run(cfg, resume, command="lmstack align reward") as run:
        d = run.d
        objective = RewardModel(model)
        stepper = run.optimizer_step(objective)
        per_step = cfg.batch_size * d.world * cfg.grad_accum
        train_batches = PairBatches(train_pairs, cfg.batch_size, cfg.seed, per_step)
        val_batches = PairBatches(val_pairs, cfg.batch_size, cfg.seed, per_step).in_order() if val_pairs else []
        for report in reports:
            run.write(str(report))
        run.begin(
            encoder_flops(model, length),
            eval_cost=len(val_batches) / (3 * cfg.grad_accum),
            banner=(
                f"{model.family} reward model from {cfg.init_from}; {trains}; {len(train_pairs)} train / {len(val_pairs)} "
                f"held-out pairs of at most {length} tokens; {per_step} pairs per step"
            ),
        )
        if val_batches and run.step == 0:
            run.log_eval(pair_metrics(objective, val_batches, stepper))
        path = None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(
                lambda micro: train_batches.make(step, micro * d.world + d.rank), cfg.grad_accum, lr, step, count=pair_tokens
            )
            run.end_step(result, lr, epoch=round(train_batches.epoch(run.step + 1), 3))
            if val_batches and run.eval_due:
                run.log_eval(pair_metrics(objective, val_batches, stepper))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg, reward={"max_length": length, "max_prompt_length": cfg.max_prompt_length})
        return {**run.finish(), "checkpoint": str(path) if path else None}


# --- using a trained reward model ---------------------------------------------------------


class RewardScorer:
    """A trained reward model: `score(conversations, responses) -> [N]` rewards of text, tokenised
    with the reward model's own tokenizer (prompts keep their end to fit its context)."""

    def __init__(self, objective: RewardModel, tokenizer, length: int, max_prompt_length: int):
        self.objective, self.tokenizer, self.length = objective.eval(), tokenizer, length
        self.max_prompt_length = max_prompt_length or length // 2
        model = objective.model
        self.frame = ([model.config.cls_token_id], [model.config.sep_token_id]) if model.family == "bert" else None

    @torch.no_grad()
    def score(self, conversations: list[list[dict] | str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """[N] float32 rewards of `responses[i]` as the reply to `conversations[i]` (a prompt string, an
        hh-rlhf transcript or a list of chat messages ending in a user turn)."""
        from lmstack.data.pairs import prompt_messages
        from lmstack.data.sft import collate

        if len(conversations) != len(responses):
            raise InputError(f"got {len(conversations)} prompts for {len(responses)} responses; pass one prompt per response")
        rows = []
        for n, (prompt, response) in enumerate(zip(conversations, responses)):
            where = f"response {n}"
            if not response.strip():
                raise InputError(f"{where} is empty; a reward model scores a non-empty reply")
            row = PairRow(prompt_messages(prompt, where), response.strip(), response.strip(), where)
            rows.append(pair_examples(encode_pair(self.tokenizer, row, self.length, self.max_prompt_length, self.frame))[0])
        device = next(self.objective.parameters()).device
        out = []
        for s in range(0, len(rows), batch_size):
            group = [[e] for e in rows[s : s + batch_size]]
            batch = {k: v.to(device) for k, v in collate(group, max(len(e[0].ids) for e in group)).items()}
            out.append(self.objective.rewards(batch).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(path: str | os.PathLike, device: str = "cpu") -> RewardScorer:
    """The reward model in a checkpoint of `lmstack align reward` (a model or adapter directory with its head)."""
    from lmstack.models.checkpoint import load_for_text

    p = Path(path)
    meta = saved_task(p, "reward")
    if not meta or not (p / OBJECTIVE_FILE).is_file():
        raise CheckpointError(
            f'{p}: not a reward model (no "reward" entry in trainer_state.json or no {OBJECTIVE_FILE}); '
            "pass a checkpoint of `lmstack align reward`"
        )
    model, tok = load_for_text(p, device)
    objective = RewardModel(model)
    head = {k.removeprefix("head."): v for k, v in load_file(str(p / OBJECTIVE_FILE)).items() if k.startswith("head.")}
    try:
        objective.head.load_state_dict(head)
    except RuntimeError as e:
        raise CheckpointError(
            f"{p / OBJECTIVE_FILE}: the reward head does not fit this model ({str(e).splitlines()[0]})"
        ) from None
    return RewardScorer(objective.to(device), tok, meta["max_length"], meta.get("max_prompt_length", 0))

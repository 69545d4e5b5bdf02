"""Supervised fine-tuning: maximise log P(A | Q) from a pretrained model, as one recipe.

`finetune(cfg)` loads the model named by `--init-from` (an lmstack checkpoint, a LoRA adapter
directory, or a Hugging Face directory, imported on the fly) with its tokenizer; for chat data in
lmstack's built-in format it adds the role tokens the tokenizer lacks and grows the embedding
(`models.base.grow_vocab`: new rows start at the mean of the old ones). With a `[lora]` table
(`--lora r=16 ...`) the base is frozen and only adapters train. Examples (`data.sft`) are
conversations with the loss on the assistant's tokens only, or plain text for continued
pretraining; short examples are packed into full rows, each attending only to itself. Every
`eval_interval` steps (and before the first) it reports, on held-out rows, the loss and the mean
log P(A | Q) per row. Checkpoints are ordinary model directories, or PEFT adapter directories
under LoRA; the step and the run around it are `training.step` and `training.run`.

Classification and sentence embeddings (`--task classify|embed`) are recipes of their own
(`training.classify`, `training.embed`) that share the config and `load_base` / `apply_lora`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import CheckpointError, InputError
from lmstack.training import distributed
from lmstack.training.config import RunConfig, _field, table
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

TASKS = ("sft", "classify", "embed")
CAUSAL = ("gpt", "rnn", "ffn")


@dataclass
class AdaptConfig(RunConfig):
    """What every recipe that starts from a pretrained model shares (fine-tuning, reward models,
    preference and RL training): the model, the data, the held-out split, LoRA, short-run defaults."""

    out_dir: str = _field("runs/finetune", "run directory: config, metrics, checkpoints")
    init_from: str = _field(
        "",
        "the model to start from: an lmstack checkpoint, an adapter directory or a "
        "Hugging Face model directory (imported on the fly)",
    )
    val_fraction: float = _field(0.1, "fraction of the examples held out for validation (seeded)")
    grad_accum: int = _field(1, "micro-batches per optimizer step on each process")
    lora: dict = _field(
        {},
        "LoRA adapters instead of full training: r (16), alpha (32), dropout (0.0), "
        "targets (attn,mlp or module-name patterns), rslora (false)",
    )
    # short runs at a small learning rate
    max_steps: int = _field(300, "optimizer steps to train for")
    lr: float = _field(1e-4, "peak learning rate (LoRA usually wants ~10x more than full training)")
    min_lr: float = _field(1e-5, "learning rate at the end of the schedule")
    warmup_steps: int = _field(20, "")
    weight_decay: float = _field(0.0, "applied to matrices and embeddings, never to biases and norms")
    batch_size: int = _field(8, "rows per micro-batch on each process: lower it on out-of-memory")
    eval_interval: int = _field(50, "validate every N steps (and before the first and at the end); 0 = start and end")
    ckpt_interval: int = _field(0, "save every N steps (and at the end); 0 = only at the end")
    keep_last: int = _field(1, "checkpoints kept besides the best one")

    def __post_init__(self):
        super().__post_init__()
        self.lora_config()  # the [lora] table, checked

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.parallel == "ddp", "recipes from a pretrained model run under DDP (--parallel ddp); FSDP is for pretraining"),
        ]

    def lora_config(self):
        """The LoRA settings, or None for full training (an empty [lora] table)."""
        if not self.lora:
            return None
        from lmstack.models.lora import LoraConfig

        return table(LoraConfig, self.lora, "lora")


@dataclass
class FinetuneConfig(AdaptConfig):
    """Fine-tuning (`lmstack finetune`)."""

    data: list[str] = _field(
        [],
        "JSONL files ({prompt, response} or {messages}; classify: {text, label}; "
        "embed: {text}) or plain text files for continued pretraining",
    )
    max_length: int = _field(0, "tokens per row (packed) and the longest example kept; 0 = the model's context, at most 1024")
    task: str = _field("sft", "sft (loss on the answers) | classify (a label head) | embed (contrastive sentence vectors)")
    pack: bool = _field(True, "pack short examples into full rows (each attends only to itself); --no-pack: one per row")
    embed: dict = _field(
        {}, "--task embed: temperature (0.05), pooling (mean | cls | last), dropout (0.1, when the model has none)"
    )

    def __post_init__(self):
        super().__post_init__()
        from lmstack.training.embed import embed_options

        embed_options(self)  # the [embed] table, checked

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}"),
            (self.max_length >= 0, "max_length must be >= 0 (0 = the model's context)"),
        ]


# --- shared by the fine-tuning recipes ------------------------------------------------------


def load_base(path: str):
    """(model, tokenizer) to fine-tune: an lmstack checkpoint, an adapter directory (base plus
    adapter, merged so that training continues from the adapted model) or a Hugging Face
    directory, which is imported as `lmstack convert` would."""
    from lmstack.models.checkpoint import load
    from lmstack.models.hf import from_hf, hf_model_type

    if not path:
        raise InputError("no model to start from; pass --init-from CKPT (an lmstack checkpoint or a Hugging Face directory)")
    p = Path(path)
    if not p.exists():
        raise InputError(f"--init-from {p}: no such checkpoint directory; check the path")
    model, tokenizer = from_hf(p) if p.is_dir() and hf_model_type(p) else load(p)
    if tokenizer is None:
        raise CheckpointError(
            f"{p}: has no tokenizer, so text cannot be encoded for it; save the checkpoint with its "
            "tokenizer (`lmstack convert` imports a Hugging Face tokenizer.json)"
        )
    from lmstack.models.lora import lora_modules, merge_and_unload

    if lora_modules(model):
        model = merge_and_unload(model)
    return model.float().train(), tokenizer


def fit_vocab(model: nn.Module, tokenizer) -> tuple[nn.Module, bool]:
    """The model with room for every id of the tokenizer (special tokens were added), and whether
    it grew."""
    from lmstack.models.base import grow_vocab

    if tokenizer.vocab_size <= model.config.vocab_size:
        return model, False
    return grow_vocab(model, tokenizer.vocab_size), True


def apply_lora(model: nn.Module, cfg: AdaptConfig, grew: bool) -> str:
    """Attach the [lora] adapters (when asked) and say what trains."""
    total = sum(p.numel() for p in model.parameters())
    lora = cfg.lora_config()
    if lora is not None:
        from lmstack.models.lora import attach

        if grew:  # the new tokens' rows must learn too: the embedding and head go in the adapter whole
            lora = replace(lora, modules_to_save=(*lora.modules_to_save, "embeddings"))
        attach(model, lora)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = "full fine-tuning" if lora is None else f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.targets)}"
    return f"{how}: {trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)"


def save_model(run: Run, tokenizer, cfg: AdaptConfig, **extra_state) -> Path:
    """The run's checkpoint: a model directory, or a PEFT adapter directory naming its base;
    `extra_state` (a recipe's own, e.g. a classifier's labels) goes into trainer_state.json."""
    return run.save(tokenizer, adapter_base=cfg.init_from if cfg.lora else None, **extra_state)


def max_length(cfg, model) -> int:
    """The config's `max_length`, checked against the model's context (0: the context, at most 1024)."""
    context = model.max_context
    if cfg.max_length:
        if context is not None and cfg.max_length > context:
            raise InputError(
                f"--max-length {cfg.max_length} is longer than the model's context ({context} tokens); "
                f"lower it to {context} or less"
            )
        return cfg.max_length
    return min(context or 1024, 1024)


def recipe(task: str):
    """The recipe function of a --task: `f(cfg, resume) -> last metrics`."""
    if task == "classify":
        from lmstack.training.classify import classify

        return classify
    if task == "embed":
        from lmstack.training.embed import embed

        return embed
    return finetune


# --- supervised fine-tuning -----------------------------------------------------------------


class AnswerLoss(nn.Module):
    """Mean cross-entropy over the tokens with a target (the assistant's), in packed rows too:
    the GPT keeps each document's attention and positions to itself (`segments`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.packs = model.family == "gpt"

    def logits(self, batch: dict) -> torch.Tensor:
        if self.packs:
            return self.model(batch["idx"], segments=batch["segments"])
        return self.model(batch["idx"])

    def forward(self, batch: dict) -> torch.Tensor:
        targets = batch["targets"]
        if not self.packs:
            return F.cross_entropy(self.logits(batch).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        # The head and softmax span the vocabulary, the largest single cost of a small model's step;
        # only positions with a target (the answers, a fraction of each row) need them, and the
        # last block's feed-forward.
        keep = targets != -100
        hidden = self.model.hidden_states(batch["idx"], segments=batch["segments"], keep=keep)
        weight = self.model.lm_head.weight
        if not torch.is_grad_enabled():  # evaluation: nothing to save
            return F.cross_entropy(F.linear(hidden, weight).float(), targets[keep])
        return LinearCrossEntropy.apply(hidden, weight, targets[keep])

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)


def held_out_batches(examples, batch_size: int) -> list[dict]:
    """The held-out examples in file order, one per row, in batches padded to their longest."""
    from lmstack.data.sft import collate

    groups = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    return [collate([[e] for e in g], max(len(e.ids) for e in g)) for g in groups]


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of `hidden @ weight.T` against `targets`, a few hundred rows at a time:
    the [N, vocab] logits are never held whole, and their gradients are made in the same pass
    (softmax - one-hot is all the backward needs), which saves the head's memory and a third of
    its time. Equals `F.cross_entropy(F.linear(hidden, weight), targets)`; for training only (under
    no_grad the plain expression is as good)."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.float()
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, n, LinearCrossEntropy.CHUNK):
            h, t = hidden[start : start + LinearCrossEntropy.CHUNK].float(), targets[start : start + LinearCrossEntropy.CHUNK]
            p = torch.log_softmax(h @ w.t(), -1)
            loss -= p.gather(1, t[:, None]).sum()
            p.exp_()
            p[torch.arange(len(t), device=p.device), t] -= 1  # d loss / d logits, times n
            if grad_h is not None:
                grad_h[start : start + len(t)] = (p @ w).to(grad_h.dtype)
            if grad_w is not None:
                grad_w.addmm_(p.t(), h)
        ctx.grads = (None if grad_h is None else grad_h / n, None if grad_w is None else (grad_w / n).to(weight.dtype))
        return (loss / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.grads
        return (None if grad_h is None else grad_h * grad, None if grad_w is None else grad_w * grad, None)


@torch.no_grad()
def answer_logprobs(objective: AnswerLoss, batches: list[dict], stepper) -> dict:
    """On held-out rows (one example per row): the loss per answer token and the mean over rows
    of log P(A | Q), the sum of the answer tokens' log-probabilities."""
    objective.eval()
    total = torch.zeros(3, dtype=torch.float64, device=stepper.device)  # sum log p, answer tokens, rows
    for batch in batches[stepper.d.rank :: stepper.d.world]:
        batch = stepper.to_device(batch)
        with stepper.autocast:
            logits = objective.logits(batch)
        targets = batch["targets"]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        logp = logp.masked_fill(targets == -100, 0.0)
        total += torch.stack([logp.sum(), (targets != -100).sum(), torch.tensor(targets.shape[0])]).double().to(total)
    objective.train()
    total = distributed.sum_(total, stepper.d)
    logp, tokens, rows = total.tolist()
    return {"val_loss": -logp / tokens, "val_logp_answer": logp / rows}


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tune (or continue, with resume=True) the run in cfg.out_dir; returns the last metrics."""
    from lmstack.data.chat import add_chat_tokens
    from lmstack.data.sft import SFTBatches, read_examples, split

    if cfg.task != "sft":
        raise InputError(f"finetune() runs --task sft; --task {cfg.task} has its own recipe")
    if not cfg.data:
        raise InputError("no fine-tuning data; pass --data FILE.jsonl (or a --config that sets data)")
    # Everything that can fail on the user's input fails here, before the run directory exists.
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.init_from)
    if model.family not in CAUSAL:
        raise InputError(
            f"--task sft trains causal models ({', '.join(CAUSAL)}); {cfg.init_from} is a {model.family!r} "
            "model (use --task classify or embed for an encoder)"
        )
    if cfg.pack and model.family != "gpt":
        raise InputError(f"packing needs a GPT (attention kept within each example); pass --no-pack for a {model.family!r} model")
    chat = any(Path(f).suffix.lower() == ".jsonl" for f in cfg.data)
    added = add_chat_tokens(tok) if chat else []
    model, grew = fit_vocab(model, tok)
    length = max_length(cfg, model)
    examples = []
    reports = []
    for f in cfg.data:
        got, report = read_examples(f, tok, length)
        examples += got
        reports.append(report)
    train_ex, val_ex = split(examples, cfg.val_fraction, cfg.seed)
    trains = apply_lora(model, cfg, grew)

    with Run(cfg, resume, command="lmstack finetune") as run:
        d = run.d
        objective = AnswerLoss(model)
        stepper = run.optimizer_step(objective)
        rows = cfg.batch_size * d.world * cfg.grad_accum
        train_batches = SFTBatches(train_ex, cfg.batch_size, length, cfg.seed, pack=cfg.pack, pad_id=0, rows_per_step=rows)
        val_batches = held_out_batches(val_ex, cfg.batch_size)
        for report in reports:
            run.write(str(report))
        run.begin(
            objective.flops_per_token(length),
            eval_cost=len(val_batches) / (3 * cfg.grad_accum),
            banner=(
                f"{model.family} from {cfg.init_from}; {trains}; {len(train_ex)} train / {len(val_ex)} held-out examples, "
                f"{train_batches.rows_per_epoch} rows of {length} tokens per epoch ({train_batches.fill:.0%} filled"
                f"{', packed' if cfg.pack else ''}); {rows} rows per step" + (f"; added chat tokens {added}" if added else "")
            ),
        )
        if val_batches and run.step == 0:
            run.log_eval(answer_logprobs(objective, val_batches, stepper))
        path = None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(
                lambda micro: train_batches.make(step, micro * d.world + d.rank),
                cfg.grad_accum,
                lr,
                step,
                count=lambda b: (b["segments"] > 0).sum(),
            )
            run.end_step(result, lr, epoch=round(train_batches.epoch(run.step + 1), 3))
            if val_batches and run.eval_due:
                run.log_eval(answer_logprobs(objective, val_batches, stepper))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg)
        return {**run.finish(), "checkpoint": str(path) if path else None}

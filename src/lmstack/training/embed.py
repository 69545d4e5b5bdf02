"""Sentence embeddings: SimCSE's unsupervised contrastive fine-tuning, as one recipe, and the
sentence encoder that `lmstack embed` and the classifier recipe share.

SimCSE (Gao et al. 2021): each sentence of a batch runs through the encoder twice with dropout
on, so its two vectors differ only by the dropout noise. The two views of a sentence are a
positive pair, every other sentence of the batch a negative, and the loss is InfoNCE over cosine
similarities divided by a temperature τ (0.05), in both directions:
    L = ½ [CE(S, I) + CE(Sᵀ, I)],  S_ij = cos(z¹_i, z²_j) / τ.
Negatives are the rows of one process's micro-batch (no gathering across processes).

A sentence vector pools the encoder's last states (`[embed] pooling=`): `mean` (the default, for
both families) averages them over the real tokens; `cls` takes the first position (BERT's [CLS],
without the pooler: SimCSE's test-time choice), `last` the last real token. Mean is the default
because it works from any start: a BERT pretrained by masked LM alone has never trained its
[CLS] state, and SimCSE from such a [CLS] collapses every sentence to one vector (the loss stalls
at log batch_size), while from the mean it learns; a causal model's early states have not seen
the whole sentence, and its mean still reads every token. BERT rows are
`[CLS] text [SEP]`, GPT rows the text's tokens; rows are right-padded, so a causal model's real
tokens never attend to padding. A model saved with dropout 0 (the GPT default) would make the
two views identical: it trains with `[embed] dropout=` (0.1) in every dropout layer, while the
checkpoint keeps the config it came with (the adapter's base check compares it; dropout is off
at inference anyway). Data: JSONL `{"text"}` rows or a text file, one sentence per line; exact
duplicates are dropped (a duplicate in the batch would be a false negative). Held-out rows
report the loss, `val_top1` (how often view 1 of a sentence finds its own view 2 among the
batch's) and the mean cosine of positive and of negative pairs, with dropout drawn from a fixed
seed so evaluations compare. The checkpoint is a model (or adapter) directory; its pooling is
kept in trainer_state.json under "embed".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError
from lmstack.io import check_readable, iter_lines, read_json
from lmstack.training import distributed
from lmstack.training.finetune import FinetuneConfig, apply_lora, fit_vocab, load_base, max_length, save_model
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

ENCODERS = ("bert", "gpt")
POOLINGS = ("cls", "mean", "last")
DEFAULT_POOLING = "mean"
STATE_FILE = "trainer_state.json"


@dataclass
class EmbedOptions:
    """[embed]: the contrastive objective's settings."""

    temperature: float = 0.05
    pooling: str = DEFAULT_POOLING  # cls | mean | last
    dropout: float = 0.1  # for the two views, when the model has none

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not 0 < self.dropout < 1:
            raise ValueError(f"dropout must be in (0, 1), got {self.dropout}")


def embed_options(cfg: FinetuneConfig) -> EmbedOptions:
    """The [embed] table, checked (defaults where the config has no such table)."""
    from lmstack.training.config import table

    return table(EmbedOptions, cfg.embed, "embed")


# --- sentences to vectors (shared with training.classify and `lmstack embed`) ----------------


def check_encoder(model, where: str, task: str) -> None:
    if model.family not in ENCODERS:
        raise InputError(f"{where}: {task} needs a BERT or GPT model, not a {model.family!r} model")


def text_ids(model, tokenizer, text: str, length: int) -> tuple[list[int], bool]:
    """A sentence's row (BERT: `[CLS] text [SEP]` with the ids the model's config names) cut to
    `length` tokens, and whether it was cut."""
    ids = tokenizer.encode_ordinary(text)
    if model.family != "bert":
        return ids[:length], len(ids) > length
    c = model.config
    head, tail = [c.cls_token_id] if c.cls_token_id is not None else [], [c.sep_token_id] if c.sep_token_id is not None else []
    room = length - len(head) - len(tail)
    return head + ids[:room] + tail, len(ids) > room


def width(model) -> int:
    """The size of the model's last states (and so of its sentence vectors)."""
    return model.config.d_model if model.family == "bert" else model.config.n_embd


def pad_rows(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """`idx` [B, T] right-padded with 0 to the longest row, `mask` [B, T] True on real tokens."""
    longest = max(len(r) for r in rows)
    idx = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
        mask[i, : len(r)] = True
    return {"idx": torch.from_numpy(idx), "mask": torch.from_numpy(mask)}


def last_states(model, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, width] last-layer states of right-padded rows."""
    if model.family == "bert":
        return model.encode(idx, mask)
    return model.hidden_states(idx)  # causal: the padding after a row's end cannot reach it


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, D] states -> [B, D]: the first position (cls), the mean over real tokens, or the last
    real token (rows are right-padded, so it sits at length - 1)."""
    if how == "cls":
        return states[:, 0]
    if how == "mean":
        m = mask[..., None].to(states.dtype)
        return (states * m).sum(1) / m.sum(1)
    return states[torch.arange(states.shape[0], device=states.device), mask.sum(1) - 1]


def sequence_features(model, idx: torch.Tensor, mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
    """[B, width]: what a sequence-level head (classifier, reward) reads: BERT's pooled [CLS],
    tanh(W h_[CLS] + b), as `BertForSequenceClassification`; a GPT's state at the last real token,
    the only one that has read the whole row."""
    if model.family == "bert":
        return model.pooled(idx, mask, token_type_ids)
    return pool(last_states(model, idx, mask), mask, "last")


def freeze_unused(model, *prefixes: str) -> None:
    """Freeze the parameters a task head never reaches (the LM heads; names by prefix): they stay
    as they were in the checkpoint, get no optimizer state, and DDP waits for no gradient of
    theirs. A GPT's tied head is the input embedding, which `named_parameters` lists as `wte`."""
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


LM_HEADS = {"bert": ("mlm_", "nsp.", "classifier."), "gpt": ("lm_head.",)}


def encoder_flops(model, seq_len: int) -> float:
    """Training FLOPs per token without the LM head's matmul, which a task head does not run
    (GPT: the [vocab, width] output matrix; BERT: the MLM transform and tied decoder)."""
    if model.family == "gpt":
        head = model.lm_head.weight.numel()
    else:
        head = model.mlm_dense.weight.numel() + model.embed_tokens.weight.numel()
    return model.flops_per_token(seq_len) - 6 * head


@dataclass
class RowBatches:
    """Micro-batches of token rows (and their labels), right-padded: like `data.sft.SFTBatches`,
    micro-batch `index` of step `step` is a pure function of (seed, step, index), each epoch
    visiting every row once in an order drawn from (seed, epoch)."""

    rows: Sequence[Sequence[int]]
    labels: Sequence[int] | None
    batch_size: int
    seed: int
    rows_per_step: int

    def epoch(self, step: int) -> float:
        return step * self.rows_per_step / len(self.rows)

    def make(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` (= micro-step × world size + rank) of global batch `step`."""
        first = step * self.rows_per_step + index * self.batch_size
        orders: dict[int, np.ndarray] = {}
        picked = []
        for g in range(first, first + self.batch_size):
            epoch, pos = divmod(g, len(self.rows))
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            picked.append(int(orders[epoch][pos]))
        return self.collate(picked)

    def collate(self, picked: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = pad_rows([self.rows[i] for i in picked])
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in picked])
        return batch

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        """Every row once, in order, in batches of `batch_size` to 2 × `batch_size` - 1 rows (held-out
        evaluation: no short last batch, which would give contrastive metrics few negatives)."""
        parts = np.array_split(np.arange(len(self.rows)), max(1, len(self.rows) // self.batch_size))
        return [self.collate(part.tolist()) for part in parts]


# --- the objective ------------------------------------------------------------------------


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCSE's loss: row i of z1 and z2 are two views of sentence i, every other row a negative;
    cross-entropy over cosine similarities / temperature, averaged over both directions."""
    s = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T / temperature
    target = torch.arange(s.shape[0], device=s.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2


class SimCSE(nn.Module):
    """The contrastive loss on one batch of sentences, both views in one forward pass."""

    def __init__(self, model: nn.Module, pooling: str, temperature: float):
        super().__init__()
        self.model, self.pooling, self.temperature = model, pooling, temperature

    def views(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        idx, mask = batch["idx"].repeat(2, 1), batch["mask"].repeat(2, 1)  # dropout differs per row
        return pool(last_states(self.model, idx, mask), mask, self.pooling).chunk(2)

    def forward(self, batch: dict) -> torch.Tensor:
        return info_nce(*self.views(batch), self.temperature)


@torch.no_grad()
def contrastive_metrics(objective: SimCSE, batches: list[dict], stepper, seed: int) -> dict:
    """On held-out batches, dropout on and drawn from `seed` (the same masks at every evaluation,
    the training random stream untouched): the loss, view-1 -> view-2 top-1 retrieval accuracy,
    and the mean cosine of positive pairs and of negative pairs, each averaged over sentences."""
    total = torch.zeros(5, dtype=torch.float64, device=stepper.device)  # loss·n, hits, pos cos, neg cos·n, n
    devices = [stepper.device] if stepper.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in batches[stepper.d.rank :: stepper.d.world]:
            with stepper.autocast:
                z1, z2 = objective.views(stepper.to_device(batch))
            n = z1.shape[0]
            cos = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T
            hits = (cos.argmax(1) == torch.arange(n, device=cos.device)).sum()
            neg = (cos.sum() - cos.diagonal().sum()) / max(n - 1, 1)  # per sentence, summed over the batch
            loss = info_nce(z1, z2, objective.temperature) * n
            total += torch.stack([loss, hits, cos.diagonal().sum(), neg, torch.tensor(n)]).double().to(total)
    total = distributed.sum_(total, stepper.d)
    loss, hits, pos, neg, n = total.tolist()
    return {"val_loss": loss / n, "val_top1": hits / n, "val_pos_cos": pos / n, "val_neg_cos": neg / n}


# --- data ---------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike) -> list[tuple[str, int]]:
    """(sentence, line number) of a JSONL file of {"text"} rows or a text file of one sentence per
    line; blank lines are skipped."""
    p = check_readable(path)
    jsonl = p.suffix.lower() == ".jsonl"
    out = []
    for lineno, line in enumerate(iter_lines(p), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        text = row_text(json_row(line, where, ("text",), '{"text": "..."}'), where) if jsonl else line.rstrip("\r\n")
        out.append((text, lineno))
    if not out:
        raise InputError(f"{p}: holds no sentences (only blank lines); pass a file with one sentence per line")
    return out


def json_row(line: str, where: str, fields: tuple[str, ...], example: str) -> dict:
    """A JSONL line as an object that has `fields`, else an InputError naming the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    missing = [f for f in fields if not isinstance(row, dict) or f not in row]
    if missing:
        raise InputError(
            f"{where}: no {' or '.join(map(repr, missing))} field; each line must be a JSON object such as {example}"
        )
    return row


def row_text(row: dict, where: str) -> str:
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f'{where}: "text" must be a non-empty string, got {json.dumps(text, ensure_ascii=False)[:60]}')
    return text


def load_encoder(cfg: FinetuneConfig) -> tuple[nn.Module, object, int, bool]:
    """(model, tokenizer, row length, whether the vocabulary grew) for a sentence-level task."""
    model, tok = load_base(cfg.init_from)
    check_encoder(model, cfg.init_from, f"--task {cfg.task}")
    model, grew = fit_vocab(model, tok)
    return model, tok, max_length(cfg, model), grew


def with_dropout(model: nn.Module, p: float) -> nn.Module:
    """`model` rebuilt with dropout `p` in every layer if it has none, its config unchanged."""
    if model.config.dropout > 0:
        return model
    twin = type(model)(replace(model.config, dropout=p))
    twin.load_state_dict(model.state_dict())
    twin.config = model.config
    return twin.train()


def embed(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Train sentence embeddings (or continue, with resume=True) in cfg.out_dir; returns the last
    metrics."""
    from lmstack.data.sft import split

    if cfg.task != "embed":
        raise InputError(f"embed() runs --task embed, not --task {cfg.task}")
    if not cfg.data:
        raise InputError('no sentences to train on; pass --data FILE (JSONL {"text"} rows or one sentence per line)')
    if cfg.batch_size < 2:
        raise InputError("contrastive training takes its negatives from the batch; use --batch-size 2 or more (e.g. 32)")
    # Everything that can fail on the user's input fails here, before the run directory exists.
    opts = embed_options(cfg)
    torch.manual_seed(cfg.seed)
    model, tok, length, grew = load_encoder(cfg)
    model = with_dropout(model, opts.dropout)
    texts = list(dict.fromkeys(t for f in cfg.data for t, _ in read_texts(f)))
    rows = [text_ids(model, tok, t, length) for t in texts]
    cut = sum(c for _, c in rows)
    train_rows, val_rows = split([r for r, _ in rows], cfg.val_fraction, cfg.seed)
    if len(train_rows) < 2 or len(val_rows) == 1:
        raise InputError(
            f"{len(texts)} distinct sentences give {len(train_rows)} to train on and {len(val_rows)} held out; "
            "contrastive training and validation each need 2 or more (really hundreds): add data"
        )
    freeze_unused(model, *LM_HEADS[model.family], *(("pooler.",) if model.family == "bert" else ()))  # [CLS] pooler unused
    trains = apply_lora(model, cfg, grew)

    with Run(cfg, resume, command="lmstack finetune") as run:
        d = run.d
        objective = SimCSE(model, opts.pooling, opts.temperature)
        stepper = run.optimizer_step(objective)
        per_step = cfg.batch_size * d.world * cfg.grad_accum
        train_batches = RowBatches(train_rows, None, cfg.batch_size, cfg.seed, per_step)
        val_batches = RowBatches(val_rows, None, cfg.batch_size, cfg.seed, per_step).in_order() if val_rows else []
        run.begin(
            encoder_flops(model, length),
            eval_cost=2 * len(val_batches) / (3 * cfg.grad_accum),
            banner=(
                f"SimCSE on a {model.family} from {cfg.init_from}; {trains}; {len(train_rows)} train / {len(val_rows)} held-out "
                f"sentences ({len(texts)} distinct, {cut} cut to {length} tokens); {opts.pooling} pooling, temperature "
                f"{opts.temperature:g}, dropout {model.drop.p:g}; {per_step} sentences per step, two views each"
            ),
        )
        if val_batches and run.step == 0:
            run.log_eval(contrastive_metrics(objective, val_batches, stepper, cfg.seed))
        path = None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(
                lambda micro: train_batches.make(step, micro * d.world + d.rank),
                cfg.grad_accum,
                lr,
                step,
                count=lambda b: 2 * b["mask"].sum(),
            )  # both views
            run.end_step(result, lr, epoch=round(train_batches.epoch(run.step + 1), 3))
            if val_batches and run.eval_due:
                run.log_eval(contrastive_metrics(objective, val_batches, stepper, cfg.seed))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg, embed={"pooling": opts.pooling, "max_length": length})
        return {**run.finish(), "checkpoint": str(path) if path else None}


# --- using an encoder ---------------------------------------------------------------------


def saved_task(path: str | os.PathLike, task: str) -> dict:
    """What a fine-tuning recipe kept about its task in a checkpoint's trainer_state.json ({} if none)."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        return {}
    return read_json(f, "trainer state").get(task) or {}


class SentenceEncoder:
    """Sentence vectors from any BERT or GPT checkpoint (a base model, a `--task embed` run's
    checkpoint, or an adapter directory): `encode(texts) -> [N, D]` float32, not normalised."""

    def __init__(self, model, tokenizer, pooling: str, length: int):
        self.model, self.tokenizer, self.pooling, self.length = model.eval(), tokenizer, pooling, length

    @classmethod
    def load(cls, path: str | os.PathLike, pooling: str = "", device: str = "cpu") -> "SentenceEncoder":
        """`pooling` "" = the one the checkpoint was trained with, else mean."""
        from lmstack.models.checkpoint import load_for_text

        if pooling not in ("", *POOLINGS):
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        model, tok = load_for_text(path, device)
        check_encoder(model, str(path), "sentence embedding")
        saved = saved_task(path, "embed")
        context = min(model.max_context or 1024, 1024)
        return cls(model, tok, pooling or saved.get("pooling") or DEFAULT_POOLING, saved.get("max_length", context))

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Rows are batched by length (little padding) and returned in the order given."""
        rows = [text_ids(self.model, self.tokenizer, t, self.length)[0] for t in texts]
        if any(not r for r in rows):
            raise InputError("an empty text has no tokens to embed; drop empty lines")
        device = next(self.model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.zeros((len(rows), width(self.model)), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            picked = order[s : s + batch_size]
            b = {k: v.to(device) for k, v in pad_rows([rows[i] for i in picked]).items()}
            out[picked] = pool(last_states(self.model, b["idx"], b["mask"]), b["mask"], self.pooling).float().cpu().numpy()
        return out

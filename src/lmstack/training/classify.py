"""Sequence classification: a label head on a pretrained BERT or GPT, trained as one recipe, and
`load_classifier` to use the result.

Data: JSONL rows `{"text": ..., "label": ...}`, labels all strings or all integers. The label set
is read from the training rows and sorted; class k is the k-th label. Every held-out label must
occur in training (a head cannot learn a class it never sees). The sentence feature is BERT's
pooled [CLS] (tanh(W h_[CLS] + b), the pooler `BertForSequenceClassification` reads) or a GPT's
last-layer state at the last real token (rows are right-padded, so it sits at length - 1: the
only position that has read the whole text). A linear head maps it to one logit per class; the
loss is the cross-entropy. With LoRA the encoder is frozen except its adapters, and the head (and
only it besides them) trains in full, as PEFT's SEQ_CLS task does. The model's LM heads are
frozen, unused. Held-out rows report the loss, the accuracy and the macro-F1 (the unweighted
mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes that occur in the held-out
labels or the predictions, as scikit-learn's `f1_score(average="macro")`).

A checkpoint is the run's model directory (or PEFT adapter directory) plus the head in
`objective.safetensors` (`head.weight` [classes, width], `head.bias`), with the labels and the
row length kept in trainer_state.json under "classify"; the one checkpoint writer
(`training.checkpoint`) writes all of it atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmstack.errors import CheckpointError, InputError
from lmstack.io import check_readable, iter_lines
from lmstack.training import distributed
from lmstack.training.checkpoint import OBJECTIVE_FILE
from lmstack.training.embed import (
    LM_HEADS,
    RowBatches,
    encoder_flops,
    freeze_unused,
    json_row,
    load_encoder,
    pad_rows,
    row_text,
    saved_task,
    sequence_features,
    text_ids,
    width,
)
from lmstack.training.finetune import FinetuneConfig, apply_lora, save_model
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

EXAMPLE = '{"text": "...", "label": "..."}'


class SequenceClassifier(nn.Module):
    """Logits of a linear head over the sentence feature; `forward` is the cross-entropy."""

    def __init__(self, model: nn.Module, n_labels: int):
        super().__init__()
        self.model = model
        self.head = nn.Linear(width(model), n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head(sequence_features(self.model, batch["idx"], batch["mask"]))

    def forward(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch).float(), batch["labels"])


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-F1 of a [K, K] confusion matrix (rows: true class, columns: predicted), over the
    classes that occur in either."""
    tp = confusion.diagonal().double()
    fp, fn = confusion.sum(0).double() - tp, confusion.sum(1).double() - tp
    present = (tp + fp + fn) > 0
    return float((2 * tp / (2 * tp + fp + fn))[present].mean()) if present.any() else 0.0


@torch.no_grad()
def classification_metrics(objective: SequenceClassifier, batches: list[dict], stepper) -> dict:
    """On held-out rows: mean loss, accuracy and macro-F1 (the confusion matrix summed over processes)."""
    objective.eval()
    k = objective.head.out_features
    loss = torch.zeros((), dtype=torch.float64, device=stepper.device)
    confusion = torch.zeros(k, k, dtype=torch.float64, device=stepper.device)
    for batch in batches[stepper.d.rank :: stepper.d.world]:
        batch = stepper.to_device(batch)
        with stepper.autocast:
            logits = objective.logits(batch).float()
        labels = batch["labels"]
        loss += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * k + logits.argmax(-1), minlength=k * k).view(k, k).double()
    objective.train()
    loss, confusion = distributed.sum_(loss, stepper.d), distributed.sum_(confusion, stepper.d)
    n = float(confusion.sum())
    return {
        "val_loss": float(loss) / n,
        "val_accuracy": float(confusion.diagonal().sum()) / n,
        "val_macro_f1": macro_f1(confusion),
    }


# --- data ---------------------------------------------------------------------------------


def read_labeled(path: str | os.PathLike) -> list[tuple[str, int | str, str]]:
    """(text, label, "file:line") of each row of a JSONL file of {"text", "label"} rows."""
    p = check_readable(path)
    if p.suffix.lower() != ".jsonl":
        raise InputError(f"{p}: --task classify reads JSONL rows such as {EXAMPLE}; convert the file to .jsonl")
    out = []
    for lineno, line in enumerate(iter_lines(p), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        row = json_row(line, where, ("text", "label"), EXAMPLE)
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise InputError(f'{where}: "label" must be a string or an integer, got {label!r}')
        if out and type(label) is not type(out[0][1]):
            raise InputError(
                f"{where}: label {label!r} is a {type(label).__name__} but {out[0][2]} has "
                f"{out[0][1]!r}; labels must be all strings or all integers"
            )
        out.append((row_text(row, where), label, where))
    if not out:
        raise InputError(f"{p}: holds no rows (only blank lines); pass rows such as {EXAMPLE}")
    return out


def label_set(train: Sequence[tuple], held_out: Sequence[tuple]) -> list:
    """The sorted labels of the training rows; every held-out label must be among them."""
    labels = sorted({label for _, label, _ in train})
    if len(labels) < 2:
        raise InputError(
            f"the training rows have only one label ({labels[0]!r}); a classifier needs at least two "
            "classes, so add rows of another label"
        )
    unseen = next(((label, where) for _, label, where in held_out if label not in set(labels)), None)
    if unseen:
        raise InputError(
            f"label {unseen[0]!r} ({unseen[1]}) is held out for validation but never occurs in the "
            "training rows; add training rows with it, or change --seed / --val-fraction"
        )
    return labels


def classify(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Train a classifier head (or continue, with resume=True) in cfg.out_dir; returns the last metrics."""
    from lmstack.data.sft import split

    if cfg.task != "classify":
        raise InputError(f"classify() runs --task classify, not --task {cfg.task}")
    if not cfg.data:
        raise InputError(f"no labelled data; pass --data FILE.jsonl with rows such as {EXAMPLE}")
    # Everything that can fail on the user's input fails here, before the run directory exists.
    torch.manual_seed(cfg.seed)
    rows = [r for f in cfg.data for r in read_labeled(f)]
    model, tok, length, grew = load_encoder(cfg)
    train_rows, val_rows = split(rows, cfg.val_fraction, cfg.seed)
    labels = label_set(train_rows, val_rows)
    index = {label: k for k, label in enumerate(labels)}
    encoded = {where: text_ids(model, tok, text, length) for text, _, where in rows}

    def batches(part: Sequence[tuple], per_step: int) -> RowBatches:
        return RowBatches(
            [encoded[w][0] for *_, w in part], [index[lab] for _, lab, _ in part], cfg.batch_size, cfg.seed, per_step
        )

    freeze_unused(model, *LM_HEADS[model.family])
    trains = apply_lora(model, cfg, grew)

    with Run(cfg, resume, command="lmstack finetune") as run:
        d = run.d
        saved = run.state.get("classify", {}).get("labels")
        if resume and saved != labels:
            raise InputError(f"the data's labels {labels} differ from the run's {saved}; resume with the same --data")
        objective = SequenceClassifier(model, len(labels))
        stepper = run.optimizer_step(objective)
        per_step = cfg.batch_size * d.world * cfg.grad_accum
        train_batches = batches(train_rows, per_step)
        val_batches = batches(val_rows, per_step).in_order() if val_rows else []
        cut = sum(c for _, c in encoded.values())
        run.begin(
            encoder_flops(model, length),
            eval_cost=len(val_batches) / (3 * cfg.grad_accum),
            banner=(
                f"{model.family} classifier from {cfg.init_from}; {trains}, and the head's "
                f"{sum(p.numel() for p in objective.head.parameters()):,}; {len(labels)} classes "
                f"{labels if len(labels) <= 10 else labels[:10] + ['...']}; {len(train_rows)} train / {len(val_rows)} "
                f"held-out rows ({cut} cut to {length} tokens); {per_step} rows per step"
            ),
        )
        if val_batches and run.step == 0:
            run.log_eval(classification_metrics(objective, val_batches, stepper))
        path = None
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(
                lambda micro: train_batches.make(step, micro * d.world + d.rank),
                cfg.grad_accum,
                lr,
                step,
                count=lambda b: b["mask"].sum(),
            )
            run.end_step(result, lr, epoch=round(train_batches.epoch(run.step + 1), 3))
            if val_batches and run.eval_due:
                run.log_eval(classification_metrics(objective, val_batches, stepper))
            if run.checkpoint_due:
                path = save_model(run, tok, cfg, classify={"labels": labels, "max_length": length})
        return {**run.finish(), "checkpoint": str(path) if path else None}


# --- using a trained classifier -----------------------------------------------------------


class Classifier:
    """A trained classifier: `predict(texts) -> labels`, `probabilities(texts) -> [N, classes]`."""

    def __init__(self, objective: SequenceClassifier, tokenizer, labels: list, length: int):
        self.objective, self.tokenizer, self.labels, self.length = objective.eval(), tokenizer, labels, length

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """[N, classes] class probabilities, columns in the order of `labels`."""
        model = self.objective.model
        device = next(self.objective.parameters()).device
        rows = [text_ids(model, self.tokenizer, t, self.length)[0] for t in texts]
        if any(not r for r in rows):
            raise InputError("an empty text has no tokens to classify; drop empty texts")
        out = []
        for s in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_rows(rows[s : s + batch_size]).items()}
            out.append(self.objective.logits(batch).float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list:
        return [self.labels[k] for k in self.probabilities(texts, batch_size).argmax(-1).tolist()]


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """The classifier in a `--task classify` checkpoint (a model or adapter directory with its head)."""
    from lmstack.models.checkpoint import load_for_text

    p = Path(path)
    meta = saved_task(p, "classify")
    if not meta or not (p / OBJECTIVE_FILE).is_file():
        raise CheckpointError(
            f'{p}: not a classifier checkpoint (no "classify" labels in trainer_state.json or no '
            f"{OBJECTIVE_FILE}); pass a checkpoint of `lmstack finetune --task classify`"
        )
    model, tok = load_for_text(p, device)
    objective = SequenceClassifier(model, len(meta["labels"]))
    head = {k: v for k, v in load_file(str(p / OBJECTIVE_FILE)).items() if k.startswith("head.")}
    try:
        objective.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    except RuntimeError as e:
        raise CheckpointError(
            f"{p / OBJECTIVE_FILE}: the head does not fit {len(meta['labels'])} labels on this model ({str(e).splitlines()[0]})"
        ) from None
    return Classifier(objective.to(device), tok, meta["labels"], meta["max_length"])

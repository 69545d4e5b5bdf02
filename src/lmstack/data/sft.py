"""Fine-tuning data: files of examples, a held-out split, and batches with loss only where it belongs.

An example is `(ids, mask)`: token ids and, per token, whether the model learns to produce it.
Files `read_examples` takes:
- JSONL, one conversation per line, either `{"messages": [{"role", "content"}, ...]}` (multi-turn)
  or `{"prompt", "response"}` with an optional `"system"`; other keys ("id", "topic") are ignored,
  and "messages" wins when a row has both. Rows are rendered by `lmstack.data.chat.render` in the
  tokenizer's chat format; the mask covers the assistant replies and their end-of-turn tokens.
- plain text (.txt, .text, .md) for continued pretraining: the file's tokens (plus the end-of-text
  token) cut into chunks of `max_length`, with loss on every token.

A conversation longer than `max_length` keeps its first `max_length` tokens (counted as truncated);
one left with no token to learn is skipped (counted as dropped). The report says how many of each.

Batches (`SFTBatches`) follow the pretraining rule (see data.batches): micro-batch `index` of step
`step` is a pure function of (seed, step, index), so a run is reproducible from its seed, resumes
from the step alone, and N processes see the rows one process with accumulation would. Examples
are laid out once into rows: with `pack`, several per row of `max_length` tokens (best fit,
longest first; an example is never split), else one per row. Each epoch visits every row once,
in an order drawn from (seed, epoch). A batch holds
- `idx` [B, T]: the tokens, `pad_id` after the last document of a row;
- `targets` [B, T]: at position t the next token where the mask marks it and it belongs to the
  same document, else -100 (so no loss crosses a document boundary or lands on padding);
- `segments` [B, T]: the document of each token, 1, 2, ... within a row, 0 on padding. The GPT uses
  it to keep attention inside a document and restart positions, so packing does not change the loss.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lmstack.data.chat import render
from lmstack.errors import InputError
from lmstack.io import check_readable, iter_lines, read_text
from lmstack.tokenizers.base import Tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md")
IGNORE = -100


class Example(NamedTuple):
    ids: np.ndarray  # int64 token ids
    mask: np.ndarray  # bool, True where the model learns to produce the token

    @property
    def targets(self) -> int:
        """Tokens with a loss (the first token has nothing before it to predict it from)."""
        return int(self.mask[1:].sum())


@dataclass
class ReadReport:
    """What `read_examples` did with a file, for the run's log."""

    path: str
    max_length: int
    rows: int = 0  # conversations (JSONL lines) or chunks (text) read
    truncated: int = 0  # longer than max_length, cut to their start
    dropped: int = 0  # left with no token to learn after the cut, skipped
    tokens: int = 0  # tokens of the kept examples
    target_tokens: int = 0  # of those, tokens with a loss

    def __str__(self) -> str:
        kept = self.rows - self.dropped
        return (
            f"{self.path}: {kept} examples of {self.rows} rows, {self.tokens} tokens ({self.target_tokens} trained on); "
            f"{self.truncated} cut to {self.max_length} tokens, {self.dropped} dropped (no reply left after the cut)"
        )


def read_examples(path: str | os.PathLike, tokenizer: Tokenizer, max_length: int) -> tuple[list[Example], ReadReport]:
    """Examples of a JSONL chat file or a plain text file (see the module docstring), and a report."""
    if max_length < 2:
        raise InputError(f"max_length must be at least 2 tokens (one to read, one to learn), got {max_length}")
    p = check_readable(path)
    report = ReadReport(str(p), max_length)
    if p.suffix.lower() == ".jsonl":
        examples = _read_jsonl(p, tokenizer, report)
    elif p.suffix.lower() in TEXT_SUFFIXES:
        examples = _read_text(p, tokenizer, report)
    else:
        raise InputError(f"{p}: unknown data format {p.suffix!r}; pass a .jsonl file of conversations or a .txt file")
    if not report.rows:
        raise InputError(f"{p}: holds no examples (only blank lines); pass a file with one conversation per line")
    if not examples:
        raise InputError(f"{p}: no usable example (every row lost its reply to the {max_length}-token cut); raise max_length")
    report.tokens = sum(len(e.ids) for e in examples)
    report.target_tokens = sum(e.targets for e in examples)
    return examples, report


def row_messages(row, where: str) -> list[dict]:
    """The conversation of one JSONL row: its "messages", or its prompt/response (and system)."""
    if not isinstance(row, dict):
        raise InputError(
            f'{where}: not a JSON object; each line must be {{"messages": [...]}} or {{"prompt": ..., "response": ...}}'
        )
    if "messages" in row:
        return row["messages"]
    if not (isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
        raise InputError(f'{where}: needs "messages", or string "prompt" and "response" fields (found {sorted(row)})')
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise InputError(f'{where}: "system" must be a string')
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _read_jsonl(p: Path, tokenizer: Tokenizer, report: ReadReport) -> list[Example]:
    examples = []
    for lineno, line in enumerate(iter_lines(p), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        messages = row_messages(row, where)
        try:
            ids, mask = render(tokenizer, messages)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if not any(mask[1:]):
            raise InputError(f'{where}: no assistant reply, so nothing to learn; add an assistant message (or a "response")')
        report.rows += 1
        if len(ids) > report.max_length:
            report.truncated += 1
            ids, mask = ids[: report.max_length], mask[: report.max_length]
            if not any(mask[1:]):
                report.dropped += 1
                continue
        examples.append(Example(np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)))
    return examples


def _read_text(p: Path, tokenizer: Tokenizer, report: ReadReport) -> list[Example]:
    ids = tokenizer.encode_ordinary(read_text(p))
    if tokenizer.eot_id is not None:
        ids.append(tokenizer.eot_id)
    ids = np.array(ids, dtype=np.int64)
    chunks = [ids[i : i + report.max_length] for i in range(0, len(ids), report.max_length)]
    chunks = [c for c in chunks if len(c) >= 2]  # a lone last token has nothing to learn
    report.rows = len(chunks)
    return [Example(c, np.ones(len(c), dtype=bool)) for c in chunks]


def split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random `val_fraction` of the examples held out (at least one when the
    fraction is above 0), both in file order."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(examples):
        raise InputError(
            f"{len(examples)} examples are too few to hold out {val_fraction:.0%} for validation; "
            "lower the validation fraction or add data"
        )
    held = np.zeros(len(examples), dtype=bool)
    held[np.random.default_rng([seed, 1]).permutation(len(examples))[:n_val]] = True
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row: best fit, longest first (each example goes to the fullest row it
    still fits in), a greedy packing that wastes little and never splits an example."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free slots, row), sorted: rows that can still take an example
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([])
            space, row = capacity, len(rows) - 1
        else:
            space, row = free.pop(k)
        rows[row].append(i)
        if space - lengths[i] >= 2:
            bisect.insort(free, (space - lengths[i], row))
    return rows


def collate(rows: Sequence[Sequence[Example]], width: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch of `rows`, each a list of examples laid end to end in a row of `width` tokens."""
    idx = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    for r, docs in enumerate(rows):
        start = 0
        for doc, (ids, mask) in enumerate(docs, 1):
            end = start + len(ids)
            idx[r, start:end] = ids
            segments[r, start:end] = doc
            targets[r, start : end - 1] = np.where(mask[1:], ids[1:], IGNORE)
            start = end
    return {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(targets), "segments": torch.from_numpy(segments)}


@dataclass
class SFTBatches:
    """Micro-batches of examples, a pure function of (seed, step, index); see the module docstring."""

    examples: Sequence[Example]
    batch_size: int  # rows per micro-batch
    max_length: int  # tokens per row when packing; the longest example allowed
    seed: int = 0
    pack: bool = True
    pad_id: int = 0  # any id: padding has segment 0 and no target
    rows_per_step: int | None = None  # the global batch, in rows (default: one micro-batch)
    rows: list[list[int]] = field(init=False)  # example indices of each row

    def __post_init__(self):
        self.rows_per_step = self.rows_per_step or self.batch_size
        if self.batch_size < 1 or self.rows_per_step % self.batch_size:
            raise InputError(f"the global batch ({self.rows_per_step} rows) is not a multiple of --batch-size {self.batch_size}")
        if not self.examples:
            raise InputError("no fine-tuning examples; check the data file")
        for n, e in enumerate(self.examples):
            if len(e.ids) > self.max_length:
                raise InputError(
                    f"example {n} has {len(e.ids)} tokens, more than max_length {self.max_length}; "
                    "read it with read_examples, which cuts long examples"
                )
            if e.targets == 0:
                raise InputError(f"example {n} has no token to learn (its mask is empty after the first token); drop it")
        lengths = [len(e.ids) for e in self.examples]
        self.rows = pack_rows(lengths, self.max_length) if self.pack else [[i] for i in range(len(lengths))]

    @property
    def micro_batches_per_step(self) -> int:
        return self.rows_per_step // self.batch_size

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps to see every example once (the last one may run into the next epoch)."""
        return math.ceil(self.rows_per_epoch / self.rows_per_step)

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step * self.rows_per_step / self.rows_per_epoch

    @property
    def fill(self) -> float:
        """Share of the row slots that hold tokens (1.0: no padding), counting rows of max_length."""
        return sum(len(e.ids) for e in self.examples) / (self.rows_per_epoch * self.max_length)

    def make(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` (= micro-step × world size + rank) of global batch `step`."""
        if not 0 <= index < self.micro_batches_per_step:
            raise ValueError(f"micro-batch index {index} outside 0..{self.micro_batches_per_step - 1}")
        first = step * self.rows_per_step + index * self.batch_size
        orders: dict[int, np.ndarray] = {}
        rows = []
        for g in range(first, first + self.batch_size):
            epoch, pos = divmod(g, self.rows_per_epoch)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows_per_epoch)
            rows.append([self.examples[i] for i in self.rows[orders[epoch][pos]]])
        width = self.max_length if self.pack else max(len(row[0].ids) for row in rows)
        return collate(rows, width, self.pad_id)

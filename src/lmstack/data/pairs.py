"""Preference pairs: a prompt and two responses, one preferred, for reward models and DPO.

A file is JSONL, one `{"prompt", "chosen", "rejected"}` object per line (other keys are ignored).
`prompt` is a string or a list of chat messages ending in a user turn. A string in Anthropic's
hh-rlhf format (`"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"`) is a
transcript: it is split into its turns (Human -> user, Assistant -> assistant, each stripped), so
a multi-turn conversation reaches the model in its own chat format, not as text that imitates
one; any other string is one user message. `chosen` and `rejected` are the assistant's next
reply (stripped of the space hh-rlhf puts after "Assistant:").

Encoding (`encode_pair`). For a causal model the prompt is `chat.prompt_ids(messages)` (ending in
an open assistant turn) and a response is the rest of `chat.render(messages + [reply])` through
the reply's end-of-turn token, so the model learns to end its reply. For an encoder (a BERT
reward model) the row is `[CLS] prompt text [SEP] reply [SEP]` with the turns written as
"User: ..." / "Assistant: ..." lines. A prompt longer than `max_prompt_length` keeps its end
(the last turns, which the reply answers); a prompt that leaves no room for a reply in
`max_length` is an error naming the row; responses are cut to fit `max_length`. Both counts go
to the report.

Bad rows (not JSON, a missing or empty side, a prompt that is not a string or a conversation)
are errors naming `file:line`, or, with `skip_bad=True`, skipped and counted (hh-rlhf's test
split has four rows with an empty response).

Batches (`PairBatches`) put a micro-batch's chosen rows first and its rejected rows after them,
right-padded, in the layout of `data.sft.collate` (`idx`, `targets` on the response tokens only,
`segments` 1 on real tokens); micro-batch `index` of step `step` is a pure function of
(seed, step, index), as for every other recipe's batches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from lmstack.data.chat import check_messages, prompt_ids, render
from lmstack.data.sft import Example, collate
from lmstack.errors import InputError
from lmstack.io import check_readable, iter_lines

EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class PairRow(NamedTuple):
    messages: list[dict]  # the conversation so far, ending in a user turn
    chosen: str
    rejected: str
    where: str  # file:line


class Pair(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str


@dataclass
class PairReport:
    path: str
    rows: int = 0
    skipped: int = 0  # bad rows, with skip_bad
    first_skipped: str = ""  # the first skipped row's error
    prompts_cut: int = 0  # kept their end to fit max_prompt_length
    responses_cut: int = 0  # pairs with a response cut to fit max_length

    def __str__(self) -> str:
        s = (
            f"{self.path}: {self.rows - self.skipped} pairs of {self.rows} rows; {self.prompts_cut} prompts cut to their "
            f"end, {self.responses_cut} pairs with a response cut"
        )
        return s + (f"; {self.skipped} bad rows skipped (first: {self.first_skipped})" if self.skipped else "")


def hh_messages(prompt: str) -> list[dict] | None:
    """The turns of an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant:"), or None if `prompt` is not one.
    The final, empty "Assistant:" (where the reply goes) is dropped."""
    parts = _HH_TURN.split(prompt)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def prompt_messages(prompt, where: str) -> list[dict]:
    """A row's prompt as a conversation that ends in a user turn."""
    if isinstance(prompt, str):
        messages = hh_messages(prompt) or [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        try:
            messages = check_messages(prompt)
        except InputError as e:
            raise InputError(f'{where}: "prompt": {e}') from None
    else:
        raise InputError(f'{where}: "prompt" must be a string or a list of chat messages, got {type(prompt).__name__}')
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InputError(f"{where}: the prompt must end in a non-empty user turn (the responses answer it)")
    return messages


def parse_row(line: str, where: str) -> PairRow:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}); each line must be one object such as {EXAMPLE}") from None
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or k not in row]
    if missing:
        raise InputError(f"{where}: no {' or '.join(map(repr, missing))} field; each line must be an object such as {EXAMPLE}")
    for side in ("chosen", "rejected"):
        if not isinstance(row[side], str) or not row[side].strip():
            raise InputError(
                f'{where}: "{side}" is {"empty" if isinstance(row[side], str) else "not a string"}; a '
                "preference needs two non-empty responses (fix or drop the row; --skip-bad-pairs skips such rows)"
            )
    return PairRow(prompt_messages(row["prompt"], where), row["chosen"].strip(), row["rejected"].strip(), where)


def read_pair_rows(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[PairRow], PairReport]:
    """The rows of a JSONL file of preference pairs, and a report (rows read, bad rows skipped)."""
    p = check_readable(path)
    if p.suffix.lower() != ".jsonl":
        raise InputError(f"{p}: preference pairs are JSONL rows such as {EXAMPLE}; convert the file to .jsonl")
    report, rows = PairReport(str(p)), []
    for lineno, line in enumerate(iter_lines(p), 1):
        if not line.strip():
            continue
        report.rows += 1
        try:
            rows.append(parse_row(line, f"{p}:{lineno}"))
        except InputError as e:
            if not skip_bad:
                raise
            report.skipped += 1
            report.first_skipped = report.first_skipped or str(e)
    if not rows:
        raise InputError(f"{p}: holds no usable pair; pass rows such as {EXAMPLE}")
    return rows, report


# --- rows to token ids ----------------------------------------------------------------------


def _chat_reply(tokenizer, messages: list[dict], prompt: list[int], reply: str, where: str) -> list[int]:
    """The ids of `reply` as the assistant's turn after `messages`, through its end-of-turn token."""
    ids, mask = render(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    if ids[: len(prompt)] != prompt or not any(mask[len(prompt) :]):
        raise InputError(
            f"{where}: the chat template does not render the reply as a continuation of the prompt; "
            "use a template whose conversations extend their prefixes"
        )
    return ids[len(prompt) : len(mask) - mask[::-1].index(True)]


def plain_prompt(messages: list[dict]) -> str:
    """The conversation as text for an encoder: one "User: ..." / "Assistant: ..." / "System: ..." line per turn."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def encode_pair(
    tokenizer,
    row: PairRow,
    max_length: int,
    max_prompt_length: int = 0,
    frame: tuple[list[int], list[int]] | None = None,
    report: PairReport | None = None,
) -> Pair:
    """A row's ids (see the module docstring). `frame` = (ids before, ids after each part), e.g. BERT's
    ([CLS], [SEP]), selects the encoder layout; None the chat format of a causal model."""
    if frame is None:
        prompt = prompt_ids(tokenizer, row.messages)
        sides = [_chat_reply(tokenizer, row.messages, prompt, r, row.where) for r in (row.chosen, row.rejected)]
        head, tail = [], []
    else:
        (head, tail), prompt = frame, tokenizer.encode_ordinary(plain_prompt(row.messages))
        sides = [tokenizer.encode_ordinary(r) + tail for r in (row.chosen, row.rejected)]
    if max_prompt_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        if report is not None:
            report.prompts_cut += 1
    prompt = head + prompt + tail
    room = max_length - len(prompt)
    if room < 1:
        raise InputError(
            f"{row.where}: the prompt has {len(prompt)} tokens, leaving no room for a response in "
            f"--max-length {max_length}; pass --max-prompt-length N (keeps the last N tokens of each prompt) "
            "or raise --max-length"
        )
    if report is not None:
        report.responses_cut += any(len(s) > room for s in sides)
    return Pair(prompt, sides[0][:room], sides[1][:room], row.where)


def read_pairs(
    path,
    tokenizer,
    max_length: int,
    max_prompt_length: int = 0,
    skip_bad: bool = False,
    frame: tuple[list[int], list[int]] | None = None,
) -> tuple[list[Pair], PairReport]:
    """The pairs of a file as token ids (`encode_pair`), and a report."""
    rows, report = read_pair_rows(path, skip_bad)
    return [encode_pair(tokenizer, r, max_length, max_prompt_length, frame, report) for r in rows], report


# --- batches --------------------------------------------------------------------------------


def pair_examples(pair: Pair) -> tuple[Example, Example]:
    """The chosen and rejected rows of a pair, with the response tokens marked as targets."""

    def row(response):
        ids = np.array(pair.prompt + response, dtype=np.int64)
        return Example(ids, np.arange(len(ids)) >= len(pair.prompt))

    return row(pair.chosen), row(pair.rejected)


def collate_pairs(
    pairs: Sequence[Pair], extras: dict[str, torch.Tensor] | None = None, picked: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """A batch of 2B rows, the B chosen first; `extras` are per-pair tensors (e.g. reference
    log-probs), indexed by `picked` (the pairs' indices) into the batch."""
    rows = [pair_examples(p) for p in pairs]
    examples = [[c] for c, _ in rows] + [[r] for _, r in rows]
    batch = collate(examples, max(len(e[0].ids) for e in examples))
    for name, values in (extras or {}).items():
        batch[name] = values[torch.as_tensor(list(picked))]
    return batch


@dataclass
class PairBatches:
    """Micro-batches of pairs: `make(step, index)` is a pure function of (seed, step, index), each
    epoch visiting every pair once in an order drawn from (seed, epoch)."""

    pairs: Sequence[Pair]
    batch_size: int  # pairs per micro-batch (2 × batch_size rows)
    seed: int
    rows_per_step: int  # pairs per optimizer step, all processes and micro-batches
    extras: dict[str, torch.Tensor] | None = None

    def epoch(self, step: int) -> float:
        return step * self.rows_per_step / len(self.pairs)

    def make(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` (= micro-step × world size + rank) of global batch `step`."""
        first = step * self.rows_per_step + index * self.batch_size
        orders: dict[int, np.ndarray] = {}
        picked = []
        for g in range(first, first + self.batch_size):
            epoch, pos = divmod(g, len(self.pairs))
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
            picked.append(int(orders[epoch][pos]))
        return collate_pairs([self.pairs[i] for i in picked], self.extras, picked)

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        """Every pair once, in order, in micro-batches (held-out evaluation, reference log-probs)."""
        n = len(self.pairs)
        return [
            collate_pairs(self.pairs[i : i + self.batch_size], self.extras, range(i, min(i + self.batch_size, n)))
            for i in range(0, n, self.batch_size)
        ]

"""Perplexity and bits per byte of any language model on the contract, counted as KenLM counts.

Each line is scored as the sentence `<s> w1 .. wk </s>`: the k words and `</s>` count as tokens,
`<s>` is only context. Out-of-vocabulary words are scored (as `<unk>`) and counted separately,
so both KenLM figures come out: perplexity including OOVs and excluding them. Bits per byte
divide by the UTF-8 bytes of the text (newline included), which makes models with different
tokenizers comparable.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from lmstack.generation.engine import model_device
from lmstack.models.base import LanguageModel


@dataclass
class PerplexityResult:
    lines: int
    tokens: int
    oovs: int
    bytes: int
    log10_prob: float
    log10_prob_oovs: float

    @property
    def perplexity(self) -> float:
        return 10.0 ** (-self.log10_prob / self.tokens)

    @property
    def perplexity_excluding_oovs(self) -> float:
        n = self.tokens - self.oovs
        return 10.0 ** (-(self.log10_prob - self.log10_prob_oovs) / n) if n else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return -self.log10_prob * math.log2(10.0) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity,
                "perplexity_excluding_oovs": self.perplexity_excluding_oovs, "bits_per_byte": self.bits_per_byte}


def perplexity(
    model: LanguageModel,
    lines: Iterable[str],
    encode: Callable[[str], list[int]],
    bos: int,
    eos: int,
    unk: int | None = None,
    max_batch_tokens: int = 1 << 16,
    progress_bar=None,
) -> PerplexityResult:
    """Score every line (without its newline) of `lines` as `bos + encode(line) + eos`.

    Lines are batched up to `max_batch_tokens` padded tokens per `model.token_logprobs` call."""
    res = PerplexityResult(lines=0, tokens=0, oovs=0, bytes=0, log10_prob=0.0, log10_prob_oovs=0.0)
    batch: list[list[int]] = []
    width = 0
    device = model_device(model)

    def flush():
        nonlocal batch, width
        if not batch:
            return
        lengths = np.fromiter(map(len, batch), np.int64, len(batch))
        inside = np.arange(width)[None, :] < lengths[:, None]
        rows = np.full((len(batch), width), eos, np.int64)
        rows[inside] = np.fromiter(itertools.chain.from_iterable(batch), np.int64, int(lengths.sum()))
        with torch.no_grad():
            lp = model.token_logprobs(torch.from_numpy(rows).to(device)).double().cpu().numpy() / math.log(10.0)
        target = rows[:, 1:]
        real = inside[:, 1:]
        res.log10_prob += float(lp[real].sum())
        if unk is not None:
            res.log10_prob_oovs += float(lp[real & (target == unk)].sum())
        if progress_bar is not None:
            progress_bar.update(len(batch))
        batch, width = [], 0

    for line in lines:
        line = line[:-1] if line.endswith("\n") else line
        ids = encode(line)
        res.lines += 1
        res.tokens += len(ids) + 1
        res.bytes += len(line.encode("utf-8")) + 1
        if unk is not None:
            res.oovs += sum(1 for i in ids if i == unk)
        seq = [bos, *ids, eos]
        if batch and max(width, len(seq)) * (len(batch) + 1) > max_batch_tokens:
            flush()
        batch.append(seq)
        width = max(width, len(seq))
    flush()
    return res

"""Batched and streaming generation on the model contract, run by the scheduler.

Every prompt becomes a request of the `Scheduler` (`generation.scheduler`): prompts of different
lengths are read in one left-padded `start`, all rows generate from the first step, a row that has
finished leaves the batch (or, in a family without `reorder`, keeps being fed its last token with
its output frozen), and `generate_groups` forks each prompt's state into its samples. An
encoder-decoder (T5) takes the same `start`, reading the prompts as its sources.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmstack.errors import InputError
from lmstack.generation.config import GenerationConfig
from lmstack.generation.scheduler import Scheduler, _Row, cap_to_context, check_generative, model_device
from lmstack.progress import progress

__all__ = [
    "Generation",
    "cap_to_context",
    "check_generative",
    "decode_steps",
    "encode_prompt",
    "generate",
    "generate_groups",
    "generate_tokens",
    "keep_end",
    "model_device",
    "stream",
]


@dataclass
class Generation:
    tokens: list[int]  # the new tokens (a final <|endoftext|> is not included)
    text: str | None  # their text, cut before a stop string; None without a tokenizer
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length" (max_new_tokens or the context)
    logprob: float  # sum of the model's log p of the new tokens (before any transform)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids: the text framed as the model expects an input when its tokenizer says how
    (`prompt_ids`: an n-gram's <s> before a line, an imported Llama 2's <s>, the </s> after a T5
    source); an empty prompt otherwise starts from <|endoftext|>, the usual document boundary."""
    framed = getattr(tokenizer, "prompt_ids", None)
    ids = framed(text) if framed is not None else tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise InputError("the prompt is empty and the tokenizer has no <|endoftext|> to start from; give a prompt")
    return [tokenizer.eot_id]


def keep_end(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The end of a prompt that leaves room for `max_new_tokens` in the model's context (all of
    it for a model without a limit): how lm-evaluation-harness cuts a few-shot prompt, which loses
    its first examples rather than its question."""
    limit = getattr(model, "max_context", None)
    if limit is None:
        return ids
    if max_new_tokens >= limit:
        raise InputError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {limit} tokens; lower it"
        )
    return ids[-(limit - max_new_tokens) :]


def _per_row(config: GenerationConfig | Sequence[GenerationConfig] | None, n: int) -> list[GenerationConfig]:
    if config is None:
        return [GenerationConfig()] * n
    if isinstance(config, GenerationConfig):
        return [config] * n
    configs = list(config)
    if len(configs) != n:
        raise InputError(f"got {len(configs)} generation configs for {n} prompts; pass one, or one per prompt")
    return configs


def _result(row: _Row) -> Generation:
    text = row.text if row.detok is not None else None
    return Generation(row.tokens, text, row.finish_reason or "length", row.logprob)


def decode_steps(
    model, prompts: list[list[int]], configs: list[GenerationConfig], tokenizer=None, fork: int = 1
) -> Iterator[list[_Row]]:
    """Run the batch on a scheduler, yielding its rows after every step (the batch APIs share
    this). With `fork` > 1 the rows are each prompt `fork` times in a row (`configs` has one per
    row): a prompt is read once and its decoding state copied through the contract's `reorder`."""
    scheduler = Scheduler(model, tokenizer, max_batch=max(1, len(configs)))
    requests = [scheduler._submit(p, configs[i * fork : (i + 1) * fork], fork) for i, p in enumerate(prompts)]
    rows = [row for r in requests for row in r.rows]
    if not rows:
        yield rows
    while scheduler.busy:
        scheduler.step()
        yield rows


def generate_tokens(
    model, prompts: list[list[int]], config=None, tokenizer=None, show_progress: bool = False
) -> list[Generation]:
    """Generate from token-id prompts; `config` is one GenerationConfig for all rows or one per row.
    `show_progress`: a progress bar of decoding steps (on a terminal)."""
    configs = _per_row(config, len(prompts))
    rows: list[_Row] = []
    steps = max((c.max_new_tokens for c in configs), default=0)
    bar = progress(total=steps, desc="decoding", unit="step") if show_progress else None
    for rows in decode_steps(model, prompts, configs, tokenizer):  # noqa: B007 (the last rows are the result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [_result(r) for r in rows]


def generate_groups(model, prompts: list[list[int]], n: int, config=None, tokenizer=None) -> list[list[Generation]]:
    """`n` samples of each token-id prompt (an RL group): each prompt is read once and its decoding
    state forked n ways through the contract's `reorder`, instead of being read n times. `config`:
    one GenerationConfig for every sample, or one per sample (len(prompts) * n, grouped by prompt;
    give each its own seed, or n sampled copies of one seeded config draw the same tokens)."""
    if n < 1:
        raise InputError(f"samples per prompt must be >= 1, got {n}")
    configs = _per_row(config, len(prompts) * n)
    *_, rows = decode_steps(model, prompts, configs, tokenizer, fork=n)  # the rows after the last step
    results = [_result(r) for r in rows]
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def generate(model, tokenizer, prompts: list[str], config=None, show_progress: bool = False) -> list[Generation]:
    """Generate from text prompts (a batch; `config` is shared or one per prompt)."""
    if isinstance(prompts, str):
        raise InputError("generate takes a list of prompts; wrap a single prompt in a list")
    return generate_tokens(model, [encode_prompt(tokenizer, p) for p in prompts], config, tokenizer, show_progress)


def stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is decoded: whole characters only, and
    nothing of a stop string."""
    scheduler = Scheduler(model, tokenizer, max_batch=1)
    scheduler.add(encode_prompt(tokenizer, prompt), _per_row(config, 1)[0])
    while scheduler.busy:
        for event in scheduler.step():
            if event.text:
                yield event.text

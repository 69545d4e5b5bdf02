"""Batched generation on the model contract: one `start`, then one `step` per token, for every family.

All rows advance in lockstep through one decoding state, so the prefix is never recomputed.
Prompts of different lengths are left-padded into one `start` (the contract's `lengths`), so every
prompt is read in one pass and all rows generate from the first step. A row that has finished
keeps being fed its last token until the whole batch is done; its output is frozen. An
encoder-decoder (T5) takes the same `start`, reading the prompts as its sources.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmstack.errors import InputError
from lmstack.generation.config import GenerationConfig
from lmstack.generation.detok import StreamDecoder
from lmstack.generation.processors import Sampler
from lmstack.progress import progress


@dataclass
class Generation:
    tokens: list[int]  # the new tokens (a final <|endoftext|> is not included)
    text: str | None  # their text, cut before a stop string; None without a tokenizer
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length" (max_new_tokens or the context)
    logprob: float  # sum of the model's log p of the new tokens (before any transform)


def model_device(model) -> torch.device:
    """Where the model's weights live (CPU for families without parameters, like the n-gram)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


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


def check_generative(model) -> None:
    """Generation needs the contract's incremental view (`start`, `step`), which a masked LM lacks."""
    if not (hasattr(model, "start") and hasattr(model, "step")):
        raise InputError(f"a {getattr(model, 'family', type(model).__name__)} model does not generate text left to right "
                         "(it has no start/step decoding); score it with `lmstack eval perplexity` (pseudo-perplexity "
                         "for a masked LM), or generate with a causal model (n-gram, RNN, GPT) or T5")


def keep_end(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The end of a prompt that leaves room for `max_new_tokens` in the model's context (all of
    it for a model without a limit): how lm-evaluation-harness cuts a few-shot prompt, which loses
    its first examples rather than its question."""
    limit = getattr(model, "max_context", None)
    if limit is None:
        return ids
    if max_new_tokens >= limit:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{limit} tokens; lower it")
    return ids[-(limit - max_new_tokens) :]


def cap_to_context(model, prompt_length: int, max_new_tokens: int) -> int:
    """How many tokens fit after a prompt of `prompt_length`: `max_new_tokens`, or less where the
    model's context ends first, which a Python warning says (one per message and place, so a batch
    or a run of calls with the same settings warns once); the output then ends with "length"."""
    limit = getattr(model, "max_context", None)
    if limit is None or prompt_length + max_new_tokens <= limit:
        return max_new_tokens
    warnings.warn(f"max_new_tokens={max_new_tokens} goes past the model's context of {limit} tokens: generation "
                  f"stops when prompt + output reach {limit} (finish_reason 'length'); ask for fewer tokens "
                  "or use a model with a longer context", stacklevel=3)
    return max(0, limit - prompt_length)


class _Row:
    """One sequence being generated: its tokens, text and whether (and why) it has stopped."""

    def __init__(self, prompt: list[int], config: GenerationConfig, budget: int, tokenizer):
        self.prompt, self.config, self.budget = prompt, config, budget
        self.eot = tokenizer.eot_id if tokenizer is not None and config.stop_at_eot else None
        self.detok = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""
        self.logprob = 0.0
        self.streamed = 0  # characters already handed to a stream
        self.finish_reason: str | None = None if budget > 0 else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float) -> None:
        if token == self.eot:
            return self._finish("stop")
        self.tokens.append(token)
        self.logprob += logprob
        if self.detok is not None:
            old = len(self.text)
            self.text += self.detok.push(token)
            if self._cut_at_stop(old):
                self.finish_reason = "stop"
                return
        if len(self.tokens) >= self.budget:
            self._finish("length")

    def _cut_at_stop(self, old: int) -> bool:
        hits = [i for s in self.config.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.detok is not None:
            self.text += self.detok.flush()

    def take_text(self) -> str:
        """Text not yet streamed, holding back a tail that could still become a stop string."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.config.stop), default=0)
        end = max(self.streamed, len(self.text) - hold)
        piece, self.streamed = self.text[self.streamed : end], end
        return piece

    def last_token(self) -> int:
        return self.tokens[-1] if self.tokens else self.prompt[-1]

    def result(self) -> Generation:
        text = self.text if self.detok is not None else None
        return Generation(self.tokens, text, self.finish_reason or "length", self.logprob)


def _per_row(config: GenerationConfig | Sequence[GenerationConfig] | None, n: int) -> list[GenerationConfig]:
    if config is None:
        return [GenerationConfig()] * n
    if isinstance(config, GenerationConfig):
        return [config] * n
    configs = list(config)
    if len(configs) != n:
        raise InputError(f"got {len(configs)} generation configs for {n} prompts; pass one, or one per prompt")
    return configs


def decode_steps(model, prompts: list[list[int]], configs: list[GenerationConfig], tokenizer=None,
                 fork: int = 1) -> Iterator[list[_Row]]:
    """Run the batch, yielding its rows after every step (the streaming and batch APIs share this).
    With `fork` > 1 the rows are each prompt `fork` times in a row (`configs` has one per row): a
    prompt is read once and its decoding state copied through the contract's `reorder`."""
    check_generative(model)
    start_prompts, prompts = prompts, [p for p in prompts for _ in range(fork)]
    if any(not p for p in prompts):
        raise InputError("every prompt needs at least one token (e.g. <|endoftext|>)")
    if tokenizer is None and any(c.stop for c in configs):
        raise InputError("stop strings need a tokenizer to decode the output; pass one or drop the stop strings")
    rows = []
    limit = getattr(model, "max_context", None)
    for prompt, config in zip(prompts, configs):
        if limit is not None:
            model.check_context(len(prompt))
        rows.append(_Row(prompt, config, cap_to_context(model, len(prompt), config.max_new_tokens), tokenizer))
    if not rows or all(r.done for r in rows):
        yield rows
        return
    device = model_device(model)
    sampler = Sampler(configs, prompts, model.vocab_size, device)
    state, logprobs = _start_forked(model, start_prompts, fork, device)
    while True:
        active = [i for i, r in enumerate(rows) if not r.done]
        chosen = sampler.choose(logprobs, active)
        scores = logprobs[active, list(chosen.values())].tolist() if active else []
        for (i, token), score in zip(chosen.items(), scores):
            rows[i].add(token, score)
        sampler.observe(chosen)
        yield rows
        if all(r.done for r in rows):
            return
        feed = torch.tensor([r.last_token() for r in rows], device=device)
        with torch.inference_mode():
            state, logprobs = model.step(state, feed)


def _start(model, prompts: list[list[int]], device):
    """Read every prompt in one pass (left-padded when their lengths differ): (state, [B, V] log-probs)."""
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    # inference_mode around each model call, not a loop: a generator must not leak it into the caller.
    with torch.inference_mode():
        if all(len(p) == width for p in prompts):
            return model.start(padded)
        return model.start(padded, torch.tensor([len(p) for p in prompts], device=device))


def _start_forked(model, prompts: list[list[int]], fork: int, device):
    """The state of each prompt repeated `fork` times in a row, each prompt read once; a family
    without `reorder` reads the repeats (same result, more work)."""
    if fork == 1:
        return _start(model, prompts, device)
    index = torch.arange(len(prompts), device=device).repeat_interleave(fork)
    state, logprobs = _start(model, prompts, device)
    try:
        with torch.inference_mode():
            return model.reorder(state, index), logprobs[index]
    except NotImplementedError:
        return _start(model, [p for p in prompts for _ in range(fork)], device)


def _fits_context(model, prompts: list[list[int]], configs: list[GenerationConfig]) -> bool:
    """Whether the rows can decode in lockstep: left-padded, every row takes up the longest
    prompt's slots plus one per step, which must stay within the model's context for as long as
    any row is still generating."""
    limit = getattr(model, "max_context", None)
    if limit is None or not prompts:
        return True
    width = max(map(len, prompts))
    return all(width + min(c.max_new_tokens, limit - len(p)) <= limit + 1 for p, c in zip(prompts, configs))


def generate_tokens(model, prompts: list[list[int]], config=None, tokenizer=None,
                    show_progress: bool = False) -> list[Generation]:
    """Generate from token-id prompts; `config` is one GenerationConfig for all rows or one per row.
    `show_progress`: a progress bar of decoding steps (on a terminal)."""
    configs = _per_row(config, len(prompts))
    if not _fits_context(model, prompts, configs):  # near the context limit: each prompt length on its own
        results: dict[int, Generation] = {}
        for length in sorted({len(p) for p in prompts}):
            group = [i for i, p in enumerate(prompts) if len(p) == length]
            outs = generate_tokens(model, [prompts[i] for i in group], [configs[i] for i in group], tokenizer, show_progress)
            results.update(zip(group, outs))
        return [results[i] for i in range(len(prompts))]
    rows: list[_Row] = []
    steps = max((c.max_new_tokens for c in configs), default=0)
    bar = progress(total=steps, desc="decoding", unit="step") if show_progress else None
    for rows in decode_steps(model, prompts, configs, tokenizer):  # noqa: B007 (the last rows are the result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [r.result() for r in rows]


def generate_groups(model, prompts: list[list[int]], n: int, config=None, tokenizer=None) -> list[list[Generation]]:
    """`n` samples of each token-id prompt (an RL group): each prompt is read once and its decoding
    state forked n ways through the contract's `reorder`, instead of being read n times. `config`:
    one GenerationConfig for every sample, or one per sample (len(prompts) * n, grouped by prompt;
    give each its own seed, or n sampled copies of one seeded config draw the same tokens)."""
    if n < 1:
        raise InputError(f"samples per prompt must be >= 1, got {n}")
    configs = _per_row(config, len(prompts) * n)
    if not _fits_context(model, [p for p in prompts for _ in range(n)], configs):  # each prompt alone
        return [generate_groups(model, [p], n, configs[i * n : (i + 1) * n], tokenizer)[0] for i, p in enumerate(prompts)]
    *_, rows = decode_steps(model, prompts, configs, tokenizer, fork=n)  # the rows after the last step
    results = [r.result() for r in rows]
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def generate(model, tokenizer, prompts: list[str], config=None, show_progress: bool = False) -> list[Generation]:
    """Generate from text prompts (a batch; `config` is shared or one per prompt)."""
    if isinstance(prompts, str):
        raise InputError("generate takes a list of prompts; wrap a single prompt in a list")
    return generate_tokens(model, [encode_prompt(tokenizer, p) for p in prompts], config, tokenizer, show_progress)


def stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is decoded: whole characters only, and
    nothing of a stop string."""
    for rows in decode_steps(model, [encode_prompt(tokenizer, prompt)], _per_row(config, 1), tokenizer):
        piece = rows[0].take_text()
        if piece:
            yield piece

"""Next-token transforms and the sampler, vectorised over a batch whose rows have their own settings.

Each row's `GenerationConfig` becomes a column of a [B, 1] tensor, so one pass over the [B, V]
log-probabilities applies every row's penalties, temperature, top-k, top-p and min-p. Each sampled
row draws from its own seeded `torch.Generator`, so a row's output does not depend on what else
shares the batch.
"""

from __future__ import annotations

import torch

from lmstack.generation.config import GenerationConfig


def top_candidates(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """The tokens each row may still sample after top-k, then top-p, then min-p, best first:
    (logits [B, K] with -inf where a token is dropped, their token ids [B, K]). `x` is [B, V]
    logits already divided by the temperature; `top_k` [B, 1] holds V where it is off, `top_p` 1
    and `min_p` 0. K is the largest top_k, so top-k sampling never sorts the whole vocabulary. The
    most likely token always survives."""
    values, ids = x.topk(int(top_k.max()), dim=-1)
    drop = torch.arange(values.shape[-1], device=x.device) >= top_k
    probs = values.masked_fill(drop, float("-inf")).softmax(-1)  # renormalised over the top k
    mass_before = probs.cumsum(-1) - probs
    drop |= (mass_before >= top_p) & (top_p < 1)  # the nucleus already holds top_p without this token
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    return values.masked_fill(drop, float("-inf")), ids


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index from [N] probabilities by inverting the CDF with a single uniform draw, so a row's
    draws depend only on its own generator and distribution (not on padding with zeros)."""
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=generator, device=probs.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=len(probs) - 1))


class Sampler:
    """Chooses the next token of every row of a batch under that row's settings."""

    def __init__(self, configs: list[GenerationConfig], prompts: list[list[int]], vocab_size: int, device):
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        self.greedy = [c.greedy for c in configs]
        self.temperature = column([c.temperature if c.temperature > 0 else 1.0 for c in configs])
        self.top_k = column([c.top_k or vocab_size for c in configs], torch.long)
        self.top_p = column([c.top_p for c in configs])
        self.min_p = column([c.min_p for c in configs])
        self.filters = [bool(c.top_k or c.top_p < 1 or c.min_p > 0) for c in configs]
        self.repetition = column([c.repetition_penalty for c in configs])
        self.frequency = column([c.frequency_penalty for c in configs])
        self.presence = column([c.presence_penalty for c in configs])
        self.seen = self.counts = None
        if any(c.repetition_penalty != 1 for c in configs):
            self.seen = torch.zeros(len(configs), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, prompt] = True
        if any(c.frequency_penalty or c.presence_penalty for c in configs):
            self.counts = torch.zeros(len(configs), vocab_size, device=device)
        self.generators: list[torch.Generator | None] = []
        for c in configs:
            g = None
            if not c.greedy:
                g = torch.Generator(device=device)
                g.manual_seed(c.seed) if c.seed is not None else g.seed()
            self.generators.append(g)

    def select(self, rows: list[int]) -> "Sampler":
        """The sampler of rows `rows` only (a scheduler retiring finished rows): each keeps its
        settings, penalty counts and generator, so its draws go on as if nothing had left."""
        picked = object.__new__(Sampler)
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        for name, value in vars(self).items():
            if isinstance(value, list):
                value = [value[r] for r in rows]
            elif value is not None:
                value = value[index]
            setattr(picked, name, value)
        return picked

    @staticmethod
    def concat(samplers: list["Sampler"]) -> "Sampler":
        """One sampler for the rows of `samplers`, in order (a scheduler admitting new rows). A
        penalty table one of them lacks is zeros for its rows, which it never reads."""
        joined = object.__new__(Sampler)
        for name, value in vars(samplers[0]).items():
            parts = [vars(s)[name] for s in samplers]
            if isinstance(value, list):
                value = [x for part in parts for x in part]
            else:
                table = next((t for t in parts if t is not None), None)
                value = (
                    None
                    if table is None
                    else torch.cat(
                        [t if t is not None else table.new_zeros(len(s.greedy), table.shape[1]) for t, s in zip(parts, samplers)]
                    )
                )
            setattr(joined, name, value)
        return joined

    def penalise(self, logprobs: torch.Tensor) -> torch.Tensor:
        x = logprobs
        if self.seen is not None:
            x = torch.where(self.seen, x * self.repetition, x)
        if self.counts is not None:
            x = x - self.counts * self.frequency - (self.counts > 0) * self.presence
        return x

    def choose(self, logprobs: torch.Tensor, rows: list[int]) -> dict[int, int]:
        """Next token of each row in `rows`, given the model's [B, V] log-probs for all rows."""
        x = self.penalise(logprobs)
        picks = x.argmax(-1).tolist()  # what the greedy rows take
        sampled = [r for r in rows if not self.greedy[r]]
        if not sampled:
            return {r: picks[r] for r in rows}
        # Each row draws from its own distribution: rows with top-k/top-p/min-p among their sorted
        # candidates, the others over the whole vocabulary in id order.
        draws: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for filtered in (False, True):
            group = [r for r in sampled if self.filters[r] == filtered]
            if not group:
                continue
            index = torch.tensor(group, device=x.device)
            logits, ids = x[index] / self.temperature[index], None
            if filtered:
                logits, ids = top_candidates(logits, self.top_k[index], self.top_p[index], self.min_p[index])
            for j, (r, probs) in enumerate(zip(group, logits.softmax(-1))):
                draws[r] = (probs, None if ids is None else ids[j])
        for r, (probs, ids) in draws.items():
            k = _draw(probs, self.generators[r])
            picks[r] = k if ids is None else int(ids[k])
        return {r: picks[r] for r in rows}

    def observe(self, chosen: dict[int, int]) -> None:
        """Record the tokens just generated, for the penalties."""
        if not chosen:
            return
        rows, tokens = list(chosen), list(chosen.values())
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

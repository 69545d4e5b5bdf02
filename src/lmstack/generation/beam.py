"""Beam search with a length penalty, on the model contract.

Keeps the `num_beams` best partial sequences by total log-probability. A sequence that ends in
end-of-text is finished and scored logprob / length^length_penalty (length counts its new tokens,
the end-of-text included; 0 ranks by raw log-probability, > 0 favours longer outputs). The search
stops once `num_beams` sequences are finished and no running beam scores better at its current
length (Hugging Face's default stopping rule), or after `max_new_tokens`, when the running beams
join the finished ones.

After each step the decoding state must follow the surviving beams. A family that implements
`reorder(state, index)` keeps its cache; for the others the beams are restarted from their tokens,
which is correct but recomputes the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import InputError
from lmstack.generation.config import check_finite
from lmstack.generation.engine import cap_to_context, check_generative, model_device
from lmstack.models.base import LanguageModel


@dataclass
class Beam:
    tokens: list[int]  # new tokens (a final end-of-text is not included)
    logprob: float  # total log p of the new tokens, end-of-text included
    score: float  # logprob / length^length_penalty, what beams are ranked by
    finished: bool  # ended in end-of-text (False: stopped by max_new_tokens or the context)


def _follow(model, state, index: list[int], tokens: list[int], sequences: list[list[int]], device):
    """Advance the state of the beams `index` by `tokens`; `sequences` are their full token lists."""
    with torch.inference_mode():
        try:
            state = model.reorder(state, torch.tensor(index, device=device))
        except NotImplementedError:
            return model.start(torch.tensor(sequences, device=device))
        return model.step(state, torch.tensor(tokens, device=device))


def check_beam_settings(num_beams: int, n: int = 1, length_penalty: float = 1.0) -> None:
    """The checks `beam_search` makes, for a caller that wants them before loading a model."""
    if num_beams < 1 or not 1 <= n <= num_beams:
        raise InputError(
            f"need num_beams >= 1 (--beams; 1 turns beam search off) and 1 <= n <= num_beams (--num-return); "
            f"got num_beams={num_beams}, n={n}"
        )
    check_finite("length_penalty", length_penalty)


def beam_search(
    model,
    prompt: list[int],
    num_beams: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    n: int = 1,
    eos_id: int | None = None,
) -> list[Beam]:
    """The `n` best continuations of `prompt` (ids), best first."""
    check_beam_settings(num_beams, n, length_penalty)
    if not prompt:
        raise InputError("beam search needs a prompt of at least one token (e.g. <|endoftext|>)")
    check_generative(model)
    if not isinstance(model, LanguageModel) and not hasattr(model, "reorder"):
        raise InputError(
            f"beam search on a {getattr(model, 'family', type(model).__name__)} model needs its "
            "reorder(state, index), which it lacks; use greedy or sampling"
        )
    limit = getattr(model, "max_context", None)
    if limit is not None:
        model.check_context(len(prompt))
        max_new_tokens = cap_to_context(model, len(prompt), max_new_tokens)
    device = model_device(model)

    def score(logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** length_penalty

    with torch.inference_mode():
        state, logprobs = model.start(torch.tensor([prompt], device=device))
    beams: list[list[int]] = [[]]
    sums = torch.zeros(1, dtype=torch.float64, device=device)
    finished: list[Beam] = []
    for t in range(max_new_tokens):
        vocab = logprobs.shape[-1]
        candidates = (sums[:, None] + logprobs.to(sums.dtype)).flatten()
        values, flat = candidates.topk(min(2 * num_beams, candidates.numel()))
        keep: list[tuple[int, int, float]] = []  # (beam, token, total log-prob)
        for rank, (value, i) in enumerate(zip(values.tolist(), flat.tolist())):
            beam, token = divmod(i, vocab)
            if value == float("-inf"):
                break
            if token == eos_id:
                if rank < num_beams:  # only an end that would itself be among the best beams
                    finished.append(Beam(beams[beam], value, score(value, t + 1), True))
                continue
            keep.append((beam, token, value))
            if len(keep) == num_beams:
                break
        if not keep:
            beams = []
            break
        best = sorted(b.score for b in finished)[-num_beams:]
        if len(best) == num_beams and score(keep[0][2], t + 1) <= best[0]:
            beams = []
            break
        beams = [beams[b] + [token] for b, token, _ in keep]
        sums = torch.tensor([v for _, _, v in keep], dtype=torch.float64, device=device)
        if t + 1 < max_new_tokens:
            state, logprobs = _follow(
                model, state, [b for b, _, _ in keep], [tok for _, tok, _ in keep], [prompt + b for b in beams], device
            )
    finished += [Beam(b, s, score(s, len(b)), False) for b, s in zip(beams, sums.tolist())]
    return sorted(finished, key=lambda b: b.score, reverse=True)[:n]

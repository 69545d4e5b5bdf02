"""Scoring text under a model: per-token log-probabilities with the top alternatives, sequence
log-probabilities and conditional scores log p(continuation | prompt).

Prompt and continuation are encoded separately and concatenated, so the continuation's tokens are
the same whatever precedes them and the score is exactly log p(those tokens | prompt tokens).
Scoring runs the batch view of the contract (`next_token_logprobs`) on right-padded rows: causal
models never look ahead, so padding after a row's end does not change its scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from lmstack.errors import InputError
from lmstack.generation.engine import model_device
from lmstack.progress import progress

# Rows of a scoring batch are grouped so that one [B, T, V] log-prob tensor stays under this many floats.
_MAX_BATCH_FLOATS = 1 << 27


@dataclass
class TokenScore:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the likeliest tokens there, best first


def _check_scorable(model) -> None:
    if not hasattr(model, "next_token_logprobs"):
        raise InputError(f"scoring needs a causal language model; a {getattr(model, 'family', type(model).__name__)} "
                         "model has no next_token_logprobs")


def token_scores(model, ids: list[int], start: int = 1, top: int = 0) -> list[TokenScore]:
    """log p(ids[t] | ids[:t]) for t = start..len-1, with the `top` likeliest tokens at each t."""
    _check_scorable(model)
    if not 1 <= start <= len(ids):
        raise InputError(f"need at least one token of context before the scored ones; got start={start} of {len(ids)}")
    model.check_context(len(ids) - 1)
    with torch.no_grad():
        lp = model.next_token_logprobs(torch.tensor([ids[:-1]], device=model_device(model)))[0, start - 1 :].float()
    targets = torch.tensor(ids[start:], device=lp.device)
    chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
    alts = lp.topk(min(top, lp.shape[-1]), dim=-1) if top else None
    out = []
    for t, (token, logprob) in enumerate(zip(ids[start:], chosen)):
        best = list(zip(alts.indices[t].tolist(), alts.values[t].tolist())) if alts is not None else []
        out.append(TokenScore(token, logprob, best))
    return out


def score_text(model, tokenizer, prompt: str, continuation: str | None = None, top: int = 5) -> dict:
    """log p(continuation | prompt), or with no continuation log p(prompt) from <|endoftext|>;
    a JSON-able dict with the total, the perplexity and every scored token."""
    context = tokenizer.encode(prompt) if continuation is not None else []
    scored = tokenizer.encode(continuation if continuation is not None else prompt)
    if not scored:
        raise InputError("nothing to score: the continuation (or, without one, the prompt) is empty")
    if not context:
        if tokenizer.eot_id is None:
            raise InputError("the text to score needs a prompt before it (the tokenizer has no <|endoftext|> to start from)")
        context = [tokenizer.eot_id]
    tokens = token_scores(model, context + scored, start=len(context), top=top)
    total = sum(t.logprob for t in tokens)

    piece = tokenizer.id_to_piece  # readable even for a token that is part of a character (<0xE4>)
    return {
        "prompt": prompt if continuation is not None else "",
        "continuation": continuation if continuation is not None else prompt,
        "logprob": total,
        "num_tokens": len(tokens),
        "perplexity": math.exp(-total / len(tokens)),
        "is_greedy": all(t.top[0][0] == t.token for t in tokens) if top else None,
        "tokens": [
            {**asdict(t), "piece": piece(t.token), "top": [{"token": i, "piece": piece(i), "logprob": v} for i, v in t.top]}
            for t in tokens
        ],
    }


def loglikelihoods(model, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (log p(continuation | context), whether greedy
    decoding would produce the continuation). A context too long for the model keeps its end."""
    _check_scorable(model)
    limit = getattr(model, "max_context", None)
    rows = []
    for context, continuation in requests:
        if not context or not continuation:
            raise InputError("each scoring request needs a non-empty context and continuation")
        full = context + continuation
        if limit is not None:
            if len(continuation) > limit:
                raise InputError(f"a continuation of {len(continuation)} tokens is longer than the model's context of {limit}")
            full = full[-(limit + 1) :]
        rows.append((full, len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: little padding
    device = model_device(model)
    bar = progress(total=len(rows), desc="scoring", unit="req")
    i = 0
    while i < len(order):
        width = len(rows[order[i]][0]) - 1
        size = max(1, _MAX_BATCH_FLOATS // max(1, width * model.vocab_size))
        batch = order[i : i + size]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            full = rows[r][0]
            ids[b, : len(full) - 1] = torch.tensor(full[:-1])
        with torch.no_grad():
            lp = model.next_token_logprobs(ids.to(device)).float()
        for b, r in enumerate(batch):
            full, k = rows[r]
            n = len(full) - 1
            target = torch.tensor(full[-k:], device=lp.device)
            span = lp[b, n - k : n]
            results[r] = (float(span.gather(-1, target[:, None]).sum()), bool((span.argmax(-1) == target).all()))
        bar.update(len(batch))
        i += len(batch)
    bar.close()
    return results  # type: ignore[return-value]

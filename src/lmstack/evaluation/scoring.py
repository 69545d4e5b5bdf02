"""Scoring text under a model: per-token log-probabilities with the top alternatives, sequence
log-probabilities and conditional scores log p(continuation | prompt), for causal models and
encoder-decoders alike.

Prompt and continuation are encoded separately, so the continuation's tokens are the same
whatever precedes them and the score is exactly log p(those tokens | prompt tokens). A causal
model reads them concatenated, through the batch view of the contract (`next_token_logprobs`) on
right-padded rows: it never looks ahead, so padding after a row's end does not change its scores.
An encoder-decoder (T5) reads the prompt as its source (padding masked) and the continuation as
its target after the decoder's start token (`target_logprobs`); its decoder is causal too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from lmstack.errors import InputError
from lmstack.generation.engine import encode_prompt, model_device
from lmstack.progress import progress

# Rows of a scoring batch are grouped so that one [B, T, V] log-prob tensor stays under this many floats.
_MAX_BATCH_FLOATS = 1 << 27


@dataclass
class TokenScore:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the likeliest tokens there, best first


def _family(model) -> str:
    return getattr(model, "family", type(model).__name__)


def _is_seq2seq(model) -> bool:
    return hasattr(model, "target_logprobs")


def _check_scorable(model) -> None:
    if not (_is_seq2seq(model) or hasattr(model, "next_token_logprobs")):
        raise InputError(
            f"scoring needs a causal language model or an encoder-decoder; a {_family(model)} model "
            "has neither next_token_logprobs nor target_logprobs"
        )


def _logprob_rows(model, pairs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """For each (context, continuation) of one batch: the [len(continuation), V] log-prob rows,
    row t = log p(. | context, continuation[:t])."""
    B, device = len(pairs), model_device(model)
    if _is_seq2seq(model):
        src = torch.zeros(B, max(len(c) for c, _ in pairs), dtype=torch.long)
        src_mask = torch.zeros_like(src)
        tgt = torch.zeros(B, max(len(k) for _, k in pairs), dtype=torch.long)
        for b, (context, continuation) in enumerate(pairs):
            src[b, : len(context)] = torch.tensor(context)
            src_mask[b, : len(context)] = 1
            tgt[b, : len(continuation)] = torch.tensor(continuation, dtype=torch.long)
        with torch.no_grad():
            lp = model.target_logprobs(src.to(device), tgt.to(device), src_mask.to(device)).float()
        return [lp[b, : len(k)] for b, (_, k) in enumerate(pairs)]
    ids = torch.zeros(B, max(len(c) + len(k) for c, k in pairs) - 1, dtype=torch.long)
    for b, (context, continuation) in enumerate(pairs):
        full = context + continuation
        ids[b, : len(full) - 1] = torch.tensor(full[:-1])
    with torch.no_grad():
        lp = model.next_token_logprobs(ids.to(device)).float()
    return [lp[b, len(c) - 1 : len(c) + len(k) - 1] for b, (c, k) in enumerate(pairs)]


def token_scores(model, ids: list[int], start: int = 1, top: int = 0) -> list[TokenScore]:
    """log p(ids[t] | ids[:t]) for t = start..len-1, with the `top` likeliest tokens at each t.
    An encoder-decoder reads ids[:start] as its source and scores ids[start:] as its target."""
    _check_scorable(model)
    if not 1 <= start <= len(ids):
        raise InputError(f"need at least one token of context before the scored ones; got start={start} of {len(ids)}")
    if getattr(model, "max_context", None) is not None:
        model.check_context(len(ids) - 1)
    [lp] = _logprob_rows(model, [(ids[:start], ids[start:])])
    targets = torch.tensor(ids[start:], dtype=torch.long, device=lp.device)
    chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
    alts = lp.topk(min(top, lp.shape[-1]), dim=-1) if top else None
    out = []
    for t, (token, logprob) in enumerate(zip(ids[start:], chosen)):
        best = list(zip(alts.indices[t].tolist(), alts.values[t].tolist())) if alts is not None else []
        out.append(TokenScore(token, logprob, best))
    return out


def score_text(model, tokenizer, prompt: str, continuation: str | None = None, top: int = 5) -> dict:
    """log p(continuation | prompt), or with no continuation log p(prompt) from the start of a text (not
    for an encoder-decoder, which needs a source); a JSON-able dict with the total, the perplexity
    and every scored token."""
    if continuation is None and _is_seq2seq(model):
        raise InputError(
            f"a {_family(model)} model scores a continuation given the prompt as its source; pass one (--continuation TEXT)"
        )
    scored = tokenizer.encode(continuation if continuation is not None else prompt)
    if not scored:
        raise InputError("nothing to score: the continuation (or, without one, the prompt) is empty")
    # The context generation would start from: the prompt (after <s> for an n-gram), or just the start.
    context = encode_prompt(tokenizer, prompt if continuation is not None else "")
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
    decoding would produce the continuation). A context too long for the model keeps its end (an
    encoder-decoder has no fixed window and reads the whole context as its source)."""
    _check_scorable(model)
    limit = getattr(model, "max_context", None)
    pairs = []
    for context, continuation in requests:
        if not context or not continuation:
            raise InputError("each scoring request needs a non-empty context and continuation")
        if limit is not None:
            if len(continuation) > limit:
                raise InputError(f"a continuation of {len(continuation)} tokens is longer than the model's context of {limit}")
            context = context[-(limit + 1 - len(continuation)) :]
        pairs.append((context, continuation))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))  # longest first: little padding
    bar = progress(total=len(pairs), desc="scoring", unit="req")
    i = 0
    while i < len(order):
        width = sum(map(len, pairs[order[i]]))
        batch = order[i : i + max(1, _MAX_BATCH_FLOATS // (width * model.vocab_size))]
        for r, lp in zip(batch, _logprob_rows(model, [pairs[r] for r in batch])):
            target = torch.tensor(pairs[r][1], device=lp.device)
            results[r] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        bar.update(len(batch))
        i += len(batch)
    bar.close()
    return results  # type: ignore[return-value]

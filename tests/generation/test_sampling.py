"""Sampling draws from exactly the transformed distribution, with per-row settings and seeds."""

import numpy as np
import pytest
import torch
from conftest import BigramLM, random_bigram

from lmstack.errors import InputError
from lmstack.generation import GenerationConfig, generate_tokens
from lmstack.generation.processors import Sampler

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -0.8, -1.5, -2.5], dtype=torch.float64)
P = LOGITS.softmax(-1).numpy()


def unigram() -> BigramLM:
    """Every row of the table is the same, so the generated tokens are i.i.d. draws from P."""
    return BigramLM(LOGITS.float().expand(len(LOGITS), -1).clone())


# Reference transforms, written out the slow, obvious way (the implementation sorts once, in torch).
def with_temperature(p, t):
    q = p ** (1 / t)
    return q / q.sum()


def with_top_k(p, k):
    keep = np.argsort(-p)[:k]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


def with_top_p(p, top_p):
    q, total = np.zeros_like(p), 0.0
    for i in np.argsort(-p):
        q[i] = p[i]
        total += p[i]
        if total >= top_p:
            break
    return q / q.sum()


def with_min_p(p, min_p):
    q = np.where(p >= min_p * p.max(), p, 0.0)
    return q / q.sum()


def chi_square_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
    n = counts.sum()
    assert counts[expected_p == 0].sum() == 0, "sampled a token the transform removes"
    m = expected_p > 0
    stat = ((counts[m] - n * expected_p[m]) ** 2 / (n * expected_p[m])).sum()
    dof = m.sum() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


CASES = {
    "plain": (dict(), P),
    "temperature 0.5": (dict(temperature=0.5), with_temperature(P, 0.5)),
    "temperature 2": (dict(temperature=2.0), with_temperature(P, 2.0)),
    "temperature 1e4 ~ uniform": (dict(temperature=1e4), np.full(len(P), 1 / len(P))),
    "top-k 3": (dict(top_k=3), with_top_k(P, 3)),
    "top-p 0.8": (dict(top_p=0.8), with_top_p(P, 0.8)),
    "min-p 0.1": (dict(min_p=0.1), with_min_p(P, 0.1)),
    "T 1.5, top-k 6, top-p 0.9": (
        dict(temperature=1.5, top_k=6, top_p=0.9),
        with_top_p(with_top_k(with_temperature(P, 1.5), 6), 0.9),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_empirical_frequencies_match_the_transformed_distribution(name):
    settings, expected = CASES[name]
    n = 4000
    out = generate_tokens(unigram(), [[0]], GenerationConfig(max_new_tokens=n, seed=1234, **settings))[0]
    counts = np.bincount(out.tokens, minlength=len(P))
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_the_chi_square_check_rejects_the_untransformed_distribution():
    # Guards the test above: the same draws under top-k 3 are far from the plain distribution.
    out = generate_tokens(unigram(), [[0]], GenerationConfig(max_new_tokens=4000, seed=1234, temperature=2.0))[0]
    assert chi_square_pvalue(np.bincount(out.tokens, minlength=len(P)), P) < 1e-6


def test_temperature_zero_is_exactly_greedy():
    model = random_bigram(12, sharpness=0.5)  # flat: sampling would wander off the argmax path
    out = generate_tokens(model, [[3]], GenerationConfig(max_new_tokens=20, temperature=0))[0]
    prev, expected = 3, []
    for _ in range(20):
        prev = int(model.table[prev].argmax())
        expected.append(prev)
    assert out.tokens == expected


def test_a_seed_makes_sampling_reproducible_whatever_shares_the_batch():
    model = random_bigram(12, sharpness=0.5)
    cfg = GenerationConfig(max_new_tokens=30, seed=7, top_p=0.95)
    alone = generate_tokens(model, [[1, 2]], cfg)[0].tokens
    again = generate_tokens(model, [[1, 2]], cfg)[0].tokens
    others = [GenerationConfig(max_new_tokens=5, temperature=0), GenerationConfig(max_new_tokens=40, seed=99)]
    batched = generate_tokens(model, [[4], [1, 2], [5, 6, 7, 8]], [others[0], cfg, others[1]])[1].tokens
    other_seed = generate_tokens(model, [[1, 2]], GenerationConfig(max_new_tokens=30, seed=8, top_p=0.95))[0].tokens
    assert alone == again == batched
    assert other_seed != alone


def test_penalties_follow_their_formulas():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    configs = [GenerationConfig(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5)]
    sampler = Sampler(configs, [[1]], vocab_size=4, device="cpu")  # token 1 is in the prompt
    sampler.observe({0: 2})
    sampler.observe({0: 2})  # token 2 generated twice
    x = sampler.penalise(logprobs)[0]
    lp = logprobs[0]
    expected = torch.stack([lp[0], 2 * lp[1], 2 * lp[2] - 2 * 0.25 - 0.5, lp[3]])
    torch.testing.assert_close(x, expected)


def test_repetition_penalty_breaks_a_greedy_loop():
    table = torch.full((4, 4), -1.0)
    table[:, 1] = 0.0  # every token is most likely followed by token 1 (p = 0.48)
    model = BigramLM(table)
    plain = generate_tokens(model, [[0]], GenerationConfig(max_new_tokens=4, temperature=0))[0].tokens
    penalised = generate_tokens(model, [[0]], GenerationConfig(max_new_tokens=4, temperature=0, repetition_penalty=3.0))[0].tokens
    assert plain == [1, 1, 1, 1]
    # Seen tokens (the prompt's 0, then each output) are penalised, so greedy walks to unseen
    # ones; once all are seen the penalty is shared and the likeliest, 1, wins again.
    assert penalised == [1, 2, 3, 1]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(max_new_tokens=-1),
        dict(stop=[""]),
        dict(temperature=float("inf")),
        dict(top_p=float("nan")),
        dict(repetition_penalty=float("inf")),
        dict(frequency_penalty=float("nan")),
        dict(presence_penalty=float("-inf")),
    ],
)
def test_invalid_settings_are_one_clear_error(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        GenerationConfig(**bad)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=20),
        dict(top_p=0.9),
        dict(min_p=0.05),
        dict(temperature=1.3, top_k=50, top_p=0.8, min_p=0.02),
    ],
)
def test_the_sampled_distribution_equals_transformers_warpers(settings):
    """temperature, top-k, top-p and min-p, chained as `generate` chains them, keep the same tokens
    with the same probabilities as Hugging Face's logits warpers."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    from lmstack.generation.processors import top_candidates

    B, V = 16, 500
    logits = 3 * torch.randn(B, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = GenerationConfig(**settings)
    warpers = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(cfg.temperature)])
    if cfg.top_k:
        warpers.append(lp.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(lp.TopPLogitsWarper(cfg.top_p))
    if cfg.min_p:
        warpers.append(lp.MinPLogitsWarper(cfg.min_p))
    theirs = warpers(torch.zeros(B, 1, dtype=torch.long), logits.clone()).softmax(-1)

    def column(value):
        return torch.full((B, 1), value, dtype=torch.long if isinstance(value, int) else torch.float64)

    values, ids = top_candidates(
        logits.log_softmax(-1) / cfg.temperature, column(cfg.top_k or V), column(cfg.top_p), column(cfg.min_p)
    )
    ours = torch.zeros(B, V, dtype=torch.float64).scatter(1, ids, values.softmax(-1))
    assert ((ours > 0) == (theirs > 0)).all()
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-9)

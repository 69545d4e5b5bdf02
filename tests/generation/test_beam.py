"""Beam search: width 1 is greedy, a wide beam is exhaustive, length penalty and end-of-text."""

import itertools

import pytest
import torch
from conftest import BigramLM, random_bigram

from lmstack.errors import InputError
from lmstack.generation import GenerationConfig, beam_search, generate_tokens


def seq_logprob(model, prompt, tokens):
    seq = prompt + tokens
    return sum(float(model.table[a, b]) for a, b in zip(seq, seq[1:]))


def test_width_one_is_greedy():
    model = random_bigram(12, sharpness=1.0)
    greedy = generate_tokens(model, [[3, 4]], GenerationConfig(max_new_tokens=10, temperature=0))[0]
    [beam] = beam_search(model, [3, 4], num_beams=1, max_new_tokens=10)
    assert beam.tokens == greedy.tokens
    assert beam.logprob == pytest.approx(greedy.logprob, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_a_beam_as_wide_as_the_search_space_finds_the_best_sequence(seed):
    vocab, length = 4, 4
    model = random_bigram(vocab, seed=seed, sharpness=1.0)
    best = max(itertools.product(range(vocab), repeat=length), key=lambda s: seq_logprob(model, [0], list(s)))
    beams = beam_search(model, [0], num_beams=vocab ** (length - 1), max_new_tokens=length, length_penalty=0.0, n=3)
    assert beams[0].tokens == list(best)
    assert beams[0].logprob == pytest.approx(seq_logprob(model, [0], list(best)), abs=1e-5)
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    greedy = generate_tokens(model, [[0]], GenerationConfig(max_new_tokens=length, temperature=0))[0]
    assert beams[0].logprob >= greedy.logprob - 1e-9


def test_beam_search_escapes_the_greedy_trap():
    # From 0, greedy takes 1 (p=.6) then faces a flat choice; 2 (p=.4) leads to a certain path.
    table = torch.full((5, 5), 1e-9)  # probabilities (rows are renormalised)
    table[0, 1], table[0, 2] = 0.6, 0.4
    table[1, :] = 0.2
    table[2, 3] = table[3, 4] = table[4, 2] = 1.0
    model = BigramLM(table.log())
    greedy = generate_tokens(model, [[0]], GenerationConfig(max_new_tokens=3, temperature=0))[0]
    [beam] = beam_search(model, [0], num_beams=2, max_new_tokens=3, length_penalty=0.0)
    assert greedy.tokens[0] == 1 and beam.tokens == [2, 3, 4]
    assert beam.logprob > greedy.logprob


def test_end_of_text_and_length_penalty():
    # From 0: end at once (p=.45, log p -0.80) or take 1 -> 2 -> 3 -> end (p=.55·.8·.8, log p -1.04).
    eos = 4
    table = torch.full((5, 5), 1e-9)  # probabilities (rows are renormalised)
    table[0, eos], table[0, 1] = 0.45, 0.55
    table[1, 2] = table[2, 3] = 0.8
    table[1, 0] = table[2, 0] = 0.2
    table[3, eos] = table[eos, 0] = 1.0
    model = BigramLM(table.log())
    # Raw log-probability prefers ending now; per-token (penalty 1) prefers the long sure path.
    for penalty, winner in ((0.0, []), (1.0, [1, 2, 3])):
        beams = beam_search(model, [0], num_beams=2, max_new_tokens=10, length_penalty=penalty, n=2, eos_id=eos)
        assert beams[0].tokens == winner and beams[0].finished
        assert [b.tokens for b in beams[1:]] == ([[1, 2, 3]] if penalty == 0 else [[1, 2, 0, 1, 2, 3]])
        for b in beams:
            assert b.score == pytest.approx(b.logprob / (len(b.tokens) + 1) ** penalty)
    # Without the end token both stop at max_new_tokens, unfinished.
    [b] = beam_search(model, [1], num_beams=2, max_new_tokens=2, length_penalty=1.0)
    assert (b.tokens, b.finished) == ([2, 3], False)


def test_restarting_from_tokens_gives_the_same_beams_as_reorder():
    with_reorder = random_bigram(9, seed=3, sharpness=1.0)
    without = random_bigram(9, seed=3, sharpness=1.0, reorderable=False)
    a = beam_search(with_reorder, [1, 2], num_beams=3, max_new_tokens=6, n=3, eos_id=0)
    b = beam_search(without, [1, 2], num_beams=3, max_new_tokens=6, n=3, eos_id=0)
    assert a == b
    assert with_reorder.fed < without.fed  # reorder keeps the state; the fallback re-feeds prefixes


def test_bad_beam_settings_are_one_clear_error():
    model = random_bigram(5)
    with pytest.raises(InputError, match="num_beams"):
        beam_search(model, [1], num_beams=2, n=3)
    with pytest.raises(InputError, match="at least one token"):
        beam_search(model, [], num_beams=2)
    with pytest.raises(InputError, match="need num_beams >= 1"):
        beam_search(model, [1], num_beams=0)
    with pytest.raises(InputError, match="length_penalty must be a finite number; got nan"):
        beam_search(model, [1], num_beams=2, length_penalty=float("nan"))

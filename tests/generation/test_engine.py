"""Batched and streaming generation on the contract: per-row settings, stopping, incremental
decoding, and the same API for every model family."""

import warnings

import pytest
import torch
from conftest import BigramLM, random_bigram

from lmstack.errors import ContextLengthError, InputError
from lmstack.generation import GenerationConfig, generate, generate_tokens, stream
from lmstack.generation.detok import StreamDecoder
from lmstack.tokenizers.char import CharTokenizer
from lmstack.tokenizers.word import WordTokenizer

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


def naive_greedy(model, prompt, n):
    """Greedy decoding the slow way: rescore the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.next_token_logprobs(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_rows_of_different_lengths_and_settings_match_running_each_alone():
    model = random_bigram(12, sharpness=1.0)
    prompts = [[1], [2, 3, 4, 5, 6], [7, 8]]
    configs = [
        GREEDY,
        GenerationConfig(max_new_tokens=9, seed=3, top_k=4),
        GenerationConfig(max_new_tokens=3, seed=5, temperature=0.7, presence_penalty=1.0),
    ]
    batched = generate_tokens(model, prompts, configs)
    alone = [generate_tokens(model, [p], c)[0] for p, c in zip(prompts, configs)]
    assert batched == alone
    assert [len(g.tokens) for g in batched] == [12, 9, 3]


def test_decoding_is_incremental():
    model = random_bigram(12)
    generate_tokens(model, [[1, 2, 3], [4, 5, 6]], GREEDY)
    # the prompts once, then one token per row per step: no prefix is ever fed again
    assert model.fed == 2 * 3 + 2 * (12 - 1)


def test_logprob_is_the_models_log_probability_of_the_output():
    model = random_bigram(12, sharpness=1.0)
    out = generate_tokens(model, [[5]], GenerationConfig(max_new_tokens=8, seed=0, temperature=1.5))[0]
    seq = [5] + out.tokens
    assert out.logprob == pytest.approx(sum(float(model.table[a, b]) for a, b in zip(seq, seq[1:])), abs=1e-5)


@pytest.fixture
def chars():
    tok = CharTokenizer.train(["abc xyz"], special_tokens=("<|endoftext|>",))
    return tok


def table_for(tok, path: str, eot: bool = False) -> BigramLM:
    """A model that follows `path` deterministically (each of its tokens must occur once, but for
    a repeat that leads to the same next token), then emits <|endoftext|> if asked."""
    ids = tok.encode(path)
    table = torch.full((tok.vocab_size, tok.vocab_size), -30.0)
    for a, b in zip(ids, ids[1:]):
        table[a, b] = 0.0
    if eot:
        table[ids[-1], tok.eot_id] = 0.0
    return BigramLM(table)


def test_stops_at_end_of_text_stop_strings_and_max_tokens(chars):
    model = table_for(chars, "abc xyz", eot=True)
    base = dict(temperature=0, max_new_tokens=50)
    eot = generate(model, chars, ["a"], GenerationConfig(**base))[0]
    assert (eot.text, eot.finish_reason) == ("bc xyz", "stop")
    assert chars.eot_id not in eot.tokens
    stopped = generate(model, chars, ["a"], GenerationConfig(**base, stop=("zz", " x")))[0]
    assert (stopped.text, stopped.finish_reason) == ("bc", "stop")
    short = generate(model, chars, ["a"], GenerationConfig(temperature=0, max_new_tokens=3))[0]
    assert (short.text, short.finish_reason, len(short.tokens)) == ("bc ", "length", 3)
    ignore = generate(model, chars, ["a"], GenerationConfig(temperature=0, max_new_tokens=7, stop_at_eot=False))[0]
    assert ignore.text.startswith("bc xyz<|endoftext|>")


def test_generation_stops_at_the_models_context_and_says_so_once():
    model = random_bigram(12, max_context=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own setting: a message shows once per place
        outs = generate_tokens(model, [[1, 2, 3, 4], [5]], GenerationConfig(max_new_tokens=50, temperature=0))
    assert [str(w.message)[:60] for w in caught] == ["max_new_tokens=50 goes past the model's context of 10 tokens"]
    assert [(len(o.tokens), o.finish_reason) for o in outs] == [(6, "length"), (9, "length")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a request that fits says nothing
        generate_tokens(model, [[1, 2, 3, 4]], GenerationConfig(max_new_tokens=6, temperature=0))
    with pytest.raises(ContextLengthError):
        generate_tokens(model, [list(range(11))], GREEDY)


def test_streaming_yields_whole_characters_and_never_a_stop_string(chars):
    model = table_for(chars, "abc é世界🙂xdone")  # unseen characters fall back to UTF-8 bytes
    cfg = GenerationConfig(temperature=0, max_new_tokens=200, stop=("done",))
    pieces = list(stream(model, chars, "a", cfg))
    assert "".join(pieces) == generate(model, chars, ["a"], cfg)[0].text == "bc é世界🙂x"
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5  # it streams, rather than returning everything at the end
    assert not any(p.strip() in ("d", "do", "don") for p in pieces)


@pytest.mark.parametrize("make", ["chars", "words"])
def test_stream_decoder_pieces_add_up_to_decode(make):
    text = "the cat 猫 sat on the mat 🙂 twice\nthe end"
    tok = CharTokenizer.train(["the cat sat on the mat"]) if make == "chars" else WordTokenizer.train([text])
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_bad_input_is_one_clear_error(chars):
    model = random_bigram(12)
    with pytest.raises(InputError, match="at least one token"):
        generate_tokens(model, [[]], GREEDY)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        generate_tokens(model, [[1]], GenerationConfig(stop=("x",)))
    with pytest.raises(InputError, match="one per prompt"):
        generate_tokens(model, [[1], [2]], [GREEDY])


# --- every family, through the same API ----------------------------------------------------

V = 40


def families():
    from lmstack.models.feedforward import FeedForwardConfig, FeedForwardLM
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.models.ngram import NGramLM
    from lmstack.models.rnn import RNNLM, RNNConfig

    torch.manual_seed(0)
    words = [" ".join(f"w{(i * j) % 7}" for j in range(6)) for i in range(30)]
    return {
        "gpt": GPT(GPTConfig.preset("tiny", vocab_size=V)).eval(),
        "lstm": RNNLM(RNNConfig(vocab_size=V, d_embed=16, d_hidden=16)).eval(),
        "gru": RNNLM(RNNConfig(vocab_size=V, cell="gru", d_embed=16, d_hidden=16)).eval(),
        "ffn": FeedForwardLM(FeedForwardConfig(vocab_size=V, order=3, d_embed=8, d_hidden=16)).eval(),
        "ngram": NGramLM.train_texts(words, order=3, discount_fallback=True),
    }


@pytest.mark.parametrize("name", ["gpt", "lstm", "gru", "ffn", "ngram"])
def test_every_family_decodes_incrementally_exactly_as_full_rescoring(name):
    model = families()[name]
    vocab = model.vocab_size
    prompts = [[1, 2, 3], [4 % vocab, 5 % vocab]]
    outs = generate_tokens(model, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == naive_greedy(model, prompt, 12)
    sampled = generate_tokens(model, prompts, GenerationConfig(max_new_tokens=12, seed=1, top_p=0.9))
    assert all(len(g.tokens) == 12 and all(0 <= t < vocab for t in g.tokens) for g in sampled)


def test_t5_decoder_uses_the_same_api():
    from lmstack.models.t5 import T5, T5Config

    torch.manual_seed(0)
    model = T5(T5Config.preset("tiny", vocab_size=V)).eval()
    sources = [[5, 6, 7, 1], [8, 9, 1]]  # different source lengths run as separate batches
    outs = generate_tokens(model, sources, GREEDY)
    for src, out in zip(sources, outs):
        state, lp = model.start(torch.tensor([src]))
        expected = []
        for _ in range(12):
            expected.append(int(lp[0].argmax()))
            state, lp = model.step(state, torch.tensor(expected[-1:]))
        assert out.tokens == expected


def test_a_model_still_trains_after_generating():
    # Decoding runs under inference mode; nothing it creates may leak into a later training step.
    model = families()["gpt"].train()
    generate_tokens(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=4, seed=0))
    x = torch.randint(0, V, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert model.wte.weight.grad is not None


def test_ngram_prompts_begin_a_line():
    """An n-gram counts lines from <s>: an empty prompt (and any prompt) is conditioned on it."""
    from lmstack.models.ngram import NGramLM, NGramVocab

    lines = ["x y"] * 3 + ["z x w"] * 5  # mid-line, "x" is followed by "w"; at a line's start, by "y"
    model = NGramLM.train_texts(lines, order=3, discount_fallback=True)
    vocab = NGramVocab(model)
    greedy = GenerationConfig(max_new_tokens=5, temperature=0)
    [empty] = generate(model, vocab, [""], greedy)
    assert empty.text == " z x w" and empty.finish_reason == "stop"
    [after] = generate(model, vocab, ["x"], greedy)
    assert after.text == " y"


def test_a_short_prompt_beside_a_long_one_keeps_its_whole_context():
    """Left-padded, a short row shares the long row's slots; near the context limit the batch must
    still give the short row all the new tokens it would get alone."""
    from lmstack.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [list(range(1, 29)), [3, 4, 5, 6]]
    config = GenerationConfig(max_new_tokens=20, temperature=0)
    together = generate_tokens(model, prompts, config)
    alone = [generate_tokens(model, [p], config)[0] for p in prompts]
    assert [len(g.tokens) for g in together] == [4, 20]
    assert [g.tokens for g in together] == [g.tokens for g in alone]

"""lmstack.generate / perplexity / score: the one-call API over checkpoints of any family."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.errors import InputError

TEXT = "the cat sat on the mat\nthe dog sat on the log\n"


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path_factory.mktemp("gpt"), tok)


def test_calls_on_a_path_give_what_the_library_gives_on_the_loaded_model(gpt_dir, tmp_path):
    from lmstack.evaluation.perplexity import measure
    from lmstack.evaluation.scoring import score_text
    from lmstack.generation import GenerationConfig, generate

    model, tok = lmstack.load(gpt_dir)
    out = lmstack.generate(gpt_dir, "the c", temperature=0, max_new_tokens=8)
    assert out.tokens == generate(model, tok, ["the c"], GenerationConfig(temperature=0, max_new_tokens=8))[0].tokens
    assert [g.text for g in lmstack.generate(gpt_dir, ["a", "b"], max_new_tokens=2, seed=1)] == [
        g.text for g in generate(model, tok, ["a", "b"], GenerationConfig(max_new_tokens=2, seed=1))
    ]
    assert lmstack.score(gpt_dir, "the cat", " sat")["logprob"] == pytest.approx(
        score_text(model, tok, "the cat", " sat")["logprob"]
    )
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    got = lmstack.perplexity(gpt_dir, files=[tmp_path / "t.txt"], stride=8)
    assert got["bits_per_byte"] == pytest.approx(measure(model, tok, [TEXT], stride=8).bits_per_byte)
    assert lmstack.perplexity(model, TEXT, tokenizer=tok, stride=8)["nats"] == pytest.approx(got["nats"])


def test_an_ngram_checkpoint_works_through_every_call(tmp_path):
    from lmstack.models.ngram import NGramLM

    NGramLM.train_texts(TEXT.splitlines() * 10, order=5, discount_fallback=True).save(tmp_path / "m")
    out = lmstack.generate(tmp_path / "m", "the dog", temperature=0, max_new_tokens=10)
    assert out.text == " sat on the log" and out.finish_reason == "stop"  # </s> ends the sentence
    assert lmstack.perplexity(tmp_path / "m", TEXT)["mode"] == "lines"
    assert [t["piece"] for t in lmstack.score(tmp_path / "m", "the cat", "sat")["tokens"]] == ["sat"]


def test_bad_calls_are_clear_errors(gpt_dir):
    with pytest.raises(InputError, match="temprature"):
        lmstack.generate(gpt_dir, "x", temprature=0)
    with pytest.raises(InputError, match="either text= or files="):
        lmstack.perplexity(gpt_dir)

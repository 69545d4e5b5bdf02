"""`compare`: several models on one text, in the units that compare across tokenizers."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.errors import InputError
from lmstack.evaluation.compare import compare, format_table
from lmstack.evaluation.perplexity import measure

TEXT = "to be or not to be\nthat is the question\n"


@pytest.fixture(scope="module")
def models():
    from lmstack.models.bert import BERT, BERTConfig
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.models.ngram import NGramLM
    from lmstack.tokenizers.char import CharTokenizer
    from lmstack.tokenizers.word import WordTokenizer

    torch.manual_seed(0)
    char = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>", "<|mask|>"))
    word = WordTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    gpt_char = GPT(GPTConfig.preset("tiny", vocab_size=char.vocab_size)).eval()
    gpt_word = GPT(GPTConfig.preset("tiny", vocab_size=word.vocab_size)).eval()
    bert = BERT(BERTConfig.preset("tiny", vocab_size=char.vocab_size, mask_token_id=char.special_id("<|mask|>"))).eval()
    ngram = NGramLM.train_texts(TEXT.splitlines(), order=2, discount_fallback=True)
    return {"ngram": (ngram, None), "gpt_char": (gpt_char, char), "gpt_word": (gpt_word, word), "bert": (bert, char)}


def test_rows_are_each_models_default_measurement(models):
    specs = [models[k] for k in ("ngram", "gpt_char", "gpt_word")]
    rows = compare(specs, TEXT)
    assert [r["mode"] for r in rows] == ["lines", "stream", "stream"]
    for row, (model, tok) in zip(rows, specs):
        want = measure(model, tok, [TEXT])
        assert row["bits_per_byte"] == pytest.approx(want.bits_per_byte)
        assert row["perplexity_per_word"] == pytest.approx(want.perplexity_per_word)
        # the same text: bytes and words do not depend on the tokenizer
        assert row["bytes"] == len(TEXT) and row["words"] == 10 + 2
        assert row["bits_per_byte"] == pytest.approx(row["nats"] / math.log(2) / len(TEXT))
    assert rows[1]["parameters"] == models["gpt_char"][0].num_params()
    ngram = models["ngram"][0]
    stored = sum(len(t.logp) + (0 if t.backoff is None else len(t.backoff)) for t in ngram.tables)
    assert rows[0]["parameters"] == stored  # probabilities and back-offs


def test_table_marks_figures_a_masked_lm_does_not_have(models):
    rows = compare([models["gpt_char"], models["bert"]], TEXT)
    assert rows[1]["mode"] == "pseudo" and rows[1]["bits_per_byte"] is None
    lines = format_table(rows).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[2].split()[2:4] == ["-", "-"]  # bits/byte and ppl/word
    assert f"{rows[1]['pseudo_perplexity']:.2f}" in lines[2]  # shown as its per-token figure


def test_nothing_to_compare_on_is_an_input_error(models):
    with pytest.raises(InputError, match="no text"):
        compare([models["gpt_char"]], "  \n")

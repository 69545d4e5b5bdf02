"""Benchmark tasks: multiple choice by log-likelihood and numeric exact match, on toy models whose
answers are known, and the loaders on the shared GSM8K / SVAMP files."""

import json
import math

import pytest
import torch

from lmstack.errors import FormatError, InputError
from lmstack.evaluation.tasks import (
    Choice,
    extract_answer,
    few_shot_prompt,
    load_multiple_choice,
    load_numeric,
    multiple_choice,
    numeric_exact_match,
    run,
)
from lmstack.models.base import LanguageModel
from lmstack.tokenizers.char import CharTokenizer

TOK = CharTokenizer.train(
    ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?:#.\n"], special_tokens=("<|endoftext|>",)
)


class UnigramLM(LanguageModel):
    """Every position has the same distribution, given as {char: probability}."""

    def __init__(self, probs: dict[str, float]):
        self.vocab_size = TOK.vocab_size
        p = torch.full((self.vocab_size,), 1e-12)
        for ch, q in probs.items():
            p[TOK.encode(ch)[0]] = q
        self.lp = (p / p.sum()).log()

    def next_token_logprobs(self, tokens):
        return self.lp.expand(*tokens.shape, -1)

    def start(self, prompt, lengths=None):
        return None, self.lp.expand(prompt.shape[0], -1)

    def step(self, state, tokens):
        return None, self.lp.expand(tokens.shape[0], -1)


class ScriptLM(LanguageModel):
    """Says `script` whatever the prompt, then <|endoftext|>."""

    def __init__(self, script: str):
        self.vocab_size = TOK.vocab_size
        self.ids = TOK.encode(script) + [TOK.eot_id]

    def _at(self, pos, batch):
        lp = torch.full((batch, self.vocab_size), -50.0)
        lp[:, self.ids[min(pos, len(self.ids) - 1)]] = 0.0
        return lp.log_softmax(-1)

    def start(self, prompt, lengths=None):
        return 0, self._at(0, prompt.shape[0])

    def step(self, pos, tokens):
        return pos + 1, self._at(pos + 1, tokens.shape[0])


def test_multiple_choice_raw_and_length_normalised_accuracy():
    model = UnigramLM({" ": 0.2, "a": 0.5, "b": 0.3})
    # " b" has the higher total log-probability, " aaaa" the higher per character.
    items = [Choice("q?", ["aaaa", "b"], 0), Choice("q?", ["aaaa", "b"], 1), Choice("q?", ["b", "aaaa"], 0)]
    result = multiple_choice(model, TOK, items)
    assert [r["pred"] for r in result["items"]] == [1, 1, 0]
    assert [r["pred_norm"] for r in result["items"]] == [0, 0, 1]
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] == pytest.approx(1 / 3)
    lp = result["items"][0]["logprobs"]
    assert lp[1] == pytest.approx(math.log(0.2) + math.log(0.3), abs=1e-4)


@pytest.mark.parametrize(
    "text, number",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
        ("so the answer is 1,234.", 1234),
        ("we get -3.5 and then 7", 7),
        ("The answer is: $42", 42),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, number):
    assert extract_answer(text) == number


def test_numeric_exact_match_generates_extracts_and_compares(tmp_path):
    problems = load_numeric_rows([{"question": "1+1?", "answer": 42}, {"question": "2+2?", "answer": "x #### 7"}], tmp_path)
    result = numeric_exact_match(ScriptLM(" 6 times 7 is 42\n\nQuestion: more"), TOK, problems, shots=problems[:1])
    assert [r["output"] for r in result["items"]] == [" 6 times 7 is 42"] * 2  # stopped at the next question
    assert [r["correct"] for r in result["items"]] == [True, False]
    assert result["exact_match"] == 0.5


def test_a_prompt_longer_than_the_context_keeps_its_end(tmp_path):
    """As lm-evaluation-harness does: the prompt loses its first examples, never the question."""

    class Recording(ScriptLM):
        max_context = 40

        def start(self, prompt, lengths=None):
            self.seen = prompt[0].tolist()
            return super().start(prompt, lengths)

    problems = load_numeric_rows([{"question": "what is six times seven?", "answer": 42}], tmp_path)
    model = Recording(" 42\n")
    result = numeric_exact_match(model, TOK, problems, shots=problems * 3, max_new_tokens=8)
    full = TOK.encode(few_shot_prompt(problems[0].question, problems * 3))
    assert len(full) > 32 and model.seen == full[-32:]
    assert result["truncated"] == 1 and result["exact_match"] == 1.0
    with pytest.raises(InputError, match="no room for a prompt"):
        numeric_exact_match(model, TOK, problems, max_new_tokens=40)


def test_few_shot_prompt_format(tmp_path):
    shots = load_numeric_rows([{"question": "A?", "answer": "1+1=2\n#### 2"}], tmp_path)
    assert few_shot_prompt("B?", shots) == "Question: A?\nAnswer: 1+1=2\n#### 2\n\nQuestion: B?\nAnswer:"


def load_numeric_rows(rows, tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_numeric(path)


def test_shared_gsm8k_and_svamp_load_with_their_gold_answers(shared):
    gsm = load_numeric(shared / "data" / "gsm8k_test.jsonl")
    svamp = load_numeric(shared / "data" / "svamp.jsonl")
    assert (len(gsm), len(svamp)) == (1319, 1000)
    assert gsm[0].answer == 18 and gsm[0].solution.endswith("#### 18")
    assert svamp[0].answer == 51 and svamp[0].solution == "The answer is 51."
    # The worked solutions themselves extract to the gold answer.
    assert all(extract_answer(p.solution) == p.answer for p in gsm)


def test_malformed_task_files_name_the_line(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(FormatError, match=r"mc.jsonl:2: missing field\(s\) \['answer'\]"):
        load_multiple_choice(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(FormatError, match="index of the right choice"):
        load_multiple_choice(bad)
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(FormatError, match="#### <number>"):
        load_numeric(bad)


def test_run_evaluates_a_task_file_end_to_end(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "q?", "choices": ["aaaa", "b"], "answer": 1}\n' * 3)
    result = run("mc", UnigramLM({" ": 0.2, "a": 0.5, "b": 0.3}), TOK, mc, limit=2)
    assert (result["n"], result["acc"], result["acc_norm"]) == (2, 1.0, 0.0)
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "a?", "answer": 42}\n{"question": "b?", "answer": "so #### 42"}\n')
    result = run("numeric", ScriptLM(" 42\n\nQuestion:"), TOK, problems, shots_path=problems, shots=1)
    assert result["exact_match"] == 1.0 and result["n"] == 2
    with pytest.raises(InputError, match="few-shot examples need a file"):
        run("numeric", ScriptLM("1"), TOK, problems, shots=2)
    with pytest.raises(InputError, match="unknown task kind"):
        run("hellaswag", ScriptLM("1"), TOK, problems)

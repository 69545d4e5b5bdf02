"""The arithmetic task generator: every worked step is right, the answer is the last step's, the
held-out split never shares a computation with training, output is a pure function of the seed,
and the files it writes are what `finetune`, `train` and `eval cot` read."""

import json
import re

import pytest

from lmstack.data import arithmetic
from lmstack.errors import InputError
from lmstack.evaluation.tasks import extract_answer

STEP = re.compile(r"^(.*?)(\d+) ([+\-*]) (\d+) = (\d+)$")


def steps(problem):
    return [STEP.match(line).groups()[1:] for line in problem.solution.split("\n")]


def skeleton(problem):
    s = steps(problem)
    return (s[0][0], tuple((op, k) for _, op, k, _ in s))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_step_is_right_and_the_answer_is_the_last(lang):
    problems = arithmetic.generate(300, seed=3, lang=lang, split="all")
    for p in problems:
        chain = steps(p)
        assert len(chain) == p.level
        value = int(chain[0][0])
        assert str(value) in p.question
        for a, op, k, r in chain:
            a, k, r = int(a), int(k), int(r)
            assert a == value and r == {"+": a + k, "-": a - k, "*": a * k}[op] and 0 <= r <= 99
            value = r
        assert p.answer == value
        assert p.response.endswith(f"\nAnswer: {p.answer}") and extract_answer(p.response) == p.answer
    assert {p.level for p in problems} == {1, 2, 3, 4}


def test_languages_are_kept_apart():
    for p in arithmetic.generate(50, seed=1, lang="en"):
        assert not re.search(r"[\u4e00-\u9fff]", p.question + p.solution)
    for p in arithmetic.generate(50, seed=1, lang="zh"):
        assert re.search(r"[\u4e00-\u9fff]", p.solution) and not re.search(r"[A-Za-z]{2,}", p.question + p.solution)
        assert p.paraphrases and p.paraphrases[0] != p.question
    assert {p.lang for p in arithmetic.generate(40, seed=1, lang="mix")} == {"en", "zh"}


def test_held_out_split_is_fixed_and_shares_no_computation():
    train = arithmetic.generate(1500, seed=0, lang="mix", split="train")
    test = arithmetic.generate(300, seed=9, lang="mix", split="test")
    assert not {skeleton(p) for p in train} & {skeleton(p) for p in test}
    # fixed by the computation, not by the seed or the wording
    again = arithmetic.generate(300, seed=123, lang="en", split="test")
    assert {skeleton(p) for p in again} & {skeleton(p) for p in test}
    assert not {skeleton(p) for p in again} & {skeleton(p) for p in train}
    assert len({p.question for p in train}) == len(train)  # distinct problems
    share = len(arithmetic.generate(400, seed=5, split="test")) / 400
    assert share == 1.0  # asked-for count reached


def test_deterministic_by_seed():
    assert arithmetic.generate(20, seed=7, lang="mix") == arithmetic.generate(20, seed=7, lang="mix")
    assert arithmetic.generate(20, seed=7) != arithmetic.generate(20, seed=8)


def test_rows_and_files(tmp_path, lmstack_cli):
    out = tmp_path / "sft.jsonl"
    lmstack_cli("align", "tasks", "--out", out, "--n", 5, "--lang", "zh", "--level", 2, "3", "--format", "sft", "--seed", 4)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = arithmetic.generate(5, seed=4, lang="zh", levels=(2, 3))
    assert rows == [{"prompt": p.question, "response": p.response} for p in expected]
    out = tmp_path / "tasks.jsonl"
    lmstack_cli("align", "tasks", "--out", out, "--n", 3, "--split", "test")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"question", "solution", "answer", "lang", "level", "paraphrases"}
    assert all(isinstance(r["answer"], int) for r in rows)
    text = tmp_path / "pre.txt"
    arithmetic.write(text, expected, "text")
    assert text.read_text(encoding="utf-8") == "".join(f"{p.question}\n{p.response}\n\n" for p in expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "must be >= 1"),
        ({"n": 5, "lang": "fr"}, "unknown language"),
        ({"n": 5, "levels": (5,)}, "levels must be among"),
        ({"n": 5, "split": "dev"}, "unknown split"),
        ({"n": 100_000, "levels": (1,), "split": "test"}, "distinct test problems"),
    ],
)
def test_bad_requests_say_what_to_change(kwargs, message):
    with pytest.raises(InputError, match=message):
        arithmetic.generate(**kwargs)


def test_direct_share_answers_a_seeded_share_at_once(tmp_path, lmstack_cli):
    """--direct-share: that share of sft/text rows is the bare answer line, the rest keep the steps."""
    out = tmp_path / "sft.jsonl"
    lmstack_cli("align", "tasks", "--out", out, "--n", 40, "--level", 2, "--format", "sft", "--seed", 3, "--direct-share", 0.25)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    problems = arithmetic.generate(40, seed=3, levels=(2,))
    direct = [r["response"] == f"Answer: {p.answer}" for r, p in zip(rows, problems)]
    assert sum(direct) == 10
    assert all(r["response"] == p.response for r, p, d in zip(rows, problems, direct) if not d)
    assert all(extract_answer(r["response"]) == p.answer for r, p in zip(rows, problems))
    again = tmp_path / "again.jsonl"
    lmstack_cli("align", "tasks", "--out", again, "--n", 40, "--level", 2, "--format", "sft", "--seed", 3, "--direct-share", 0.25)
    assert again.read_text() == out.read_text()  # the same rows answer at once
    text = tmp_path / "pre.txt"
    arithmetic.write(text, problems, "text", direct_share=1.0)
    assert text.read_text() == "".join(f"{p.question}\nAnswer: {p.answer}\n\n" for p in problems)
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        arithmetic.write(text, problems, "sft", direct_share=1.5)
    with pytest.raises(InputError, match="sft and text rows"):
        arithmetic.write(text, problems, "task", direct_share=0.5)

"""Arithmetic word problems with worked solutions: a verifiable task a CPU-trained model learns.

A problem is a start quantity followed by 1-4 operations (its level): buying more, giving some
away, doubling or tripling. Its worked solution has one line per operation ("buys 5: 7 + 5 = 12",
"买5个：7 + 5 = 12"), so a model that writes the steps only ever adds, subtracts or multiplies two
small numbers, while one that answers at once must do the whole chain in a single token: answering
without the steps is harder. Numbers stay below 100 and never go negative.

Everything is a pure function of the seed. The held-out split is fixed by a hash of the problem's
arithmetic (start and operations), not of its wording, so a test problem's computation never
appears in training under another name or in the other language. Each problem also carries a
paraphrase of its question, for measuring prompt sensitivity (`lmstack eval cot`).

Rows: `task_row` {question, solution, answer, lang, level, paraphrases}; `sft_row` {prompt,
response} with the response the worked steps then "Answer: N" (what `lmstack finetune` reads);
`text_row`: question and response as plain text (pretraining). `lmstack align tasks` writes them.
`write(..., direct_share=s)` gives a share s of the sft/text rows the bare "Answer: N" instead of
the steps: data from mixed sources, so a model taught on it sometimes answers at once (and is
mostly wrong beyond one step), which is the behaviour RL on verifiable answers learns to drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

from lmstack.errors import InputError
from lmstack.io import atomic_write

LANGS = ("en", "zh")
LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "test", "all")
FORMATS = ("task", "sft", "text")
TEST_PERCENT = 20  # share of the arithmetic skeletons held out
MAX_VALUE = 99

_EN_PEOPLE = (("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Lily", "She"), ("Sam", "He"), ("Mia", "She"))
_EN_ITEMS = ("apples", "books", "coins", "stamps", "pens", "cards")
_ZH_PEOPLE = (("小明", "他"), ("小红", "她"), ("小华", "他"), ("小丽", "她"), ("小刚", "他"), ("小芳", "她"))
_ZH_ITEMS = ("苹果", "橘子", "气球", "糖果", "贴纸", "铅笔")
_TIMES_EN = {2: "doubles", 3: "triples"}
_TIMES_ZH = {2: "两", 3: "三"}


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked steps, one line per operation
    answer: int
    lang: str
    level: int
    paraphrases: tuple[str, ...] = field(default=())

    @property
    def response(self) -> str:
        """What a model is taught to write: the steps, then the answer line."""
        return f"{self.solution}\n{self.direct_response}"

    @property
    def direct_response(self) -> str:
        """The answer line alone, without the steps."""
        return f"Answer: {self.answer}"


def task_row(p: Problem) -> dict:
    return {
        "question": p.question,
        "solution": p.solution,
        "answer": p.answer,
        "lang": p.lang,
        "level": p.level,
        "paraphrases": list(p.paraphrases),
    }


def sft_row(p: Problem, direct: bool = False) -> dict:
    return {"prompt": p.question, "response": p.direct_response if direct else p.response}


def text_row(p: Problem, direct: bool = False) -> str:
    return f"{p.question}\n{p.direct_response if direct else p.response}\n\n"


# --- one problem -----------------------------------------------------------------------------


def _skeleton(rng: random.Random, level: int) -> tuple[int, list[tuple[str, int]]]:
    """A start value and `level` operations ("+", "-", "*" with their operand), every value in 0..99."""
    value = rng.randint(2, 20)
    start, ops = value, []
    while len(ops) < level:
        kind = rng.choice("++--*")
        if kind == "*" and value <= MAX_VALUE // 3 and value > 0:
            k = rng.choice((2, 3)) if value * 3 <= MAX_VALUE else 2
            value *= k
        elif kind == "-" and value > 1:
            k = rng.randint(1, min(9, value - 1))
            value -= k
        elif kind == "+" and value + 9 <= MAX_VALUE:
            k = rng.randint(1, 9)
            value += k
        else:
            continue
        ops.append((kind, k))
    return start, ops


def _held_out(start: int, ops: list[tuple[str, int]]) -> bool:
    key = json.dumps([start, ops]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 100 < TEST_PERCENT


def _steps(start: int, ops: list[tuple[str, int]]) -> list[tuple[str, int, int, int]]:
    """(op, left, operand, result) for each operation."""
    out, value = [], start
    for kind, k in ops:
        new = value + k if kind == "+" else value - k if kind == "-" else value * k
        out.append((kind, value, k, new))
        value = new
    return out


def _english(rng: random.Random, start: int, ops) -> tuple[str, str, str]:
    name, pron = rng.choice(_EN_PEOPLE)
    item = rng.choice(_EN_ITEMS)
    told = {
        "+": lambda k: f"{pron} buys {k} more.",
        "-": lambda k: f"{pron} gives away {k}.",
        "*": lambda k: f"{pron} {_TIMES_EN[k]} them.",
    }
    shown = {"+": lambda k: f"buys {k}", "-": lambda k: f"gives {k}", "*": lambda k: _TIMES_EN[k]}
    body = " ".join([f"{name} has {start} {item}."] + [told[kind](k) for kind, k in ops])
    lines = [f"{shown[kind](k)}: {a} {kind} {k} = {r}" for kind, a, k, r in _steps(start, ops)]
    question = f"{body} How many {item} does {name} have now?"
    paraphrase = f"{body} What is the number of {item} {name} has in the end?"
    return question, "\n".join(lines), paraphrase


def _chinese(rng: random.Random, start: int, ops) -> tuple[str, str, str]:
    (name, pron), item = rng.choice(_ZH_PEOPLE), rng.choice(_ZH_ITEMS)
    told = {
        "+": lambda k: f"{pron}又买了{k}个。",
        "-": lambda k: f"{pron}送出了{k}个。",
        "*": lambda k: f"{pron}的{item}变成了原来的{_TIMES_ZH[k]}倍。",
    }
    shown = {"+": lambda k: f"买{k}个", "-": lambda k: f"送出{k}个", "*": lambda k: f"变成{_TIMES_ZH[k]}倍"}
    body = "".join([f"{name}有{start}个{item}。"] + [told[kind](k) for kind, k in ops])
    lines = [f"{shown[kind](k)}：{a} {kind} {k} = {r}" for kind, a, k, r in _steps(start, ops)]
    return f"{body}{name}现在有多少个{item}？", "\n".join(lines), f"{body}最后{name}一共有几个{item}？"


# --- many problems ---------------------------------------------------------------------------


def generate(n: int, seed: int = 0, lang: str = "en", levels=LEVELS, split: str = "train") -> list[Problem]:
    """`n` distinct problems of the split ("train", "test" or "all"), levels drawn uniformly from
    `levels`, in English, Chinese or both ("mix", alternating at random)."""
    levels = tuple(levels)
    if n < 1:
        raise InputError(f"the number of problems must be >= 1, got {n}")
    if lang not in (*LANGS, "mix"):
        raise InputError(f"unknown language {lang!r}; use en, zh or mix")
    if not levels or any(k not in LEVELS for k in levels):
        raise InputError(f"levels must be among {list(LEVELS)} (steps per problem), got {list(levels)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0
    while misses < 5_000:  # a few levels and a small split hold only so many problems
        misses += 1
        level = rng.choice(levels)
        start, ops = _skeleton(rng, level)
        if split != "all" and _held_out(start, ops) != (split == "test"):
            continue
        language = rng.choice(LANGS) if lang == "mix" else lang
        question, solution, paraphrase = (_english if language == "en" else _chinese)(rng, start, ops)
        if question in seen:
            continue
        seen.add(question)
        misses = 0
        out.append(Problem(question, solution, _steps(start, ops)[-1][3], language, level, (paraphrase,)))
        if len(out) == n:
            return out
    raise InputError(
        f"only {len(out)} distinct {split} problems of levels {list(levels)} found; ask for fewer (--n) or allow more levels"
    )


def direct_rows(n: int, share: float, seed: int = 0) -> set[int]:
    """Which of n rows answer at once: round(share * n) of them, chosen by the seed."""
    if not 0.0 <= share <= 1.0:
        raise InputError(f"the share of direct answers must be in [0, 1], got {share}")
    return set(random.Random(f"direct-{seed}").sample(range(n), round(share * n)))


def write(path: str | os.PathLike, problems: list[Problem], fmt: str = "task", direct_share: float = 0.0, seed: int = 0) -> None:
    """Write problems as task rows, SFT rows (JSONL) or pretraining text, atomically; a share
    `direct_share` of the sft/text rows (chosen by `seed`) answer at once, without the steps."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    if direct_share and fmt == "task":
        raise InputError("--direct-share applies to sft and text rows; task rows keep the solution and the answer apart")
    direct = direct_rows(len(problems), direct_share, seed)
    with atomic_write(path) as f:
        for k, p in enumerate(problems):
            if fmt == "text":
                f.write(text_row(p, k in direct))
            else:
                row = task_row(p) if fmt == "task" else sft_row(p, k in direct)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

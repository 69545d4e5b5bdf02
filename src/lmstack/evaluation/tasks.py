"""Benchmark tasks from local JSONL files, on any model of the contract.

- Multiple choice by log-likelihood: each choice is scored as a continuation of the question;
  `acc` picks the highest total log-probability, `acc_norm` the highest per character (lm-eval's
  length normalisation, which stops short answers winning only because they are short).
  File format, one object per line: {"question": str, "choices": [str, ...], "answer": int}.
- Generative exact match with numeric answers (GSM8K, SVAMP): greedy few-shot generation, the
  answer taken from "#### N", else "the answer is N", else the last number in the output, and
  compared as a number with the gold one. File format: {"question": str, "answer": number or a
  GSM8K worked solution ending "#### N"}.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from lmstack.errors import FormatError, InputError
from lmstack.io import iter_lines
from lmstack.progress import progress

QA_PROMPT = "Question: {question}\nAnswer:"
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for n, line in enumerate(iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise FormatError(f"{path}:{n}: missing field(s) {missing}; each line needs {list(required)}")
        rows.append(row)
    return rows


# --- multiple choice ----------------------------------------------------------------------


@dataclass
class Choice:
    question: str
    choices: list[str]
    answer: int


def load_multiple_choice(path: str | os.PathLike) -> list[Choice]:
    items = []
    for n, row in enumerate(read_jsonl(path, ("question", "choices", "answer")), 1):
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise FormatError(f"{path}: item {n}: 'choices' must be a list of at least two non-empty strings")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise FormatError(f"{path}: item {n}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}")
        items.append(Choice(str(row["question"]), choices, answer))
    if not items:
        raise InputError(f"{path}: no items; the file needs one JSON object per line")
    return items


def multiple_choice(model, tokenizer, items: list[Choice], prompt: str = QA_PROMPT) -> dict:
    """acc and acc_norm over `items`; each choice is scored as " " + choice after the prompt."""
    from lmstack.evaluation.scoring import loglikelihoods

    requests = [
        (tokenizer.encode(prompt.format(question=it.question)), tokenizer.encode(" " + c)) for it in items for c in it.choices
    ]
    scores = iter(lp for lp, _ in loglikelihoods(model, requests))
    per_item = []
    for it in items:
        lps = [next(scores) for _ in it.choices]
        normed = [lp / len(c) for lp, c in zip(lps, it.choices)]
        per_item.append({"pred": _argmax(lps), "pred_norm": _argmax(normed), "answer": it.answer, "logprobs": lps})
    n = len(items)
    return {
        "n": n,
        "acc": sum(r["pred"] == r["answer"] for r in per_item) / n,
        "acc_norm": sum(r["pred_norm"] == r["answer"] for r in per_item) / n,
        "items": per_item,
    }


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


# --- generative, numeric answers ----------------------------------------------------------


@dataclass
class Problem:
    question: str
    answer: float
    solution: str  # shown after "Answer:" when the problem is a few-shot example


def _parse_number(s: str) -> float:
    return float(s.replace(",", "").replace("$", ""))


def extract_answer(text: str) -> float | None:
    """The number a model's output commits to: after "####", else after "the answer is", else the
    last number in the text; None when there is none."""
    for pattern in (rf"####\s*({_NUMBER})", rf"answer is:?\s*({_NUMBER})"):
        m = re.search(pattern, text, flags=re.IGNORECASE)
        if m:
            return _parse_number(m.group(1))
    numbers = re.findall(_NUMBER, text)
    return _parse_number(numbers[-1]) if numbers else None


def load_numeric(path: str | os.PathLike) -> list[Problem]:
    """GSM8K ({"question", "answer": "... #### 18"}) or SVAMP-style ({"question", "answer": 51})."""
    problems = []
    for n, row in enumerate(read_jsonl(path, ("question", "answer")), 1):
        answer = row["answer"]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            gold, solution = float(answer), f"The answer is {answer}."
        elif isinstance(answer, str) and (m := re.search(rf"####\s*({_NUMBER})\s*$", answer.strip())):
            gold, solution = _parse_number(m.group(1)), answer.strip()
        else:
            raise FormatError(f"{path}: item {n}: 'answer' must be a number or a solution ending in '#### <number>'")
        problems.append(Problem(str(row["question"]), gold, solution))
    if not problems:
        raise InputError(f"{path}: no problems; the file needs one JSON object per line")
    return problems


def few_shot_prompt(question: str, shots: list[Problem]) -> str:
    examples = "".join(QA_PROMPT.format(question=s.question) + f" {s.solution}\n\n" for s in shots)
    return examples + QA_PROMPT.format(question=question)


def numeric_exact_match(
    model, tokenizer, problems: list[Problem], shots: list[Problem] = (), max_new_tokens: int = 256, batch_size: int = 8
) -> dict:
    """Greedy few-shot generation; the fraction of problems whose extracted answer equals the gold.
    A prompt longer than the model's context leaves room for the answer by keeping its end (the
    question), as lm-evaluation-harness does; `truncated` counts them."""
    from lmstack.generation import GenerationConfig, generate_tokens
    from lmstack.generation.engine import encode_prompt, keep_end

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, stop=("\n\nQuestion:", "\nQuestion:"))
    results, truncated = [], 0
    bar = progress(total=len(problems), desc="generating", unit="problem")
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        full = [encode_prompt(tokenizer, few_shot_prompt(p.question, list(shots))) for p in batch]
        prompts = [keep_end(model, ids, max_new_tokens) for ids in full]
        truncated += sum(len(a) < len(b) for a, b in zip(prompts, full))
        outs = generate_tokens(model, prompts, config, tokenizer)
        for p, out in zip(batch, outs):
            pred = extract_answer(out.text)
            correct = pred is not None and math.isclose(pred, p.answer, rel_tol=0, abs_tol=1e-6)
            results.append({"question": p.question, "answer": p.answer, "output": out.text, "pred": pred, "correct": correct})
        bar.update(len(batch))
    bar.close()
    return {
        "n": len(results),
        "exact_match": sum(r["correct"] for r in results) / max(len(results), 1),
        "truncated": truncated,
        "items": results,
    }


# --- one call per task file (what a CLI command runs) ----------------------------------------

KINDS = ("mc", "numeric")


def run(
    kind: str,
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    shots_path: str | os.PathLike | None = None,
    shots: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict:
    """Evaluate a task file: kind "mc" (multiple choice: acc, acc_norm) or "numeric" (GSM8K /
    SVAMP exact match, with the first `shots` problems of `shots_path` as examples)."""
    if kind not in KINDS:
        raise InputError(f"unknown task kind {kind!r}; use one of {KINDS}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if kind == "mc":
        return multiple_choice(model, tokenizer, load_multiple_choice(path)[:limit])
    if shots and shots_path is None:
        raise InputError("few-shot examples need a file to take them from (e.g. gsm8k_train.jsonl)")
    examples = load_numeric(shots_path)[:shots] if shots else []
    return numeric_exact_match(
        model, tokenizer, load_numeric(path)[:limit], examples, max_new_tokens=max_new_tokens, batch_size=batch_size
    )

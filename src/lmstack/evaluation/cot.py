"""Verifiable tasks and what reasoning buys: `lmstack eval cot`, and the tasks GRPO trains on.

A verifiable task is a list of problems with a numeric answer: the arithmetic generator shipped
in `lmstack.data.arithmetic`, GSM8K or SVAMP (the shared files), or any JSONL file of
{"question", "answer"} rows (a number, or a GSM8K solution ending "#### N"), optionally with
"paraphrases" of the question. Answers are read from a model's text as `eval tasks` reads them
(`tasks.extract_answer`), so every command scores alike.

A model answers in its chat format when its tokenizer has one (after `lmstack finetune` on
{prompt, response} rows), else after "Question: ...\\nAnswer:". Its reply is a reasoning trace T
then "Answer: N". `chain_of_thought` measures, per problem, whether T helps:
- log P(A | Q): the gold answer line "Answer: N" right after the question;
- log P(A | Q, T): the same line after the model's own sampled trace T;
- accuracy answering at once (greedy after "Answer:") and with reasoning (greedy reply);
- how often a trace mixes languages (Latin words and CJK characters in one trace);
- prompt sensitivity: log P(A | Q1) against log P(A | Q2) for each paraphrase Q2 of Q1.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import InputError
from lmstack.evaluation.tasks import QA_PROMPT, extract_answer, load_numeric, read_jsonl

ANSWER = "Answer:"
NAMED = {"gsm8k": "gsm8k_{split}.jsonl", "svamp": "svamp.jsonl"}
_FORMAT = re.compile(r"\S[\s\S]*\n\s*(?:Answer:|####)\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")
_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class Item:
    question: str
    answer: float
    paraphrases: list[str] = field(default_factory=list)


# --- tasks -------------------------------------------------------------------------------------


def _shared_file(name: str, split: str) -> Path:
    """A named task's file in the shared data folder ($LMSTACK_SHARED/data, else ../shared/data)."""
    fname = NAMED[name].format(split=split)
    roots = [Path(os.environ["LMSTACK_SHARED"]) / "data"] if os.environ.get("LMSTACK_SHARED") else []
    roots += [Path.cwd().parent / "shared" / "data", Path.cwd() / "data"]
    for root in roots:
        if (root / fname).is_file():
            return root / fname
    raise InputError(
        f"--task {name}: {fname} not found in {', '.join(map(str, roots))}; pass the file's path "
        "instead (--task PATH.jsonl) or set LMSTACK_SHARED to the folder holding data/"
    )


def load_task(
    task: str, split: str = "test", n: int | None = None, seed: int = 0, lang: str = "mix", levels=(1, 2, 3, 4)
) -> list[Item]:
    """The problems of `task`: "arithmetic" (n generated problems of the split, in `lang`, with
    `levels` steps), "gsm8k", "svamp" or a JSONL file; at most `n` of them."""
    if n is not None and n < 1:
        raise InputError(f"the number of problems must be >= 1, got {n}")
    if task == "arithmetic":
        from lmstack.data.arithmetic import generate

        return [
            Item(p.question, float(p.answer), list(p.paraphrases))
            for p in generate(n or 200, seed=seed, lang=lang, levels=levels, split=split)
        ]
    if task in NAMED:
        path = _shared_file(task, split)
    elif task.endswith(".jsonl"):
        path = Path(task)
    else:
        raise InputError(f'unknown task {task!r}; use arithmetic, gsm8k, svamp or a .jsonl file of {{"question", "answer"}} rows')
    problems = load_numeric(path)  # names the row that lacks an answer
    rows = read_jsonl(path, ())
    items = []
    for k, (p, row) in enumerate(zip(problems, rows), 1):
        para = row.get("paraphrases", [])
        if not (isinstance(para, list) and all(isinstance(q, str) and q for q in para)):
            raise InputError(f"{path}: item {k}: 'paraphrases' must be a list of non-empty strings")
        items.append(Item(p.question, p.answer, para))
    return items[:n]


# --- prompts and rewards -------------------------------------------------------------------------


def uses_chat(tokenizer) -> bool:
    from lmstack.tokenizers.base import CHAT_ROLES

    return tokenizer.chat_template is not None or all(t in tokenizer.special_tokens for t in CHAT_ROLES)


def question_ids(tokenizer, question: str) -> list[int]:
    """The ids a model continues to answer `question`: a user turn and an open assistant turn in its
    chat format, else the plain "Question: ...\\nAnswer:" of `eval tasks`."""
    if uses_chat(tokenizer):
        from lmstack.data.chat import prompt_ids

        return prompt_ids(tokenizer, [{"role": "user", "content": question}])
    from lmstack.generation.engine import encode_prompt

    return encode_prompt(tokenizer, QA_PROMPT.format(question=question) + " ")


def reply_config(tokenizer, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None):
    """Decoding settings for a reply: it ends at the chat format's end of turn (or a new question)."""
    from lmstack.generation import GenerationConfig

    stop = ("\nQuestion:",)
    if uses_chat(tokenizer):
        from lmstack.data.chat import turn_end_id

        end = turn_end_id(tokenizer)
        stop = (tokenizer.decode([end]),) if end is not None else stop
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop, seed=seed)


def correct(text: str, gold: float) -> bool:
    pred = extract_answer(text)
    return pred is not None and math.isclose(pred, gold, rel_tol=0, abs_tol=1e-6)


def well_formed(text: str) -> bool:
    """A reasoning block, then the answer alone on the last line ("Answer: N" or "#### N")."""
    return bool(_FORMAT.search(text))


def reward(text: str, gold: float, format_weight: float = 0.0) -> float:
    """1 for the right number, plus `format_weight` for a reasoning block before the answer line."""
    return float(correct(text, gold)) + format_weight * well_formed(text)


def answer_text(gold: float) -> str:
    """The answer line a reply ends with: "Answer: 13" (integers without a decimal point)."""
    return f"{ANSWER} {int(gold) if float(gold).is_integer() else gold}"


def trace_of(text: str) -> str:
    """The reasoning part of a reply: everything before its last "Answer:" (all of it without one)."""
    cut = text.rfind(ANSWER)
    return text if cut < 0 else text[:cut]


def mixes_languages(text: str) -> bool:
    return bool(_LATIN_WORD.search(text)) and bool(_CJK.search(text))


# --- eval cot ---------------------------------------------------------------------------------


def chain_of_thought(
    model, tokenizer, items: list[Item], max_new_tokens: int = 128, temperature: float = 1.0, seed: int = 0, batch_size: int = 16
) -> dict:
    """Per problem and in summary: log P(A | Q) against log P(A | Q, T) with T a sampled trace,
    accuracy without and with reasoning, language mixing in traces, and paraphrase sensitivity."""
    from lmstack.evaluation.scoring import loglikelihoods
    from lmstack.generation import generate_tokens

    if not items:
        raise InputError("no problems to evaluate")
    results = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        prompts = [question_ids(tokenizer, it.question) for it in batch]
        sampled = generate_tokens(
            model,
            prompts,
            [reply_config(tokenizer, max_new_tokens, temperature, seed + i + j) for j in range(len(batch))],
            tokenizer,
        )
        greedy = generate_tokens(model, prompts, reply_config(tokenizer, max_new_tokens), tokenizer)
        direct_prompts = [p + tokenizer.encode(ANSWER) for p in prompts]
        direct = generate_tokens(model, direct_prompts, reply_config(tokenizer, 8), tokenizer)
        traces = [trace_of(g.text) for g in sampled]
        answers = [tokenizer.encode(answer_text(it.answer)) for it in batch]
        requests = [(p, a) for p, a in zip(prompts, answers)]
        requests += [(p + tokenizer.encode(t), a) for p, t, a in zip(prompts, traces, answers)]
        paras = [(k, q) for k, it in enumerate(batch) for q in it.paraphrases]
        requests += [(question_ids(tokenizer, q), answers[k]) for k, q in paras]
        scores = [lp for lp, _ in loglikelihoods(model, [_fit(model, c, a) for c, a in requests])]
        n = len(batch)
        for k, it in enumerate(batch):
            results.append(
                {
                    "question": it.question,
                    "answer": it.answer,
                    "trace": traces[k],
                    "logp_direct": scores[k],
                    "logp_with_trace": scores[n + k],
                    "correct_direct": correct(direct[k].text.strip().split("\n")[0], it.answer),
                    "correct_reasoning": correct(greedy[k].text, it.answer),
                    "mixed_languages": mixes_languages(traces[k]),
                    "logp_paraphrases": [scores[2 * n + j] for j, (kk, _) in enumerate(paras) if kk == k],
                }
            )
    return summarize(results)


def _fit(model, context: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """A scoring request within the model's context: a trace that runs to the limit loses its start."""
    limit = getattr(model, "max_context", None)
    if limit is None or len(context) + len(answer) <= limit:
        return context, answer
    return context[-(limit - len(answer)) :], answer


def summarize(results: list[dict]) -> dict:
    n = len(results)
    pairs = [(r["logp_direct"], q) for r in results for q in r["logp_paraphrases"]]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return {
        "n": n,
        "logp_direct": mean(r["logp_direct"] for r in results),
        "logp_with_trace": mean(r["logp_with_trace"] for r in results),
        "trace_helps": mean(r["logp_with_trace"] > r["logp_direct"] for r in results),
        "accuracy_direct": mean(r["correct_direct"] for r in results),
        "accuracy_reasoning": mean(r["correct_reasoning"] for r in results),
        "mixed_languages": mean(r["mixed_languages"] for r in results),
        "paraphrase_pairs": len(pairs),
        "paraphrase_abs_diff": mean(abs(a - b) for a, b in pairs),
        "items": results,
    }

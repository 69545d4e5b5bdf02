"""`eval cot` and the verifiable tasks: the log-probabilities it reports are the model's own
(checked against a direct forward pass), rewards and formats read replies as `eval tasks` does,
and task files are checked row by row."""

import json

import pytest
import torch

from lmstack.data.chat import add_chat_tokens
from lmstack.errors import LmstackError
from lmstack.evaluation import cot
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers.char import CharTokenizer


@pytest.fixture(scope="module")
def model_and_tok():
    tok = CharTokenizer.train(
        ["0123456789 +-*=:?.\nAnswer Tom has apples buys more How many does now 小明有个苹果"], special_tokens=("<|endoftext|>",)
    )
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32)).eval()
    return model, tok


def direct_logp(model, context, continuation):
    ids = torch.tensor([context + continuation])
    return model.token_logprobs(ids)[0, len(context) - 1 :].sum().item()


def test_reported_logprobs_are_the_models_own(model_and_tok):
    model, tok = model_and_tok
    items = [
        cot.Item("Tom has 3 apples. How many?", 3.0, ["Tom has 3 apples. How many does Tom have now?"]),
        cot.Item("小明有5个苹果。", 5.0),
    ]
    res = cot.chain_of_thought(model, tok, items, max_new_tokens=10, temperature=1.0, seed=1)
    assert res["n"] == 2 and res["paraphrase_pairs"] == 1
    for it, r in zip(items, res["items"]):
        q = cot.question_ids(tok, it.question)
        a = tok.encode(cot.answer_text(it.answer))
        assert r["logp_direct"] == pytest.approx(direct_logp(model, q, a), abs=1e-4)
        assert r["logp_with_trace"] == pytest.approx(direct_logp(model, q + tok.encode(r["trace"]), a), abs=1e-4)
    para = direct_logp(model, cot.question_ids(tok, items[0].paraphrases[0]), tok.encode("Answer: 3"))
    assert res["items"][0]["logp_paraphrases"] == [pytest.approx(para, abs=1e-4)]
    assert res["paraphrase_abs_diff"] == pytest.approx(abs(para - res["items"][0]["logp_direct"]), abs=1e-4)
    assert res["trace_helps"] == sum(r["logp_with_trace"] > r["logp_direct"] for r in res["items"]) / 2


def test_prompts_use_the_chat_format_when_there_is_one(model_and_tok):
    _, tok = model_and_tok
    assert tok.decode(cot.question_ids(tok, "1+1?")) == "<|user|>1+1?<|end|><|assistant|>"
    assert cot.reply_config(tok, 5).stop == ("<|end|>",)
    plain = CharTokenizer.train(["Question: 1+1?\nAnswer"], special_tokens=("<|endoftext|>",))
    assert plain.decode(cot.question_ids(plain, "1+1?")) == "Question: 1+1?\nAnswer: "


def test_rewards_read_answers_like_eval_tasks():
    good = "buys 5: 7 + 5 = 12\nAnswer: 12"
    assert cot.reward(good, 12) == 1 and cot.reward(good, 12, format_weight=0.5) == 1.5
    assert cot.reward("Answer: 12", 12, 0.5) == 1  # right, but no reasoning before the answer
    assert cot.reward("7 + 5 = 12\nAnswer: 13", 12, 0.5) == 0.5  # well formed, wrong
    assert cot.reward("6 * 7 = 42\n#### 42", 42) == 1 and cot.well_formed("6 * 7 = 42\n#### 42")
    assert cot.reward("no number", 3) == 0
    assert cot.answer_text(12.0) == "Answer: 12" and cot.answer_text(2.5) == "Answer: 2.5"
    assert cot.trace_of(good) == "buys 5: 7 + 5 = 12\n"
    assert cot.mixes_languages("买5个: buys 7 + 5 = 12") and not cot.mixes_languages("买5个：7 + 5 = 12")


def test_task_files_are_checked_row_by_row(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(
        json.dumps({"question": "q1", "answer": "so 3 #### 3", "paraphrases": ["q1b"]})
        + "\n"
        + json.dumps({"question": "q2", "answer": 4})
        + "\n"
    )
    items = cot.load_task(str(f))
    assert [(i.question, i.answer, i.paraphrases) for i in items] == [("q1", 3.0, ["q1b"]), ("q2", 4.0, [])]
    f.write_text(json.dumps({"question": "q1", "answer": 1}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(LmstackError, match=r"t.jsonl:2: missing field\(s\) \['answer'\]"):
        cot.load_task(str(f))
    f.write_text(json.dumps({"question": "q1", "answer": 1, "paraphrases": "q1b"}) + "\n")
    with pytest.raises(LmstackError, match="item 1: 'paraphrases' must be a list"):
        cot.load_task(str(f))
    with pytest.raises(LmstackError, match="unknown task 'mnist'"):
        cot.load_task("mnist")
    arith = cot.load_task("arithmetic", "test", n=5, seed=2, lang="zh")
    assert len(arith) == 5 and all(i.paraphrases for i in arith)


def test_named_tasks_read_the_shared_files(shared, monkeypatch):
    monkeypatch.setenv("LMSTACK_SHARED", str(shared))
    gsm = cot.load_task("gsm8k", "test", n=3)
    assert len(gsm) == 3 and gsm[0].answer == 18.0
    assert len(cot.load_task("svamp", n=2)) == 2
    monkeypatch.setenv("LMSTACK_SHARED", "/nonexistent")
    monkeypatch.chdir("/")
    with pytest.raises(LmstackError, match="pass the file's path"):
        cot.load_task("svamp")


def test_cli_prints_the_summary(model_and_tok, tmp_path, lmstack_cli):
    model, tok = model_and_tok
    model.save(tmp_path / "m", tok)
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "Tom has 3 apples.", "answer": 3, "paraphrases": ["Tom has 3."]}) + "\n")
    out = lmstack_cli("eval", "cot", "--model", tmp_path / "m", "--task", f, "--max-tokens", 4, "--json")
    res = json.loads(out)
    assert res["n"] == 1 and res["paraphrase_pairs"] == 1 and set(res["items"][0]) >= {"logp_direct", "logp_with_trace"}

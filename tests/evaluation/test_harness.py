"""The lm-evaluation-harness adapter on small local tasks: lm-eval's numbers equal lmstack's own."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lmstack.evaluation.harness import LmstackLM  # noqa: E402
from lmstack.evaluation.scoring import score_text, token_scores  # noqa: E402
from lmstack.evaluation.tasks import Choice, multiple_choice  # noqa: E402
from lmstack.generation import GenerationConfig, generate  # noqa: E402
from lmstack.models.gpt import GPT, GPTConfig  # noqa: E402
from lmstack.tokenizers.char import CharTokenizer  # noqa: E402

ITEMS = [
    {"question": "What is red?", "choices": ["a fox", "the sky", "blood"], "answer": 2},
    {"question": "Which is a number?", "choices": ["seven", "blue"], "answer": 0},
    {"question": "Who sat on the mat?", "choices": ["the cat", "a very small dog", "nobody"], "answer": 0},
    {"question": "Pick one", "choices": ["yes", "no"], "answer": 1},
]


@pytest.fixture(scope="module")
def lm():
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ?:\n"], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a random model with opinions, so the choices differ
    return LmstackLM(model=model, tokenizer=tok, batch_size=3)


def write_task(folder, name, output_type, extra):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f'output_type: {output_type}\ndoc_to_text: "Question: {{{{question}}}}\\nAnswer:"\n{extra}'
    )


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(
        folder,
        "lmstack_toy_mc",
        "multiple_choice",
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    )
    write_task(
        folder,
        "lmstack_toy_gen",
        "generate_until",
        'doc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
    )
    return folder


@pytest.fixture(scope="module")
def evaluated(lm, task_folder):
    """lm-eval's own run of two local tasks (one call: building tasks is the slow part). Its task
    index holds the local folder alone: indexing lm-eval's thousands of own tasks took ~15 s."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=["lmstack_toy_mc", "lmstack_toy_gen"],
            log_samples=True,
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        )


def test_multiple_choice_accuracy_equals_lmstacks_own(lm, evaluated):
    results = evaluated["results"]["lmstack_toy_mc"]
    ours = multiple_choice(lm.model, lm.tok, [Choice(r["question"], r["choices"], r["answer"]) for r in ITEMS])
    assert results["acc,none"] == pytest.approx(ours["acc"])
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_generate_until_equals_lmstack_generate(lm, evaluated):
    samples = sorted(evaluated["samples"]["lmstack_toy_gen"], key=lambda s: s["doc_id"])
    prompts = [f"Question: {r['question']}\nAnswer:" for r in ITEMS]
    ours = generate(lm.model, lm.tok, prompts, GenerationConfig(max_new_tokens=12, temperature=0, stop=("\n",)))
    assert [s["resps"][0][0] for s in samples] == [g.text for g in ours]
    assert any(g.text for g in ours)


def test_rolling_loglikelihood_is_the_documents_log_probability(lm):
    short = "the cat sat on the mat"
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)  # longer than the 64-token context
    [lp_short, lp_long] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long)])
    assert lp_short == pytest.approx(score_text(lm.model, lm.tok, short, top=0)["logprob"], abs=1e-4)
    # Disjoint windows of the 64-token context: each token is scored once, after up to 64 tokens.
    ids, eot = lm.tok.encode(long), lm.tok.eot_id
    expected = sum(t.logprob for t in token_scores(lm.model, [eot] + ids[:64]))
    for start in range(64, len(ids), 64):
        end = min(start + 64, len(ids))
        expected += sum(t.logprob for t in token_scores(lm.model, ids[end - 65 : end], start=65 - (end - start)))
    assert len(ids) > 128 and lp_long == pytest.approx(expected, abs=1e-3)


def test_harness_command_runs_local_tasks_on_a_checkpoint(lm, evaluated, task_folder, tmp_path, lmstack_cli, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm.model.save(tmp_path / "ckpt", lm.tok)
    out = json.loads(
        lmstack_cli(
            "eval",
            "harness",
            "--model",
            tmp_path / "ckpt",
            "--tasks",
            "lmstack_toy_mc",
            "--include-path",
            task_folder,
            "--batch-size",
            "2",
            "--json",
        )
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert out["results"]["lmstack_toy_mc"][metric] == evaluated["results"]["lmstack_toy_mc"][metric]


def test_harness_command_names_an_unknown_task(lm, task_folder, tmp_path, capsys):
    from lmstack.cli import main

    lm.model.save(tmp_path / "ckpt", lm.tok)
    code = main(
        ["eval", "harness", "--model", str(tmp_path / "ckpt"), "--tasks", "no_such_task", "--include-path", str(task_folder)]
    )
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "no_such_task" in err and err.count("\n") == 1


def test_generate_until_keeps_the_end_of_a_context_longer_than_the_model(lm):
    from lmstack.generation import generate_tokens

    context = " ".join(["the quick brown fox jumps over the lazy dog"] * 3) + "\nAnswer:"  # > 64 tokens
    [got] = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 8}), 0)])
    ids = lm.tok.encode(context)
    [want] = generate_tokens(
        lm.model, [ids[-(64 - 8) :]], GenerationConfig(max_new_tokens=8, temperature=0, stop=("\n",)), lm.tok
    )
    assert len(ids) > 64 and got == want.text

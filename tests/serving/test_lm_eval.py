"""lm-evaluation-harness's `local-completions` model against a live server gives the numbers of
`lmstack eval harness` on the same checkpoint: its log-likelihood requests (echo + logprobs) are
answered with lmstack's scoring, its tokenizer is the server's (/tokenize, /tokenizer_info)."""

import json

import pytest

from lmstack.generation.scheduler import Scheduler
from lmstack.models.checkpoint import load_for_text
from lmstack.serving.app import create_app, serve_in_thread

from .conftest import tiny_gpt

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (the test extra)")

ITEMS = [
    {"question": "Who sat on the mat?", "choices": ["the cat", "a dog", "nobody"], "answer": 0},
    {"question": "What is wet?", "choices": ["the sea", "the sun"], "answer": 0},
    {"question": "Pick one", "choices": ["yes", "no", "maybe"], "answer": 1},
]


@pytest.mark.slow  # `eval harness` indexes all of lm-eval's tasks (~20 s on 2 cores)
def test_local_completions_equals_lmstack_eval_harness(tmp_path, lmstack_cli, monkeypatch):
    import lm_eval.models.openai_completions  # noqa: F401 (registers local-completions)
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_gpt()
    model.save(tmp_path / "tiny", tok)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (tmp_path / "toy.yaml").write_text(
        f"task: lmstack_serve_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    ours = json.loads(
        lmstack_cli(
            "eval", "harness", "--model", tmp_path / "tiny", "--tasks", "lmstack_serve_toy", "--include-path", tmp_path, "--json"
        )
    )["results"]["lmstack_serve_toy"]
    served, served_tok = load_for_text(tmp_path / "tiny")
    app = create_app(served, served_tok, Scheduler(served, served_tok, max_batch=8), name="tiny")
    with serve_in_thread(app) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={url}/v1/completions",
            tasks=["lmstack_serve_toy"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),  # the toy task alone: ~15 s less
            log_samples=True,
        )
    theirs = out["results"]["lmstack_serve_toy"]
    assert theirs["acc,none"] == pytest.approx(ours["acc,none"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm,none"])
    # and each choice's log-likelihood is lmstack's
    from lm_eval.api.instance import Instance

    from lmstack.evaluation.harness import LmstackLM

    lm = LmstackLM(model=served, tokenizer=served_tok)
    assert len(out["samples"]["lmstack_serve_toy"]) == len(ITEMS)
    for s in out["samples"]["lmstack_serve_toy"]:
        requests = (
            [Instance("loglikelihood", {}, tuple(a), 0) for a in s["arguments"].values()]
            if isinstance(s["arguments"], dict)
            else [Instance("loglikelihood", {}, tuple(a), 0) for a in s["arguments"]]
        )
        want = [lp for lp, _ in lm.loglikelihood(requests)]
        got = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]]
        assert got == pytest.approx(want, abs=1e-4)

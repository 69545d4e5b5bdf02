"""`lmstack eval perplexity | compare | tasks` on tiny checkpoints of every family."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.evaluation.perplexity import stream_perplexity

TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A char-level GPT (context 64), RNN, BERT and T5, and a word 2-gram, trained on nothing: the
    numbers are checked against the library, not against quality."""
    from lmstack.models.bert import BERT, BERTConfig
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.models.ngram import NGramLM
    from lmstack.models.rnn import RNNLM, RNNConfig
    from lmstack.models.t5 import T5, T5Config
    from lmstack.tokenizers.char import CharTokenizer

    d = tmp_path_factory.mktemp("ckpts")
    (d / "test.txt").write_text(TEXT, encoding="utf-8")
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>", "<|mask|>"))
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).save(d / "gpt", tok)
    RNNLM(RNNConfig.preset("tiny", vocab_size=tok.vocab_size)).save(d / "rnn", tok)
    mask = tok.special_id("<|mask|>")
    BERT(
        BERTConfig.preset(
            "tiny",
            vocab_size=tok.vocab_size,
            max_position=16,
            mask_token_id=mask,
            cls_token_id=tok.eot_id,
            sep_token_id=tok.eot_id,
        )
    ).save(d / "bert", tok)
    NGramLM.train_texts(TEXT.splitlines() * 2, order=2, discount_fallback=True).save(d / "ngram")
    T5(T5Config.preset("tiny", vocab_size=tok.vocab_size)).save(d / "t5", tok)
    return d


def test_perplexity_of_a_gpt_is_stream_mode_with_every_field(lmstack_cli, ckpts):
    import lmstack

    got = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "gpt", ckpts / "test.txt", "--json", "--stride", "16"))
    model, tok = lmstack.load(ckpts / "gpt")
    want = stream_perplexity(model, [TEXT], tok.encode, tok.eot_id, context=64, stride=16)
    assert got["mode"] == "stream" and got["context"] == 64 and got["stride"] == 16
    for key in ("tokens", "nats", "perplexity", "perplexity_per_word", "bits_per_byte", "bytes", "words"):
        assert got[key] == pytest.approx(want.to_dict()[key], rel=1e-6), key
    assert got["tokens"] == len(TEXT) + 1 and got["bytes"] == len(TEXT) and got["words"] == 17 + 3
    assert got["tokens_per_s"] > 0


def test_rnn_is_scored_with_the_default_window(lmstack_cli, ckpts):
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "rnn", "--data", ckpts / "test.txt", "--json"))
    assert got["mode"] == "stream" and got["context"] == 1024 and got["stride"] == 512
    assert got["bits_per_byte"] == pytest.approx(got["nats"] / math.log(2) / len(TEXT))


def test_ngram_keeps_kenlm_lines_mode_with_per_word_figures(lmstack_cli, ckpts):
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "ngram", ckpts / "test.txt", "--json"))
    assert got["mode"] == "lines" and got["tokens"] == got["words"] == 20
    assert got["perplexity_per_word"] == pytest.approx(got["perplexity"])


def test_t5_scores_each_line_as_a_target(lmstack_cli, ckpts):
    import lmstack
    from lmstack.evaluation.perplexity import measure

    got = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "t5", ckpts / "test.txt", "--json"))
    model, tok = lmstack.load(ckpts / "t5")
    assert got["mode"] == "lines" and got["tokens"] == len(TEXT)  # characters, and </s> for each newline
    assert got["bits_per_byte"] == pytest.approx(measure(model, tok, [TEXT]).bits_per_byte, rel=1e-6)


def test_bert_reports_pseudo_perplexity_from_its_pseudo_log_likelihood(lmstack_cli, ckpts):
    import lmstack

    got = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "bert", ckpts / "test.txt", "--json"))
    model, tok = lmstack.load(ckpts / "bert")
    pll, n = 0.0, 0
    for line in TEXT.splitlines():  # lines of 22, 22 and 15 chars: 14 + 8, 14 + 8, 14 + 1 (context 16)
        ids = tok.encode(line)
        n += len(ids)
        for i in range(0, len(ids), 14):
            pll += float(model.pseudo_log_likelihood(torch.tensor([[tok.eot_id, *ids[i : i + 14], tok.eot_id]]))[0])
    assert got["mode"] == "pseudo" and got["tokens"] == n
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(-pll / n), rel=1e-5)
    assert got["perplexity"] is None and "Salazar" in got["note"]


def test_compare_prints_one_aligned_row_per_model(lmstack_cli, ckpts):
    models = [ckpts / "ngram", ckpts / "rnn", ckpts / "gpt", ckpts / "t5"]
    rows = json.loads(lmstack_cli("eval", "compare", "--models", *models, "--data", ckpts / "test.txt", "--json"))
    assert [r["mode"] for r in rows] == ["lines", "stream", "stream", "lines"]
    assert all(r["bytes"] == len(TEXT) and r["parameters"] > 0 for r in rows)
    single = json.loads(lmstack_cli("eval", "perplexity", "--model", ckpts / "rnn", ckpts / "test.txt", "--json"))
    assert rows[1]["bits_per_byte"] == pytest.approx(single["bits_per_byte"])
    table = lmstack_cli("eval", "compare", "--models", *models, "--data", ckpts / "test.txt").splitlines()
    assert len(table) == 5 and table[0].split()[:3] == ["model", "mode", "bits/byte"]
    assert len({len(line) for line in table}) == 1  # aligned columns
    assert f"{rows[2]['bits_per_byte']:.4f}" in table[3]


def test_tasks_multiple_choice(lmstack_cli, ckpts, tmp_path):
    import lmstack
    from lmstack.evaluation.tasks import load_multiple_choice, multiple_choice

    f = tmp_path / "mc.jsonl"
    f.write_text(
        "".join(
            json.dumps({"question": q, "choices": ["mat", "log", "dog"], "answer": a}) + "\n"
            for q, a in (("the cat sat on the", 0), ("the dog sat on the", 1), ("a cat and a", 2))
        )
    )
    got = json.loads(lmstack_cli("eval", "tasks", "--model", ckpts / "gpt", "--kind", "mc", "--file", f, "--json"))
    model, tok = lmstack.load(ckpts / "gpt")
    want = multiple_choice(model, tok, load_multiple_choice(f))
    assert got["n"] == 3 and got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"]
    for g, w in zip(got["items"], want["items"]):
        assert g["logprobs"] == pytest.approx(w["logprobs"], rel=1e-6)


def test_tasks_numeric_matches_the_library(lmstack_cli, ckpts, tmp_path):
    import lmstack
    from lmstack.evaluation.tasks import run

    f = tmp_path / "q.jsonl"  # short questions: the char-level GPT reads 64 characters
    f.write_text(
        '{"question": "1+1?", "answer": 2}\n{"question": "2+2?", "answer": "so #### 4"}\n{"question": "3+3?", "answer": 6}\n'
    )
    args = (
        "--model",
        ckpts / "gpt",
        "--kind",
        "numeric",
        "--file",
        f,
        "--shots-file",
        f,
        "--shots",
        "1",
        "--limit",
        "2",
        "--max-tokens",
        "5",
        "--batch-size",
        "1",
    )
    got = json.loads(lmstack_cli("eval", "tasks", *args, "--json"))
    model, tok = lmstack.load(ckpts / "gpt")
    want = run("numeric", model, tok, f, limit=2, shots_path=f, shots=1, max_new_tokens=5, batch_size=1)
    assert got["n"] == 2 and [i["output"] for i in got["items"]] == [i["output"] for i in want["items"]]
    assert got["exact_match"] == want["exact_match"]
    assert lmstack_cli("eval", "tasks", *args).startswith("exact_match ")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["perplexity", "--model", "{gpt}", "{text}", "--context", "65"], "--context 65"),
        (["perplexity", "--model", "{gpt}", "{empty}"], "empty"),
        (["perplexity", "--model", "{gpt}"], "no text to score"),
        (["perplexity", "--model", "{ngram}", "{text}", "--mode", "stream"], "--mode lines"),
        (["perplexity", "--model", "{ngram}", "{text}", "--context", "8"], "--mode stream only"),
        (["perplexity", "--model", "{gpt}", "{text}", "--mode", "pseudo"], "--mode stream"),
        (["compare", "--models", "{gpt}", "{tmp}/nope", "--data", "{text}"], "nope: no such checkpoint"),
        (["tasks", "--model", "{gpt}", "--kind", "numeric", "--file", "{text}", "--shots", "2"], "--shots-file"),
    ],
)
def test_bad_input_is_one_line(cli, ckpts, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("")
    paths = {
        "gpt": ckpts / "gpt",
        "ngram": ckpts / "ngram",
        "text": ckpts / "test.txt",
        "empty": tmp_path / "empty.txt",
        "tmp": tmp_path,
    }
    proc = cli("eval", *[a.format(**paths) for a in args])
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr

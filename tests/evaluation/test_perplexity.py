"""Perplexity on the LM contract: KenLM's counting, OOV handling, bits per byte, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.evaluation.perplexity import perplexity
from lmstack.models.base import LanguageModel
from lmstack.models.ngram import NGramLM


class Uniform(LanguageModel):
    """p(next) = 1/V for every token: perplexity is V whatever the text."""

    def __init__(self, V: int):
        self.vocab_size = V

    def next_token_logprobs(self, tokens):
        return torch.full((*tokens.shape, self.vocab_size), -math.log(self.vocab_size), dtype=torch.float64)

    def start(self, prompt):  # pragma: no cover - not used here
        raise NotImplementedError

    def step(self, state, tokens):  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
def lmstack_cli(capsys, monkeypatch):
    """Run `lmstack ARGS...` in this process (no torch import per call); returns (code, stdout)."""
    from lmstack.cli import main

    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    return run


def _encode(line: str) -> list[int]:
    return [3 + (ord(c) % 7) if c != "?" else 0 for c in line.replace(" ", "")]


def test_counts_tokens_as_kenlm_and_uniform_model_has_perplexity_v():
    lines = ["ab c\n", "\n", "defg\n"]
    res = perplexity(Uniform(10), lines, _encode, bos=1, eos=2, unk=0)
    assert res.lines == 3
    assert res.tokens == (3 + 1) + (0 + 1) + (4 + 1)  # words plus one </s> per line, no <s>
    assert res.perplexity == pytest.approx(10.0)
    assert res.bytes == 5 + 1 + 5
    assert res.bits_per_byte == pytest.approx(res.tokens * math.log2(10) / res.bytes)


def test_oovs_are_scored_and_excluded_on_request():
    model = NGramLM.train_texts(["a b c", "a c b", "b b a"], order=2, discount_fallback=True)
    enc = model.encode
    res = perplexity(model, ["a zz b", "yy"], enc, model.bos_id, model.eos_id, model.unk_id)
    assert res.oovs == 2 and res.tokens == 6
    lp = [model.token_logprobs(torch.tensor([[model.bos_id, *enc(s), model.eos_id]]))[0] / math.log(10)
          for s in ("a zz b", "yy")]
    total = float(sum(x.sum() for x in lp))
    oov = float(lp[0][1] + lp[1][0])
    assert res.log10_prob == pytest.approx(total)
    assert res.perplexity == pytest.approx(10 ** (-total / 6))
    assert res.perplexity_excluding_oovs == pytest.approx(10 ** (-(total - oov) / 4))


def test_batching_does_not_change_the_result():
    model = NGramLM.train_texts(["a b c d", "d c b a", "a a b"], order=3, discount_fallback=True)
    lines = ["a b", "c d a b c", "", "b", "a a a a a a a"] * 5
    args = (model.encode, model.bos_id, model.eos_id, model.unk_id)
    one = perplexity(model, lines, *args, max_batch_tokens=1)
    many = perplexity(model, lines, *args, max_batch_tokens=1 << 20)
    for key in ("tokens", "oovs", "bytes", "log10_prob", "perplexity", "perplexity_excluding_oovs", "bits_per_byte"):
        assert one.to_dict()[key] == pytest.approx(many.to_dict()[key]), key


def test_cli_prints_one_json_object(lmstack_cli, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the cat sat\nthe dog sat\na cat ran\nthe cat ran\n" * 3, encoding="utf-8")
    test = tmp_path / "test.txt"
    test.write_text("the cat sat\na bird sat\n", encoding="utf-8")
    lmstack_cli("ngram", "train", train, "--order", "2", "--out", tmp_path / "m", "--discount-fallback")
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m", test, "--json"))
    model = NGramLM.load(tmp_path / "m")
    want = perplexity(model, ["the cat sat", "a bird sat"], model.encode, model.bos_id, model.eos_id, model.unk_id)
    for key in ("tokens", "oovs", "log10_prob", "perplexity", "perplexity_excluding_oovs", "bits_per_byte"):
        assert got[key] == pytest.approx(want.to_dict()[key]), key
    assert got["tokens"] == 8 and got["oovs"] == 1
    # the bare ARPA file gives the same numbers
    arpa = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m" / "model.arpa", test, "--json"))
    assert arpa["perplexity"] == pytest.approx(got["perplexity"], rel=1e-7)


def test_subword_model_reports_bits_per_byte(lmstack_cli, tmp_path):
    from lmstack.tokenizers.char import CharTokenizer

    text = "hello world\nhold the door\nhello there\n"
    CharTokenizer.train([text]).save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    lmstack_cli("ngram", "train", tmp_path / "c.txt", "--order", "3", "--out", tmp_path / "m",
                "--tokenizer", tmp_path / "tok", "--discount-fallback")
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m", tmp_path / "c.txt", "--json"))
    assert got["bytes"] == len(text.encode()) and got["tokens"] == len(text)  # one token per char (+ </s> per newline)
    assert got["bits_per_byte"] == pytest.approx(-got["log10_prob"] * math.log2(10) / got["bytes"])


def test_cli_bad_inputs_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe oops\n")
    arpa = tmp_path / "broken.arpa"
    arpa.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1\ta\n\n\\end\\\n", encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("a\n", encoding="utf-8")
    for args, needle in ((["--model", arpa, bad], "UTF-8"), (["--model", arpa, good], "broken.arpa:6")):
        proc = cli("eval", "perplexity", *args)
        assert proc.returncode != 0 and proc.stdout == ""
        assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1 and needle in proc.stderr

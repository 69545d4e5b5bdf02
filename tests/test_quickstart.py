"""`lmstack quickstart` end to end at a tiny scale (English and Chinese), its determinism, and its
one-line errors on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack import quickstart
from lmstack.cli import main
from lmstack.evaluation.compare import compare
from lmstack.quickstart import SAMPLING, Row, shipped_corpus, split_corpus

MODELS = ["word 5-gram", "subword 5-gram", "LSTM", "GPT"]
TINY = "0.05"  # --minutes: 4 LSTM and 40 GPT steps
REPORT_SECTIONS = [
    "**What each model was given.**",
    "## The table",
    "## Samples",
    "## A held-out sentence",
    "## Time and machine",
    "## Files",
]


def _head(source: Path, lines: int, path: Path) -> Path:
    path.write_text("\n".join(source.read_text(encoding="utf-8").splitlines()[:lines]) + "\n", encoding="utf-8")
    return path


def _quickstart(corpus: Path, out: Path, *args: str) -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "quickstart", "--corpus", str(corpus), "--out", str(out), "--minutes", TINY]
        + ["--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "LMSTACK_NO_PROGRESS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    return _head(shipped_corpus(), 3000, tmp_path_factory.mktemp("corpus") / "small.txt")


@pytest.fixture(scope="module")
def english(small_corpus, tmp_path_factory):
    """One tiny quickstart on 3,000 lines of Tiny Shakespeare."""
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    return (out, *_quickstart(small_corpus, out))


@pytest.fixture(scope="module")
def chinese(shared, tmp_path_factory):
    """One tiny quickstart on 1,000 lines of Tang poems: text without spaces."""
    root = tmp_path_factory.mktemp("zh")
    corpus = _head(shared / "data" / "zh_tang_poems.txt", 1000, root / "tang.txt")
    return (root / "out", *_quickstart(corpus, root / "out"))


def check_run(out: Path, stdout: str, results: dict, unit: str) -> None:
    """Every artifact and every table field of one run."""
    assert [r["model"] for r in results["table"]] == MODELS
    assert results["unit"] == unit
    for row in results["table"]:
        assert set(row) == set(Row.__dataclass_fields__)
        assert 0 < row["bits_per_byte"] < 8, row
        assert 1 < row["ppl_token"] < 1e4 and 1 < row["ppl_unit"] < 1e9, row  # per word or character: not 1e107
        assert row["params"] > 0 and row["train_tokens"] > 0 and row["tokens"] > 0 and 0 <= row["oovs"] < row["tokens"]
        assert row["mode"] == ("lines" if "gram" in row["model"] else "stream")
        assert (out / row["path"] / "config.json").exists()
        assert row["model"] in stdout
    rows = {r["model"]: r for r in results["table"]}
    steps = quickstart.scaled_steps(float(TINY))
    assert rows["GPT"]["train_tokens"] == quickstart.neural_tokens("gpt", steps["gpt"])
    assert rows["subword 5-gram"]["train_tokens"] == results["train_text_tokens"]
    assert results["best"] == min(rows.values(), key=lambda r: r["bits_per_byte"])["model"]
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in REPORT_SECTIONS:
        assert heading in report
    assert f"ppl/{unit}" in report and "| GPT |" in report and f"The {results['best']} is best" in report
    assert f"{results['given']['GPT']['steps']:,} steps" in report and f"{rows['GPT']['params']:,} parameters" in report
    assert results["machine"]["cpu"] in report and results["machine"]["torch"] in report
    assert set(results["seconds"]) >= {"BPE tokenizer", "LSTM", "GPT", "scoring", "samples", "total"}

    assert set(results["samples"]) == set(MODELS)
    for texts in results["samples"].values():
        assert list(texts) == list(SAMPLING)
        for text in texts.values():
            assert text.startswith(results["prompt"]) and not text.endswith("\ufffd")
            assert f"```text\n{text}\n```" in report
    for scores in results["sentences"]["log2"].values():
        assert all(math.isfinite(v) and v < 0 for v in (scores["grammatical"], scores["scrambled"]))

    if importlib_has("matplotlib"):
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and results["curves"]
        assert "![training curves](curves.png)" in report


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_english_run_writes_every_artifact(english):
    out, stdout, results = english
    check_run(out, stdout, results, "word")
    sentence = results["sentences"]
    assert sorted(sentence["grammatical"].split()) == sorted(sentence["scrambled"].split())
    assert sentence["grammatical"] != sentence["scrambled"]
    word = results["samples"]["word 5-gram"]["temperature 1.0"]
    assert word.count("\n") >= 1  # an n-gram's sample runs on past its first end of line


def test_chinese_run_counts_characters_and_scores_chinese(chinese):
    out, stdout, results = chinese
    check_run(out, stdout, results, "character")
    sentence = results["sentences"]
    assert sorted(sentence["grammatical"]) == sorted(sentence["scrambled"])
    chars = sentence["grammatical"]
    assert any("\u4e00" <= c <= "\u9fff" for c in chars) and not any(c.isascii() for c in chars)  # not the English pair
    assert "mouse" not in (out / "report.md").read_text(encoding="utf-8")


def test_reported_numbers_are_eval_compare_on_the_saved_checkpoints(english, small_corpus, tmp_path):
    """The table is what `lmstack eval compare` gives the saved checkpoints on the held-out lines."""
    out, _, results = english
    heldout = split_corpus(small_corpus, tmp_path)["heldout"]
    rows = [r for r in results["table"] if r["model"] in ("word 5-gram", "GPT")]
    again = compare([out / r["path"] for r in rows], [heldout])
    for r, a in zip(rows, again):
        assert (r["mode"], r["tokens"], r["oovs"]) == (a["mode"], a["tokens"], a["oovs"])
        assert r["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-6)
        assert r["ppl_unit"] == pytest.approx(a["perplexity_per_word"], rel=1e-6)


@pytest.fixture
def torch_threads():
    """An in-process quickstart sets torch's thread count: put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # a second run, with more threads than a loaded machine gives
def test_same_seed_same_table_whatever_the_threads(english, small_corpus, tmp_path, monkeypatch, torch_threads):
    """The same command and seed give the same numbers however many threads the load leaves:
    training is counted in steps and runs on one thread; scoring and sampling are forward passes,
    the same on any number of threads."""
    out, _, first = english
    threads = first["machine"]["threads"]
    monkeypatch.setattr(quickstart, "cpu_threads", lambda: 3 - threads if threads <= 2 else 1)
    with contextlib.redirect_stdout(io.StringIO()):
        other = quickstart.run(small_corpus, tmp_path / "again", minutes=float(TINY), device="cpu")
    assert other["machine"]["threads"] != threads
    for key in ("table", "samples", "sentences", "gpt_final_bits_per_byte"):
        assert other[key] == first[key], key


def test_report_tells_a_gpt_win_and_its_surprises(english, tmp_path):
    """The story's other branch, as at the default settings: the GPT ahead of the n-grams after
    several passes over the text, and a model that prefers the scramble."""
    _, _, res = english
    res = json.loads(json.dumps(res))
    rows = {r["model"]: r for r in res["table"]}
    rows["GPT"]["bits_per_byte"] = 0.9 * rows["subword 5-gram"]["bits_per_byte"]
    res["given"]["GPT"]["tokens"] = 12 * res["train_text_tokens"]
    res["gpt_final_bits_per_byte"] = {"train": 1.9, "heldout": 2.2}
    res["sentences"]["log2"]["LSTM"] = {"grammatical": -60.0, "scrambled": -50.0}
    story = quickstart.story(res)
    assert "**The GPT is best**" in story and "The GPT is 10.0% below the best n-gram (subword 5-gram" in story
    assert "a gap of 0.300 after 12 passes over the training text" in story
    assert "The LSTM prefers the scrambled sentence (by 2^10.0)" in story
    quickstart.write_report(tmp_path, res)
    assert story in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_minutes_scale_the_steps():
    assert quickstart.scaled_steps(quickstart.DEFAULT_MINUTES) == quickstart.STEPS
    half = quickstart.scaled_steps(quickstart.DEFAULT_MINUTES / 2)
    assert half == {k: round(v / 2) for k, v in quickstart.STEPS.items()}
    assert min(quickstart.scaled_steps(1e-6).values()) == quickstart.MIN_STEPS


def test_text_without_spaces_is_detected():
    assert quickstart.is_spaced("the mouse ate the cheese\nand then it slept\n")
    assert not quickstart.is_spaced("秦川雄帝宅，函谷壯皇居。綺殿千尋起，離宮百雉餘。\n")


def test_sentence_is_the_users_or_a_held_out_line():
    heldout = ["ROMEO:", "But soft, what light through yonder window breaks?", "x"]
    good, bad = quickstart.sentence_pair(heldout, True, 1)
    assert good == heldout[1] and sorted(bad.split()) == sorted(good.split()) and bad != good
    assert quickstart.sentence_pair(heldout, True, 1, "the mouse ate the cheese")[0] == "the mouse ate the cheese"
    good, bad = quickstart.sentence_pair(["秦川雄帝宅，函谷壯皇居。綺殿千尋起。"], False, 1)
    assert good == "秦川雄帝宅，函谷壯皇居。" and sorted(bad) == sorted(good)


def test_samples_end_on_a_whole_character():
    from lmstack.tokenizers import EOT
    from lmstack.tokenizers.bpe import BPETokenizer

    tok = BPETokenizer.train(["秦川雄帝宅"] * 5, vocab_size=260, special_tokens=(EOT,))
    cut = tok.encode("秦川雄帝宅") + tok.encode("函")[:1]  # the first byte of a three-byte character
    assert tok.decode(cut).endswith("\ufffd")
    assert quickstart.whole_text(tok.decode(cut)) == "秦川雄帝宅"
    assert quickstart.whole_text("秦川\ufffd\n\n") == "秦川"


def test_failed_run_leaves_the_old_output(small_corpus, tmp_path, capsys):
    """Everything is staged beside --out, so a failed run leaves an earlier output as it was."""
    out = tmp_path / "qs"
    out.mkdir()
    (out / "results.json").write_text("{}", encoding="utf-8")  # an earlier quickstart's, which a success replaces
    assert main(["quickstart", "--corpus", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert (out / "results.json").read_text(encoding="utf-8") == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["qs"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 200, "binary"),
        (b"caf\xe9 au lait\n" * 400, "not valid UTF-8"),
        (b"only a few lines\n" * 5, "too small"),
    ],
    ids=["missing", "empty", "binary", "latin-1", "too-small"],
)
def test_bad_corpus_is_one_clear_error_before_any_training(tmp_path, capsys, monkeypatch, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    out = tmp_path / "out"
    monkeypatch.setattr(quickstart, "train_tokenizer", lambda *a: pytest.fail("training started"))
    assert main(["quickstart", "--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err and str(corpus) in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message", [(["--minutes", "0"], "--minutes"), (["--sentence", " "], "--sentence")], ids=["minutes", "sentence"]
)
def test_bad_options_are_one_clear_error(tmp_path, capsys, args, message):
    assert main(["quickstart", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

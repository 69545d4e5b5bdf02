"""`lmstack quickstart` end to end on a small budget, and its one-line errors on bad corpora."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.evaluation.compare import compare
from lmstack.quickstart import SAMPLING, SENTENCES, shipped_corpus, split_corpus

MODELS = ["word 5-gram", "subword 5-gram", "LSTM", "GPT"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    lines = shipped_corpus().read_text(encoding="utf-8").splitlines()[:3000]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(small_corpus, tmp_path_factory):
    """One quickstart run: half a minute of training on 3,000 lines of Tiny Shakespeare."""
    root = tmp_path_factory.mktemp("qs")
    out = root / "quickstart"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmstack.cli",
            "quickstart",
            "--corpus",
            str(small_corpus),
            "--out",
            str(out),
            "--minutes",
            "0.5",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LMSTACK_NO_PROGRESS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_writes_report_table_and_checkpoints(run):
    out, stdout, results = run
    assert [r["model"] for r in results["table"]] == MODELS
    for row in results["table"]:
        assert 0 < row["bits_per_byte"] < 8, row
        assert row["ppl_token"] > 1 and row["ppl_word"] > 1 and row["params"] > 0
        assert (out / row["path"] / "config.json").exists()
        assert row["model"] in stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| GPT |" in report and "bits/byte" in report
    open_vocabulary = [r for r in results["table"] if r["oovs"] == 0]
    assert results["best"] == min(open_vocabulary, key=lambda r: r["bits_per_byte"])["model"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_curves_png_when_matplotlib_is_installed(run):
    out, _, results = run
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["curves"]


def test_reported_numbers_are_eval_compare_on_the_saved_checkpoints(run, small_corpus, tmp_path):
    """The table is what `lmstack eval compare` gives the saved checkpoints on the held-out lines."""
    out, _, results = run
    heldout = split_corpus(small_corpus, tmp_path)["heldout"]
    rows = [r for r in results["table"] if r["model"] in ("word 5-gram", "GPT")]
    again = compare([out / r["path"] for r in rows], [heldout])
    for r, a in zip(rows, again):
        assert (r["mode"], r["tokens"], r["oovs"]) == (a["mode"], a["tokens"], a["oovs"])
        assert r["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-6)
        assert r["ppl_word"] == pytest.approx(a["perplexity_per_word"], rel=1e-6)
    assert [r["mode"] for r in rows] == ["lines", "stream"]


def test_samples_and_sentence_scores(run):
    _, _, results = run
    assert list(results["samples"]) == list(SAMPLING)
    for text in results["samples"].values():
        assert text.startswith(results["prompt"])
    assert set(results["sentences"]) == set(MODELS)
    for scores in results["sentences"].values():
        assert set(scores) == set(SENTENCES)
        assert all(math.isfinite(v) and v < 0 for v in scores.values())


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
        (b"caf\xe9 au lait\n" * 400, "not valid UTF-8"),
        (b"only a few lines\n" * 5, "too small"),
    ],
    ids=["missing", "empty", "latin-1", "too-small"],
)
def test_bad_corpus_is_one_clear_error(tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    out = tmp_path / "out"
    assert main(["quickstart", "--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err and str(corpus) in err
    assert not out.exists()


def test_minutes_must_be_positive(tmp_path, capsys):
    assert main(["quickstart", "--minutes", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--minutes" in capsys.readouterr().err

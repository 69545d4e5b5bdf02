"""ARPA reading as KenLM reads it: what it accepts, and one clear error with the line for the rest."""

from __future__ import annotations

import math

import pytest
import torch

import lmstack
from lmstack.errors import FormatError
from lmstack.models.ngram import BOS_ID, EOS_ID, UNK_ID, NGramLM

GOOD = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>\t0
0\t<s>\t-0.5
-0.6\t</s>\t0
-0.7\ta\t-0.2
-0.8\tb\t-0.3

\\2-grams:
-0.1\t<s> a
-0.2\ta b
-0.3\tb </s>

\\end\\
"""


def _write(tmp_path, text: str):
    p = tmp_path / "m.arpa"
    p.write_text(text, encoding="utf-8")
    return p


def _log10_scores(model, words: str):
    ids = torch.tensor([[BOS_ID, *model.encode(words), EOS_ID]])
    return (model.token_logprobs(ids)[0] / math.log(10)).tolist()


def test_scores_follow_the_back_off_rules(tmp_path):
    model = lmstack.load(_write(tmp_path, GOOD))[0]
    assert model.order == 2
    # <s> a: listed; a b: listed; b </s>: listed
    assert _log10_scores(model, "a b") == pytest.approx([-0.1, -0.2, -0.3])
    # <s> b: not listed -> bo(<s>) + p(b); b a -> bo(b) + p(a); a </s> -> bo(a) + p(</s>)
    assert _log10_scores(model, "b a") == pytest.approx([-0.5 - 0.8, -0.3 - 0.7, -0.2 - 0.6])
    # an unknown word scores as <unk>; nothing follows <unk>, whose back-off is 0
    assert _log10_scores(model, "zz a") == pytest.approx([-0.5 - 1.0, -0.7, -0.2 - 0.6])


def test_header_comments_spaces_crlf_and_missing_unk_are_accepted(tmp_path):
    text = "# made by hand\n" + GOOD.replace("-1.0\t<unk>\t0\n", "").replace("ngram 1=5", "ngram 1=4")
    text = text.replace("\t", " ").replace("\n", "\r\n")
    model = NGramLM.load(_write(tmp_path, text))
    assert model.vocab[:3] == ["<unk>", "<s>", "</s>"]
    assert model.tables[0].logp[UNK_ID] == -100.0  # as KenLM's build_binary -u
    assert _log10_scores(model, "a b") == pytest.approx([-0.1, -0.2, -0.3])


def test_positive_probability_is_clamped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="clamped"):
        model = NGramLM.load(_write(tmp_path, GOOD.replace("-0.2\ta b", "0.2\ta b")))
    assert _log10_scores(model, "a b")[1] == 0.0


@pytest.mark.parametrize(
    "edit, line, message",
    [
        (("\\data\\\n", ""), None, "no \\\\data\\\\ header"),
        (("ngram 2=3", "ngram 2=4"), 16, "has 3 entries but the header says 4"),
        (("ngram 2=3", "ngram 2=2"), 15, "more entries than"),
        (("-0.2\ta b", "-0.2\ta c"), 14, "'c' was not seen in the unigrams"),
        (("-0.2\ta b", "x\ta b"), 14, "not a number"),
        (("-0.2\ta b", "-0.2\ta b\t-0.4"), 14, "highest order"),
        (("-0.7\ta\t-0.2", "-0.7\ta\tnan"), 9, "not finite"),
        (("-0.7\ta\t-0.2", "-0.7\ta b c\t-0.2"), 9, "fields"),
        (("-0.3\tb </s>", "-0.3\ta b"), 15, "duplicate 2-gram"),
        (("\\end\\\n", ""), 16, "expected \\\\end\\\\.*end of the file"),
        (("\\end\\\n", "\\end\\\ntrailing\n"), 18, "only whitespace"),
        (("\\2-grams:", "\\3-grams:"), 12, "expected section"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, edit, line, message):
    path = _write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(FormatError, match=message) as e:
        NGramLM.load(path)
    if line is not None:
        assert f"m.arpa:{line}:" in str(e.value)


def test_missing_prefix_is_filled_in_as_kenlm_does(tmp_path):
    """`a b </s>` is listed but `a b` is not (a pruned file): the trigram still counts, and
    `a b` itself scores by back-off, bo(a) + p(b)."""
    text = (
        GOOD.replace("ngram 2=3", "ngram 2=2\nngram 3=1")
        .replace("-0.2\ta b\n", "")
        .replace("\\end\\", "\\3-grams:\n-0.05\ta b </s>\n\n\\end\\")
    )
    model = NGramLM.load(_write(tmp_path, text))
    assert _log10_scores(model, "a b") == pytest.approx([-0.1, -0.2 - 0.8, -0.05])
    assert _log10_scores(model, "b a b") == pytest.approx([-0.5 - 0.8, -0.3 - 0.7, -0.2 - 0.8, -0.05])
    # written back, the filled-in entry is an ordinary one and scores the same
    model.write_arpa(tmp_path / "again.arpa")
    again = NGramLM.load(tmp_path / "again.arpa")
    assert _log10_scores(again, "b a b") == pytest.approx(_log10_scores(model, "b a b"))


def test_binary_file_is_rejected(tmp_path):
    p = tmp_path / "m.arpa"
    p.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(FormatError, match="UTF-8"):
        NGramLM.load(p)


def test_eos_and_unk_ids_are_fixed(tmp_path):
    model = NGramLM.load(_write(tmp_path, GOOD))
    assert (model.vocab[UNK_ID], model.vocab[BOS_ID], model.vocab[EOS_ID]) == ("<unk>", "<s>", "</s>")

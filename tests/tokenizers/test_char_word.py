import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import FormatError, InputError
from lmstack.tokenizers import EOT, load_tokenizer
from lmstack.tokenizers.bpe import BPETokenizer
from lmstack.tokenizers.char import CharTokenizer
from lmstack.tokenizers.unigram import UnigramTokenizer
from lmstack.tokenizers.word import WordTokenizer

CHAR = CharTokenizer.train(["hello world\n"], special_tokens=(EOT,))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_char_roundtrip_any_string(s):
    assert CHAR.decode(CHAR.encode(s)) == s


def test_char_unseen_characters_use_byte_fallback():
    ids = CHAR.encode("h世")
    assert ids[0] == CHAR.encode("h")[0]
    assert len(ids) == 1 + 3  # three UTF-8 bytes
    assert CHAR.decode(ids) == "h世"


def test_special_tokens_only_when_allowed():
    text = f"hi{EOT}"
    plain = CHAR.encode(text)
    assert CHAR.special_id(EOT) not in plain
    assert CHAR.decode(plain) == text
    allowed = CHAR.encode(text, allowed_special="all")
    assert allowed[-1] == CHAR.special_id(EOT)
    assert CHAR.decode(allowed) == text


def test_char_vocab_size_without_room_for_a_character_is_an_error():
    with pytest.raises(InputError, match="use at least 257"):
        CharTokenizer.train(["abc"], vocab_size=10)
    # the special tokens take places too: the least size keeps one character
    with pytest.raises(InputError, match="use at least 258"):
        CharTokenizer.train(["abc"], vocab_size=257, special_tokens=("<|endoftext|>",))
    tok = CharTokenizer.train(["abc"], vocab_size=258, special_tokens=("<|endoftext|>",))
    assert tok.chars == ["a"] and tok.vocab_size == 258


def test_word_min_count_and_unk():
    tok = WordTokenizer.train(["the cat the dog\nthe end\n"], min_count=2)
    assert tok.decode(tok.encode("the cat\nthe")) == "the <unk>\nthe"


def test_word_roundtrip_of_normalised_known_text():
    text = "a b c\nb c a\n"
    tok = WordTokenizer.train([text])
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("a   b\tc")) == "a b c"


@pytest.mark.parametrize("tok", [CHAR, WordTokenizer.train(["x y z\n"], special_tokens=(EOT,))])
def test_save_load_roundtrip(tmp_path, tok):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert again.to_dict() == tok.to_dict()
    assert again.encode("x y 世", allowed_special="all") == tok.encode("x y 世", allowed_special="all")


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"kind": "char", "chars": ')
    with pytest.raises(FormatError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "char"}')
    with pytest.raises(FormatError, match="corrupt char tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "change,problem",
    [
        (dict(lmstack_tokenizer=99), "format version 99, but this lmstack reads version 1"),
        (dict(lmstack_tokenizer="1"), "format version '1'"),
        (dict(special_tokens=["<|endoftext|>"]), "'special_tokens' must map"),
        (dict(special_tokens={"": 40}), "'special_tokens' must map"),
    ],
)
def test_tokenizer_files_this_version_cannot_read_are_named(tmp_path, change, problem):
    (tmp_path / "tokenizer.json").write_text(json.dumps({**CHAR.to_dict(), **change}))
    with pytest.raises(FormatError, match=problem):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", [CharTokenizer, WordTokenizer, BPETokenizer, UnigramTokenizer])
def test_an_empty_special_token_is_refused(kind):
    """ "" would match between every two characters of a text encoded with specials allowed."""
    with pytest.raises(InputError, match="special tokens must be non-empty strings, got ''"):
        kind.train(["abc\n"], special_tokens=(EOT, ""))
    with pytest.raises(InputError, match="non-empty"):
        CHAR.add_special_tokens([""])
    assert "" not in CHAR.special_tokens


def test_cli_special_empty_is_one_clear_line(cli, tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n")
    r = cli("tokenizer", "train", tmp_path / "t.txt", "--kind", "char", "--special", "", "--out", tmp_path / "tok")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "non-empty" in r.stderr
    assert not (tmp_path / "tok").exists()

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import FormatError, InputError
from lmstack.tokenizers import EOT, load_tokenizer
from lmstack.tokenizers.char import CharTokenizer
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


def test_char_vocab_size_smaller_than_alphabet_is_an_error():
    with pytest.raises(InputError, match="smaller than"):
        CharTokenizer.train(["abc"], vocab_size=10)


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

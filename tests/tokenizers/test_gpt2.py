import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from lmstack.errors import FormatError
from lmstack.tokenizers import EOT
from lmstack.tokenizers.bpe import PATTERNS, BPETokenizer
from lmstack.tokenizers.gpt2 import load_gpt2


@pytest.fixture(scope="module")
def files(shared):
    d = shared / "fixtures" / "gpt2"
    return d / "encoder.json", d / "vocab.bpe"


@pytest.fixture(scope="module")
def gpt2(files):
    return load_gpt2(*files)


@pytest.fixture(scope="module")
def reference(files):
    """tiktoken's GPT-2 encoding, built offline from the same two files."""
    ranks = data_gym_to_mergeable_bpe_ranks(str(files[1]), str(files[0]))
    return tiktoken.Encoding("gpt2-files", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={EOT: 50256})


@pytest.mark.parametrize("corpus,n_chars", [("tinyshakespeare.txt", None), ("zh_tang_poems.txt", 300_000)])
@pytest.mark.parametrize("engine", ["python", "tiktoken"])
def test_ids_equal_tiktoken_gpt2(shared, gpt2, reference, corpus, n_chars, engine):
    text = (shared / "data" / corpus).read_text(encoding="utf-8")[:n_chars]
    tok = BPETokenizer(gpt2.tokens, gpt2.merges, gpt2.pattern, gpt2.special_tokens, engine=engine)
    ids = tok.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tok.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["python", "tiktoken"])
def test_ids_equal_tiktoken_gpt2_on_all_tang_poems(shared, gpt2, reference, engine):
    text = (shared / "data" / "zh_tang_poems.txt").read_text(encoding="utf-8")
    tok = BPETokenizer(gpt2.tokens, gpt2.merges, gpt2.pattern, gpt2.special_tokens, engine=engine)
    assert tok.encode(text) == reference.encode_ordinary(text)


def test_endoftext_is_the_special_token_50256(gpt2, reference):
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {EOT: 50256}
    text = f"The end.{EOT}Once upon a time"
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert 50256 not in gpt2.encode(text)


def test_mismatched_files_are_one_clear_error(tmp_path, files):
    lines = files[1].read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges out of order
    swapped = tmp_path / "vocab.bpe"
    swapped.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(FormatError, match="do not belong together"):
        load_gpt2(files[0], swapped)
    truncated = tmp_path / "encoder.json"
    truncated.write_text(files[0].read_text(encoding="utf-8")[:1000], encoding="utf-8")
    with pytest.raises(FormatError, match="corrupt"):
        load_gpt2(truncated, files[1])

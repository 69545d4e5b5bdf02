import json
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from lmstack.errors import FormatError, InputError
from lmstack.tokenizers import EOT, load_tokenizer
from lmstack.tokenizers import bpe as bpe_module
from lmstack.tokenizers.bpe import PATTERNS, BPETokenizer, count_file_chunks, to_bytelevel
from lmstack.tokenizers.pretokenize import PinnedRegex, _odd_chars, _ranges, pin_pattern

CORPORA = {"shakespeare": "tinyshakespeare.txt", "tang": "zh_tang_poems.txt"}


@pytest.fixture(scope="module")
def texts(shared):
    """First 200 KB of each corpus, as lines (each line is pre-tokenized on its own)."""
    return {k: (shared / "data" / f).read_text(encoding="utf-8")[:200_000] for k, f in CORPORA.items()}


def hf_merges(lines, vocab_size, pattern, min_frequency=0):
    """Merges learned by Hugging Face's BpeTrainer with a byte-level pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern == "gpt2")
    tok.pre_tokenizer = (
        byte_level
        if pattern == "gpt2"
        else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS[pattern]), "isolated"), byte_level])
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def our_merges(tok):
    return [(to_bytelevel(tok.tokens[a]), to_bytelevel(tok.tokens[b])) for a, b in tok.merges]


@pytest.mark.parametrize(
    "corpus,pattern,vocab_size",
    [
        ("shakespeare", "gpt2", 1000),
        ("tang", "gpt2", 2000),
        ("shakespeare", "gpt4", 1500),
        ("tang", "gpt4", 1500),
    ],
)
def test_merges_equal_huggingface_in_order(texts, corpus, pattern, vocab_size):
    lines = texts[corpus].splitlines(keepends=True)
    tok = BPETokenizer.train(lines, vocab_size, special_tokens=(EOT,), pattern=pattern)
    assert our_merges(tok) == hf_merges(lines, vocab_size, pattern)
    assert tok.vocab_size == vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("corpus,pattern", [("shakespeare", "gpt2"), ("tang", "gpt4")])
def test_merges_equal_huggingface_on_whole_corpora(shared, corpus, pattern):
    lines = (shared / "data" / CORPORA[corpus]).read_text(encoding="utf-8").splitlines(keepends=True)
    tok = BPETokenizer.train(lines, 8192, special_tokens=(EOT,), pattern=pattern)
    assert our_merges(tok) == hf_merges(lines, 8192, pattern)


def test_min_frequency_stops_like_huggingface(texts):
    lines = texts["shakespeare"].splitlines(keepends=True)
    tok = BPETokenizer.train(lines, 5000, special_tokens=(EOT,), min_frequency=40)
    expected = hf_merges(lines, 5000, "gpt2", min_frequency=40)
    assert our_merges(tok) == expected
    assert len(expected) < 5000 - 257  # the frequency floor, not the size, ended training


@pytest.fixture(scope="module")
def trained(texts):
    """One small tokenizer per pattern, trained on both corpora."""
    sample = [texts["shakespeare"][:100_000], texts["tang"][:100_000]]
    return {p: BPETokenizer.train(sample, 1200, special_tokens=(EOT, "<|pad|>"), pattern=p) for p in PATTERNS}


def engines(tok):
    fast = BPETokenizer(tok.tokens, tok.merges, tok.pattern, tok.special_tokens, engine="tiktoken")
    slow = BPETokenizer(tok.tokens, tok.merges, tok.pattern, tok.special_tokens, engine="python")
    return fast, slow


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_tiktoken_and_python_paths_give_identical_ids_on_corpora(trained, texts, pattern):
    fast, slow = engines(trained[pattern])
    for text in texts.values():
        ids = slow.encode(text)
        assert fast.encode(text) == ids
        assert slow.decode(ids) == text


SNIPPETS = [
    "世界",
    "唐詩。",
    "😀",
    "👨‍👩‍👧",
    "e\u0301",
    "n\u0303\u0327",
    "\x00",
    "\x1c",
    "\x7f",
    "\u200b",
    " ",
    "   ",
    "\n",
    "\r\n",
    "\t\t",
    "\n\n\n ",
    "'s",
    "'LL",
    "123456",
    "Hello",
    " world",
    EOT,
    "\ufeff",
    "\U0010ffff",
    # Letters and digits new in Unicode 17 (the regex module knows them, tiktoken does not).
    "\U00010940's",
    " \U000107bb\U000107bc",
    "\U00011de07",
    "x\U00016ff2",
]
messy_text = st.lists(st.one_of(st.text(), st.sampled_from(SNIPPETS)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(messy_text)
def test_roundtrip_and_engines_agree_on_any_string(trained, s):
    for tok in trained.values():
        fast, slow = engines(tok)
        ids = slow.encode(s)
        assert fast.encode(s) == ids
        assert slow.decode(ids) == s
        assert not set(ids) & set(tok.special_tokens.values())


EVERY_CHAR = "".join(map(chr, [*range(0xD800), *range(0xE000, 0x110000)]))  # all but surrogates


def tiktoken_reference(tok):
    """tiktoken on the tokenizer's own pattern, read with tiktoken's own Unicode tables."""
    return tiktoken.Encoding("reference", pat_str=tok.pattern, mergeable_ranks=tok._ranks, special_tokens={})


def test_engines_split_like_tiktoken_where_unicode_versions_differ(trained):
    """U+10940 is a letter to the regex module (Unicode 17) but not to tiktoken (Unicode 16):
    once the Python engine split "\U00010940's" as letter + "'s", tiktoken as "\U00010940'" + "s"."""
    odd = "".join(sorted(_odd_chars()))
    assert "\U00010940" in odd  # the regex module installed here is ahead of tiktoken
    texts = ["\U00010940's", f"a{odd[::97]}'ll 12{odd[5::301]}3 {odd[-40:]}!", " \U00011de0\U00011de1 x\U000107bb'"]
    for tok in trained.values():
        fast, slow = engines(tok)
        for text in texts:
            assert fast.encode(text) == slow.encode(text) == tiktoken_reference(tok).encode_ordinary(text)
    gpt2 = engines(trained["gpt2"])[1]
    assert [gpt2.decode([i]) for i in gpt2.encode("\U00010940's")][-1] == "s"  # tiktoken's split


@pytest.mark.parametrize("prop", ["L", "N"])
def test_letters_and_numbers_are_tiktokens_on_every_code_point(prop):
    pattern = rf"\p{{{prop}}}"
    enc = tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    native = enc.decode_bytes(enc.encode_ordinary(EVERY_CHAR)).decode()  # tiktoken skips what does not match
    assert native == "".join(chr(c) for a, b in _ranges(prop) for c in range(a, b + 1))
    odd = "".join(sorted(_odd_chars()))  # where the regex module's own tables differ
    members = set(native)
    assert "".join(PinnedRegex(pattern).findall(odd)) == "".join(c for c in odd if c in members)


@pytest.mark.parametrize("pattern", [r"\P{L}+", r"[^\P{N}]", r"[\pL\p{^N}]", r"[]\p{L}]+", r"[^]\s\p{L}]"])
def test_spelled_out_classes_keep_the_meaning_of_the_pattern(pattern):
    """pin_pattern only swaps tables: on text without Unicode 17 characters nothing changes."""
    text = "Hello, wörld! 12³ ½ ]]] 世界\n\t٣ x"
    assert regex.findall(pin_pattern(pattern), text) == regex.findall(pattern, text)


def test_special_tokens_only_when_allowed(trained):
    tok = trained["gpt2"]
    eot = tok.special_id(EOT)
    assert eot >= tok.base_vocab_size and tok.vocab_size == 1200
    text = f"end.{EOT}start"
    assert eot not in tok.encode(text)
    allowed = tok.encode(text, allowed_special={EOT})
    assert allowed.count(eot) == 1
    assert tok.decode(allowed) == tok.decode(tok.encode(text)) == text


TRICKY = "Thou art 世界。\n\n  \n'tis 12345 e\u0301 \t\r\nend  \nHe'll 😀!\n\n\nx" * 500


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_streamed_counts_equal_whole_text_counts(tmp_path, texts, monkeypatch, pattern):
    """Blocks and byte ranges are cut only where pre-tokenization cannot notice."""
    docs = [texts["shakespeare"][:50_000], texts["tang"][:20_000], TRICKY]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    split = regex.compile(PATTERNS[pattern]).findall
    expected = Counter(chunk for doc in docs for chunk in split(doc))
    monkeypatch.setattr(bpe_module, "_BLOCK", 1000)  # many blocks and byte ranges per file
    assert count_file_chunks(paths, PATTERNS[pattern], workers=1) == expected
    assert count_file_chunks(paths, PATTERNS[pattern], workers=3) == expected


def test_training_is_deterministic_and_files_match_texts(tmp_path, shared, texts, monkeypatch):
    """Streaming files in small blocks on one or two processes learns what `train` learns."""
    paths = []
    for name, text in texts.items():
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(text[:60_000], encoding="utf-8")
    reference = BPETokenizer.train([p.read_text(encoding="utf-8") for p in paths], 700, pattern="gpt4")
    again = BPETokenizer.train([p.read_text(encoding="utf-8") for p in paths], 700, pattern="gpt4")
    assert again.to_dict() == reference.to_dict()
    monkeypatch.setattr(bpe_module, "_BLOCK", 4096)  # many blocks and byte ranges per file
    assert BPETokenizer.train_files(paths, 700, pattern="gpt4", workers=1).to_dict() == reference.to_dict()
    assert BPETokenizer.train_files(paths, 700, pattern="gpt4", workers=2).to_dict() == reference.to_dict()


def test_save_load_roundtrip(tmp_path, trained):
    tok = trained["gpt4"]
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer)
    assert again.to_dict() == tok.to_dict()
    text = f"To be, or not to be 世界 😀{EOT}"
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_vocab_smaller_than_alphabet_is_one_clear_error():
    with pytest.raises(InputError, match="smaller than the 256 byte tokens plus 2 special tokens; use at least 258"):
        BPETokenizer.train(["hello"], 257, special_tokens=(EOT, "<|pad|>"))


@pytest.mark.parametrize(
    "content",
    [
        '{"lmstack_tokenizer": 1, "kind": "bpe", "tokens": [',  # truncated
        '{"lmstack_tokenizer": 1, "kind": "bpe", "special_tokens": {}, "pattern": "gpt2", "tokens": ["a"], "merges": []}',
    ],
)
def test_corrupt_tokenizer_file_is_one_clear_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(FormatError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_merge_that_makes_no_token_is_corrupt(tmp_path, trained):
    d = trained["gpt2"].to_dict()
    d["merges"][-1] = [0, 0]  # "!" + "!" is not in this vocabulary
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(FormatError, match="does not produce a token"):
        load_tokenizer(tmp_path)


def test_bad_training_input(tmp_path):
    with pytest.raises(InputError, match="no text"):
        BPETokenizer.train([], 300)
    with pytest.raises(InputError, match="does not compile"):
        BPETokenizer.train(["abc"], 300, pattern="(unclosed")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt: not valid UTF-8"):
        BPETokenizer.train_files([bad], 300, workers=1)


def test_cli_train_encode_decode(cli, tmp_path, shared):
    out = tmp_path / "tok"
    cli(
        "tokenizer",
        "train",
        shared / "data" / "tinyshakespeare.txt",
        "--kind",
        "bpe",
        "--vocab-size",
        "600",
        "--pattern",
        "gpt4",
        "--out",
        out,
        check=True,
    )
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and tok.vocab_size == 600
    ids = cli("tokenizer", "encode", "--tokenizer", out, "Thou art 世界", check=True).stdout.split()
    assert [int(i) for i in ids] == tok.encode("Thou art 世界")
    assert cli("tokenizer", "decode", "--tokenizer", out, *ids, check=True).stdout == "Thou art 世界\n"  # a line
    r = cli("tokenizer", "train", shared / "data" / "tinyshakespeare.txt", "--vocab-size", "100", "--out", tmp_path / "x")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "at least 257" in r.stderr

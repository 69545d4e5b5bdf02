import json

import pytest


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("To be, or not to be: that is the question.\n世界 🙂\n" * 50, encoding="utf-8")
    return p


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char", "word"])
def test_train_encode_decode_stats(cli, corpus, tmp_path, kind):
    out = tmp_path / kind
    size = {"bpe": "300", "unigram": "300", "char": "300", "word": "50"}[kind]
    cli("tokenizer", "train", corpus, "--kind", kind, "--vocab-size", size, "--out", out, check=True)
    text = "To be, or not to be:"
    ids = cli("tokenizer", "encode", "--tokenizer", out, text, check=True).stdout.split()
    assert ids and all(i.isdigit() for i in ids)
    assert cli("tokenizer", "decode", "--tokenizer", out, *ids, check=True).stdout == text + "\n"  # a line
    stats = json.loads(cli("tokenizer", "stats", "--tokenizer", out, corpus, "--json", check=True).stdout)
    assert stats["kind"] == kind and stats["tokens"] > 0
    assert stats["bytes"] == len(corpus.read_bytes())
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"])


def test_gpt2_import_and_hf_export(cli, shared, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    cli("tokenizer", "import", shared / "fixtures" / "gpt2", "--out", tmp_path / "g", check=True)
    text = "Hello world, 世界<|endoftext|>"
    ids = cli("tokenizer", "encode", "--tokenizer", tmp_path / "g", "--allow-special", text, check=True).stdout.split()
    assert ids[:2] == ["15496", "995"] and ids[-1] == "50256"
    cli("tokenizer", "export", "--tokenizer", tmp_path / "g", "--out", tmp_path / "hf.json", check=True)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "hf.json"))
    assert hf.encode(text).ids == [int(i) for i in ids]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind", "bpe", "--vocab-size", "100"], "vocab"),
        (["--kind", "char", "--vocab-size", "10"], "smaller than"),
    ],
)
def test_bad_vocab_size_is_one_clear_error(cli, corpus, tmp_path, args, message):
    r = cli("tokenizer", "train", corpus, *args, "--out", tmp_path / "t")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t" / "tokenizer.json").exists()


@pytest.mark.parametrize("content", [b"", b"\xff\xfe bad", b"\x00\x01\x02"])
def test_bad_corpus_files(cli, tmp_path, content):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    r = cli("tokenizer", "train", p, "--out", tmp_path / "t")
    assert r.returncode != 0 and str(p) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_export_refuses_a_non_bpe_tokenizer(cli, corpus, tmp_path):
    cli("tokenizer", "train", corpus, "--kind", "char", "--out", tmp_path / "c", check=True)
    r = cli("tokenizer", "export", "--tokenizer", tmp_path / "c", "--out", tmp_path / "hf.json")
    assert r.returncode != 0 and "only byte-level BPE" in r.stderr

import json

import numpy as np
import pytest

from lmstack.data import shards
from lmstack.data.shards import MANIFEST, TokenShards, prepare_shards, token_dtype
from lmstack.errors import FormatError, InputError
from lmstack.tokenizers import EOT
from lmstack.tokenizers.char import CharTokenizer
from lmstack.tokenizers.word import WordTokenizer


@pytest.fixture(scope="module")
def shakespeare(shared):
    path = shared / "data" / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")
    return path, text, CharTokenizer.train([text], special_tokens=(EOT,))


def decode_split(tok, out, split):
    s = TokenShards.open(out, split, tok)
    return tok.decode(np.concatenate(s.arrays).tolist())


def test_text_file_splits_at_a_line_break_near_the_end_and_round_trips(shakespeare, tmp_path):
    path, text, tok = shakespeare
    m = prepare_shards([path], tok, tmp_path, val_fraction=0.1)
    train, val = decode_split(tok, tmp_path, "train"), decode_split(tok, tmp_path, "val")
    assert train.endswith(EOT) and val.endswith(EOT)
    assert train[: -len(EOT)] + val[: -len(EOT)] == text
    assert train[: -len(EOT)].endswith("\n")
    # the cut is the first line break after 90% of the bytes
    assert abs(len(val[: -len(EOT)]) - 0.1 * len(text)) < 200
    assert m["dtype"] == "uint16" and m["tokenizer"] == tok.fingerprint()
    assert m["train"]["tokens"] + m["val"]["tokens"] == len(text) + 2
    assert json.loads((tmp_path / MANIFEST).read_text())["vocab_size"] == tok.vocab_size


def test_worker_pool_and_small_shards_give_the_same_tokens(shakespeare, tmp_path, monkeypatch):
    path, _, tok = shakespeare
    prepare_shards([path], tok, tmp_path / "a")
    monkeypatch.setattr(shards, "_POOL_MIN_BYTES", 0)
    monkeypatch.setattr(shards, "_GROUP_BYTES", 50_000)
    m = prepare_shards([path], tok, tmp_path / "b", shard_tokens=300_000, workers=2)
    assert [s["tokens"] for s in m["train"]["shards"]] == [300_000, 300_000, 300_000, m["train"]["tokens"] - 900_000]
    for split in ("train", "val"):
        a = np.concatenate(TokenShards.open(tmp_path / "a", split).arrays)
        b = np.concatenate(TokenShards.open(tmp_path / "b", split).arrays)
        assert np.array_equal(a, b)


def test_jsonl_documents_are_separated_by_end_of_text(tmp_path):
    docs = [f"document number {i}" for i in range(40)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    tok = CharTokenizer.train(docs, special_tokens=(EOT,))
    m = prepare_shards([src], tok, tmp_path / "out", val_fraction=0.25, text_field="body")
    train, val = decode_split(tok, tmp_path / "out", "train"), decode_split(tok, tmp_path / "out", "val")
    got = (train + val).split(EOT)
    assert got[:-1] == docs and got[-1] == ""
    assert m["train"]["documents"] + m["val"]["documents"] == 40
    assert 5 <= m["val"]["documents"] <= 15  # the last quarter of the bytes, whole records


def test_directory_reads_every_text_file_in_order(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("second\n")
    (tmp_path / "corpus" / "a.txt").write_text("first\n")
    (tmp_path / "corpus" / "sub" / "c.md").write_text("third\n")
    (tmp_path / "corpus" / "skip.bin").write_bytes(b"\x00\x01")
    tok = WordTokenizer.train(["first second third"], special_tokens=(EOT,))
    m = prepare_shards([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0.0)
    assert decode_split(tok, tmp_path / "out", "train") == f"first\n{EOT}second\n{EOT}third\n{EOT}"
    assert m["train"]["documents"] == 3 and m["val"]["tokens"] == 0


def test_large_vocabularies_use_uint32():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bad_inputs_name_the_problem(tmp_path, shakespeare):
    _, _, tok = shakespeare
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_shards([bad], tok, tmp_path / "o1")
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(InputError, match=r"no string field 'text' \(fields: \['content'\]\).*--text-field"):
        prepare_shards([bad], tok, tmp_path / "o2")
    with pytest.raises(InputError, match="no such file"):
        prepare_shards([tmp_path / "missing.txt"], tok, tmp_path / "o3")
    (tmp_path / "x.txt").write_text("hello\n")
    no_eot = CharTokenizer.train(["hello"])
    with pytest.raises(InputError, match="no <\\|endoftext\\|> special token"):
        prepare_shards([tmp_path / "x.txt"], no_eot, tmp_path / "o4")
    assert not (tmp_path / "o1" / MANIFEST).exists()


def test_reader_rejects_unfinished_truncated_or_mismatched_shards(tmp_path):
    (tmp_path / "x.txt").write_text("hello world\n" * 50)
    tok = CharTokenizer.train(["hello world\n"], special_tokens=(EOT,))
    prepare_shards([tmp_path / "x.txt"], tok, tmp_path / "out")
    other = CharTokenizer.train(["something else"], special_tokens=(EOT,))
    with pytest.raises(InputError, match="another tokenizer"):
        TokenShards.open(tmp_path / "out", "train", other)
    f = tmp_path / "out" / "train_0000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(FormatError, match="truncated shard"):
        TokenShards.open(tmp_path / "out", "train")
    (tmp_path / "out" / MANIFEST).unlink()
    with pytest.raises(InputError, match="not a prepared shard directory"):
        TokenShards.open(tmp_path / "out", "train")


def test_windows_come_from_one_shard_and_are_reproducible(tmp_path):
    letters = np.random.default_rng(0).integers(0, 26, size=1000)
    (tmp_path / "x.txt").write_text("".join(chr(ord("a") + i) for i in letters) + "\n")
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz\n"], special_tokens=(EOT,))
    prepare_shards([tmp_path / "x.txt"], tok, tmp_path / "out", val_fraction=0.0, shard_tokens=100)
    s = TokenShards.open(tmp_path / "out", "train")
    w = s.sample_windows(np.random.default_rng(5), 200, 30)
    assert np.array_equal(w, s.sample_windows(np.random.default_rng(5), 200, 30))
    assert np.array_equal(w[50:60], s.sample_windows(np.random.default_rng(5), 200, 30, slice(50, 60)))
    whole = np.concatenate(s.arrays)
    for row in w:  # every window is a run of the corpus that never crosses a shard boundary
        (start,) = [i for i in range(len(whole) - 29) if np.array_equal(whole[i : i + 30], row)]
        assert start // 100 == (start + 29) // 100
    with pytest.raises(InputError, match="fewer than one window"):
        s.sample_windows(np.random.default_rng(0), 1, 101)

import io
import itertools
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import FormatError, InputError
from lmstack.tokenizers import EOT, load_tokenizer
from lmstack.tokenizers.unigram import MAX_TRAIN_WORD, N_BYTES, UnigramTokenizer, _Lattice, split_words

# Pieces of text that break naive tokenizers: CJK, emoji (with modifiers and ZWJ), combining
# marks, control characters, whitespace runs of every kind, SentencePiece's own meta symbol.
TRICKY = st.sampled_from(
    [
        "中",
        "文字",
        "😀",
        "👍🏽",
        "👩\u200d💻",
        "e\u0301",
        "\u0308",
        " ",
        "   ",
        "\t",
        "\n",
        "\r\n",
        "\x00",
        "\x1b",
        "\x7f",
        "\u3000",
        "\u00a0",
        "\u2028",
        "\u2581",
        "the",
        " the",
        "ing",
    ]
)
TEXTS = st.lists(st.one_of(TRICKY, st.text(max_size=6)), max_size=25).map("".join)


@pytest.fixture(scope="module")
def shakespeare(shared) -> str:
    return (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(shakespeare) -> UnigramTokenizer:
    return UnigramTokenizer.train([shakespeare[:150_000]], vocab_size=700, special_tokens=(EOT,))


def test_split_words_keeps_every_character():
    text = "  Hello,\tworld!\n\n  x  "
    assert split_words(text) == ["  Hello,", "\tworld!", "\n\n  x", "  "]
    assert "".join(split_words(text)) == text


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_roundtrip_any_string(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(TEXTS, st.integers(0, 2**32))
def test_sampled_segmentations_roundtrip(tok, s, seed):
    assert tok.decode(tok.sample_encode(s, alpha=0.1, seed=seed)) == s


def test_vocab_size_counts_bytes_pieces_and_specials(tok):
    assert tok.vocab_size == 700
    assert tok.special_id(EOT) == 699
    assert tok.encode(EOT, allowed_special="all") == [699]
    assert tok.decode(tok.encode(EOT)) == EOT  # as plain text it is ordinary pieces


def test_learns_frequent_words_as_single_pieces(tok):
    for word in [" the", " and", " my"]:
        assert len(tok.encode(word)) == 1, word


def test_unseen_characters_fall_back_to_utf8_bytes(tok):
    ids = tok.encode("中")
    assert ids == list("中".encode())
    assert all(i < N_BYTES for i in ids)


def test_sampling_is_reproducible_and_varied(tok):
    text = "Whereto the constant citizens remembered their wonderful misfortunes"
    assert tok.sample_encode(text, seed=7) == tok.sample_encode(text, seed=7)
    samples = {tuple(tok.sample_encode(text, alpha=0.1, seed=s)) for s in range(20)}
    assert len(samples) > 5
    # A high alpha (low temperature) concentrates the draws on the Viterbi segmentation.
    sharp = Counter(tuple(tok.sample_encode(text, alpha=20.0, seed=s)) for s in range(20))
    assert sharp.most_common(1)[0][0] == tuple(tok.encode(text))


def test_sampling_follows_the_segmentation_distribution():
    tok = UnigramTokenizer([("a", -1.0), ("b", -1.5), ("ab", -2.0), ("ba", -2.2), ("aba", -2.1)])
    text, alpha = "aba", 0.5
    # Every segmentation of "aba" and its probability under P(seg)**alpha.
    segs = {
        ("a", "b", "a"): -1 - 1.5 - 1,
        ("ab", "a"): -2 - 1,
        ("a", "ba"): -1 - 2.2,
        ("aba",): -2.1,
    }
    z = sum(math.exp(alpha * s) for s in segs.values())
    draws = Counter(tuple(tok.id_to_piece(i) for i in tok.sample_encode(text, alpha=alpha, seed=s)) for s in range(4000))
    assert set(draws) == set(segs)
    for seg, s in segs.items():
        assert draws[seg] / 4000 == pytest.approx(math.exp(alpha * s) / z, abs=0.03)


def _brute_force(word, table):
    """All segmentations of `word` into pieces of `table` (piece -> id), by enumerating cuts."""
    out = []
    for cuts in itertools.product([0, 1], repeat=len(word) - 1):
        parts, start = [], 0
        for k, c in enumerate(cuts, 1):
            if c:
                parts.append(word[start:k])
                start = k
        parts.append(word[start:])
        if all(p in table for p in parts):
            out.append([table[p] for p in parts])
    return out


def test_lattice_forward_backward_and_viterbi_match_brute_force():
    pieces = ["a", "b", "c", "ab", "bc", "abc", "ca", "bca"]
    table = {p: i for i, p in enumerate(pieces)}
    score = np.log(np.array([0.2, 0.15, 0.1, 0.12, 0.08, 0.05, 0.2, 0.1]))
    words = ["abcab", "bca", "c", "abcabca"]
    freq = np.array([3.0, 1.0, 2.0, 1.0])
    edges = [
        (k, i, j, table[w[i:j]])
        for k, w in enumerate(words)
        for i in range(len(w))
        for j in range(i + 1, len(w) + 1)
        if w[i:j] in table
    ]
    owner, start, end, piece = (np.array(x) for x in zip(*edges))
    lat = _Lattice(np.array([len(w) for w in words]), owner, start, end, piece)
    expected, loglik = lat.forward_backward(score, freq)
    best_words, best_pieces = lat.viterbi(score)

    want = np.zeros(len(pieces))
    want_loglik = 0.0
    for k, w in enumerate(words):
        segs = _brute_force(w, table)
        probs = np.array([math.exp(sum(score[p] for p in seg)) for seg in segs])
        want_loglik += freq[k] * math.log(probs.sum())
        for seg, pr in zip(segs, probs):
            for p in seg:
                want[p] += freq[k] * pr / probs.sum()
        best = segs[int(np.argmax(probs))]
        assert sorted(best_pieces[best_words == k]) == sorted(best)
    np.testing.assert_allclose(expected, want, rtol=1e-9)
    assert loglik == pytest.approx(want_loglik, rel=1e-12)


def test_training_is_deterministic(shared):
    """Same corpus, same tokenizer, even across processes with different string hashing."""
    script = (
        "import sys; from lmstack.tokenizers.unigram import UnigramTokenizer as U; "
        "text = open(sys.argv[1], encoding='utf-8').read()[:60_000] + '中文 😀 e\u0301'; "
        "print(U.train([text], vocab_size=500).fingerprint())"
    )
    corpus = shared / "data" / "tinyshakespeare.txt"
    prints = {
        subprocess.run(
            [sys.executable, "-c", script, corpus],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(prints) == 1 and len(prints.pop().strip()) == 16


def test_vocab_size_smaller_than_alphabet_is_an_error():
    # 256 bytes + 1 special + 4 characters (a, b, c, space) need 261 ids.
    with pytest.raises(InputError, match="smaller than the alphabet.*use at least 261"):
        UnigramTokenizer.train(["abc cab"], vocab_size=260, special_tokens=(EOT,))
    assert UnigramTokenizer.train(["abc cab"], vocab_size=261, special_tokens=(EOT,)).vocab_size == 261


def test_words_longer_than_the_training_limit_still_train_and_roundtrip():
    text = "ab" * (MAX_TRAIN_WORD + 7) + " ab\n"
    tok = UnigramTokenizer.train([text], vocab_size=300, special_tokens=())
    assert "abababababababab" in tok.pieces
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 10


def test_empty_corpus_and_bad_options_are_errors(tok):
    with pytest.raises(InputError, match="no text"):
        UnigramTokenizer.train([""], vocab_size=1000)
    with pytest.raises(InputError, match="shrinking_factor"):
        UnigramTokenizer.train(["abc"], vocab_size=1000, shrinking_factor=1.0)
    with pytest.raises(InputError, match="alpha must be positive"):
        tok.sample_encode("abc", alpha=0)


def test_save_load_roundtrip(tmp_path, tok):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, UnigramTokenizer)
    assert again.to_dict() == tok.to_dict()
    text = f"  First Citizen:\n\tspeak, 中文 😀{EOT}"
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


@pytest.mark.parametrize(
    "content, why",
    [
        ('{"kind": "unigram", "pieces": [["a", -1.0]', "corrupt"),
        ('{"kind": "unigram"}', "corrupt unigram tokenizer"),
        ('{"kind": "unigram", "pieces": [["a", "x"]]}', "corrupt unigram tokenizer.*piece, score"),
        ('{"kind": "unigram", "pieces": [["a", -1.0], ["a", -2.0]]}', "corrupt unigram tokenizer.*duplicate"),
        ('{"kind": "unigram", "pieces": [["", -1.0]]}', "corrupt unigram tokenizer.*non-empty"),
        ('{"kind": "unigram", "pieces": []}', "corrupt unigram tokenizer.*no pieces"),
    ],
)
def test_corrupt_tokenizer_file(tmp_path, content, why):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(FormatError, match=why):
        load_tokenizer(tmp_path)


def _sentencepiece(lines, vocab_size):
    """SentencePiece Unigram set up to keep text as is (no normalisation, no dummy prefix), with
    byte fallback, so its pieces are comparable with ours ("▁" is a space)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=False,
        bos_id=-1,
        eos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _lines(text):
    return [ln for ln in text.split("\n") if ln]


def test_viterbi_equals_sentencepiece_on_its_own_vocabulary(shakespeare):
    sp = _sentencepiece(_lines(shakespeare[:200_000]), 1000)
    pieces = [
        (sp.id_to_piece(i).replace("\u2581", " "), sp.get_score(i))
        for i in range(sp.get_piece_size())
        if not (sp.is_unknown(i) or sp.is_byte(i))
    ]
    ours = UnigramTokenizer(pieces)
    held_out = _lines(shakespeare[-40_000:])
    mismatched = [
        ln
        for ln in held_out
        if [ours.id_to_piece(i).replace(" ", "\u2581") for i in ours.encode(ln)] != sp.encode(ln, out_type=str)
    ]
    assert len(held_out) > 500
    assert mismatched == []


def test_bytes_per_token_close_to_sentencepiece(shakespeare):
    train, held_out = _lines(shakespeare[:300_000]), _lines(shakespeare[-100_000:])
    sp = _sentencepiece(train, 1000)
    ours = UnigramTokenizer.train(train, vocab_size=1000, special_tokens=())
    n_bytes = sum(len(ln.encode("utf-8")) for ln in held_out)
    sp_bpt = n_bytes / sum(len(ids) for ids in sp.encode(held_out))
    our_bpt = n_bytes / sum(len(ours.encode(ln)) for ln in held_out)
    assert our_bpt >= 0.98 * sp_bpt, (our_bpt, sp_bpt)


def test_cli_train_encode_decode(cli, tmp_path, shakespeare):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare[:20_000] + "\n中文 😀\n", encoding="utf-8")
    out = tmp_path / "tok"
    r = cli("tokenizer", "train", corpus, "--kind", "unigram", "--vocab-size", "500", "--out", out, check=True)
    assert "trained unigram tokenizer: 500 tokens (1 special)" in r.stdout
    text = "  Speak, speak.\n\t中文 😀 ∑"
    ids = cli("tokenizer", "encode", "--tokenizer", out, text, check=True).stdout.split()
    assert cli("tokenizer", "decode", "--tokenizer", out, *ids, check=True).stdout == text + "\n"  # printed as a line
    r = cli("tokenizer", "train", corpus, "--kind", "unigram", "--vocab-size", "300", "--out", tmp_path / "small")
    assert r.returncode != 0 and "smaller than the alphabet" in r.stderr
    assert not (tmp_path / "small").exists()

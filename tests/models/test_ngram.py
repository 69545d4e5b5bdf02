"""N-gram LM: agreement with KenLM's lmplz/query fixtures, the LM contract, options and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmstack
from lmstack.errors import InputError
from lmstack.evaluation.perplexity import perplexity
from lmstack.models.ngram import BOS_ID, EOS_ID, UNK_ID, NGramLM

SMOOTHINGS = ("modified_kneser_ney", "kneser_ney", "add_k")


# --- KenLM fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ts_split(shared, tmp_path_factory):
    """Tiny Shakespeare lines 1-36000 (train) and 36001-40000 (test), as the fixtures were made."""
    lines = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n")
    d = tmp_path_factory.mktemp("ts")
    (d / "train.txt").write_text("\n".join(lines[:36000]) + "\n", encoding="utf-8")
    (d / "test.txt").write_text("\n".join(lines[36000:40000]) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=[2, 3])
def order(request):
    return request.param


@pytest.fixture(scope="module")
def trained(ts_split, order):
    return NGramLM.train([ts_split / "train.txt"], order=order)


@pytest.fixture(scope="module")
def kenlm_model(shared, order):
    return NGramLM.load(shared / "fixtures" / "kenlm" / f"ts.train.{order}.arpa")


def _entries(model: NGramLM, n: int) -> dict[str, tuple[float, float]]:
    t = model.tables[n - 1]
    bo = t.backoff if t.backoff is not None else np.zeros(len(t.keys))
    return dict(zip(model.ngram_texts(n), zip(t.logp.tolist(), bo.tolist())))


def _summary(shared, order) -> dict[str, float]:
    text = (shared / "fixtures" / "kenlm" / f"ts.test.{order}.summary.txt").read_text()
    return {k.strip(): float(v) for k, v in (line.split(":\t") for line in text.strip().split("\n"))}


def test_arpa_matches_lmplz_entry_by_entry(trained, kenlm_model, order):
    for n in range(1, order + 1):
        ours, theirs = _entries(trained, n), _entries(kenlm_model, n)
        assert ours.keys() == theirs.keys(), f"{n}-gram sets differ"
        dp = max(abs(ours[g][0] - theirs[g][0]) for g in ours)
        db = max(abs(ours[g][1] - theirs[g][1]) for g in ours)
        assert dp < 1e-5 and db < 1e-5, (n, dp, db)


def test_written_arpa_round_trips(trained, order, tmp_path):
    trained.save(tmp_path / "m")
    again = lmstack.load(tmp_path / "m")[0]
    for n in range(1, order + 1):
        a, b = _entries(trained, n), _entries(again, n)
        assert a.keys() == b.keys()
        assert max(abs(a[g][0] - b[g][0]) + abs(a[g][1] - b[g][1]) for g in a) < 1e-7


@pytest.mark.parametrize("which", ["trained", "kenlm_model"])
def test_perplexity_matches_kenlm_query_summary(which, request, ts_split, shared, order):
    model = request.getfixturevalue(which)
    want = _summary(shared, order)
    with open(ts_split / "test.txt", encoding="utf-8") as f:
        res = perplexity(model, f, model.encode, model.bos_id, model.eos_id, model.unk_id)
    assert res.tokens == want["Tokens"] and res.oovs == want["OOVs"]
    assert res.perplexity == pytest.approx(want["Perplexity including OOVs"], rel=1e-6)
    assert res.perplexity_excluding_oovs == pytest.approx(want["Perplexity excluding OOVs"], rel=1e-6)


def test_per_word_scores_match_kenlm_query(shared, ts_split):
    """`query -v word` on the first five test lines: each token's log10 p (OOVs as <unk>)."""
    model = NGramLM.load(shared / "fixtures" / "kenlm" / "ts.train.3.arpa")
    want = [
        float(item.rsplit(" ", 1)[1])
        for item in (shared / "fixtures" / "kenlm" / "ts.test.3.first5.words.txt").read_text().split("\t")
        if item.strip()
    ]
    got = []
    for line in (ts_split / "test.txt").read_text(encoding="utf-8").split("\n")[:5]:
        ids = torch.tensor([[BOS_ID, *model.encode(line), EOS_ID]])
        got.extend((model.token_logprobs(ids)[0] / math.log(10)).tolist())
    assert got == pytest.approx(want, abs=1e-6)


def test_sentence_scores_match_kenlm_query(shared, ts_split):
    """`query -v sentence` totals (log10, </s> included) on the first 20 test lines."""
    model = NGramLM.load(shared / "fixtures" / "kenlm" / "ts.train.3.arpa")
    text = (shared / "fixtures" / "kenlm" / "ts.test.3.first20.sentences.txt").read_text()
    want = [float(line.split()[1]) for line in text.strip().split("\n")]
    lines = (ts_split / "test.txt").read_text(encoding="utf-8").split("\n")[:20]
    assert [model.score(line) for line in lines] == pytest.approx(want, abs=1e-5)


def test_score_options_follow_kenlm_python():
    """score(s, bos, eos) as kenlm.Model.score: without bos the first word has no context."""
    model = NGramLM.train_texts(["a b c", "b c a", "c a b c"], order=3, discount_fallback=True)
    a, b = model.word_ids["a"], model.word_ids["b"]
    dense = model.next_token_logprobs(torch.tensor([[BOS_ID, a, b]]))[0] / math.log(10)
    assert model.score("a b") == pytest.approx(float(dense[0, a] + dense[1, b] + dense[2, EOS_ID]))
    assert model.score("a b", eos=False) == pytest.approx(float(dense[0, a] + dense[1, b]))
    unigram10 = model.tables[0].logp
    after_a = model.next_token_logprobs(torch.tensor([[a]]))[0, 0] / math.log(10)
    assert model.score("a b", bos=False, eos=False) == pytest.approx(float(unigram10[a] + after_a[b]))


# --- the LM contract --------------------------------------------------------------------------

words = st.sampled_from(["a", "b", "c", "d", "e"])
corpora = st.lists(st.lists(words, max_size=8).map(" ".join), min_size=1, max_size=12).filter(lambda lines: any(lines))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    corpus=corpora,
    order=st.integers(1, 6),
    smoothing=st.sampled_from(SMOOTHINGS),
    k=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_next_token_distribution_sums_to_one(corpus, order, smoothing, k, seed):
    model = NGramLM.train_texts(corpus, order=order, smoothing=smoothing, k=k, discount_fallback=True)
    g = torch.Generator().manual_seed(seed)
    contexts = torch.randint(0, model.vocab_size, (3, 8), generator=g)
    lp = model.next_token_logprobs(contexts)
    assert lp.shape == (3, 8, model.vocab_size)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 8, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.all(lp[..., BOS_ID] == -math.inf)  # <s> is context only, never predicted
    # the observed-token path agrees with the dense one
    dense = lp[:, :-1].gather(-1, contexts[:, 1:, None]).squeeze(-1)
    assert torch.allclose(model.token_logprobs(contexts), dense, atol=1e-12)


def test_incremental_decoding_matches_batch_view():
    model = NGramLM.train_texts(["the cat sat on the mat", "the dog sat on the cat", "a cat"], order=3, discount_fallback=True)
    seq = torch.tensor([[BOS_ID, *model.encode("the cat sat on the dog")]])
    full = model.next_token_logprobs(seq)
    state, lp = model.start(seq[:, :2])
    assert torch.allclose(lp, full[:, 1])
    for t in range(2, seq.shape[1]):
        state, lp = model.step(state, seq[:, t])
        assert torch.allclose(lp, full[:, t])


def test_reorder_keeps_each_rows_context():
    model = NGramLM.train_texts(["a b c", "b c a", "c a b"], order=3, discount_fallback=True)
    rows = torch.tensor([[BOS_ID, *model.encode("a b")], [BOS_ID, *model.encode("c a")]])
    state, lp = model.start(rows)
    state = model.reorder(state, torch.tensor([1, 1, 0]))
    _, nxt = model.step(state, torch.tensor([model.word_ids["c"]] * 3))
    want = model.next_token_logprobs(torch.tensor([[*rows[1], model.word_ids["c"]], [*rows[0], model.word_ids["c"]]]))[:, -1]
    assert torch.allclose(nxt, want[[0, 0, 1]])


def test_sample_cli_is_reproducible_and_stays_in_vocabulary(lmstack_cli, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("the cat sat on the mat\nthe dog sat on the log\na cat saw a dog\n" * 4, encoding="utf-8")
    lmstack_cli("ngram", "train", f, "--order", "3", "--out", tmp_path / "m", "--discount-fallback")
    args = ("ngram", "sample", "--model", tmp_path / "m", "--num", "4", "--seed", "3", "--prompt", "the", "--temperature", "1.5")
    first = lmstack_cli(*args)
    assert first == lmstack_cli(*args)
    samples = first.splitlines()
    assert len(samples) == 4 and all(s.split()[0] == "the" for s in samples)
    assert set(first.split()) <= {"the", "cat", "sat", "on", "mat", "dog", "log", "a", "saw", "<unk>"}
    # a prompt with words the model never saw is printed as given
    samples = lmstack_cli("ngram", "sample", "--model", tmp_path / "m", "--num", "2", "--prompt", "the zebra 😀").splitlines()
    assert len(samples) == 2 and all(s.startswith("the zebra 😀") for s in samples)


def test_unknown_words_score_as_unk_and_reset_context():
    model = NGramLM.train_texts(["a b c", "a b d", "b c"], order=3, discount_fallback=True)
    assert model.encode("a zzz b") == [model.word_ids["a"], UNK_ID, model.word_ids["b"]]
    lp = model.token_logprobs(torch.tensor([[BOS_ID, *model.encode("a zzz b")]]))[0]
    after_a = model.next_token_logprobs(torch.tensor([[BOS_ID, model.word_ids["a"]]]))[0, 1]
    assert lp[1] == pytest.approx(float(after_a[UNK_ID]))
    # no n-gram holds <unk>, so the word after an OOV gets its unigram probability
    assert lp[2] == pytest.approx(float(model.tables[0].logp[model.word_ids["b"]]) * math.log(10))


def test_smoothing_methods_differ_and_modified_kn_is_default():
    lines = ["a b c a b c d", "a b a b e", "c d e a b", "b c d a"] * 3
    mkn = NGramLM.train_texts(lines, order=2, discount_fallback=True)
    kn = NGramLM.train_texts(lines, order=2, smoothing="kneser_ney", discount_fallback=True)
    addk = NGramLM.train_texts(lines, order=2, smoothing="add_k", k=1.0)
    assert mkn.config.smoothing == "modified_kneser_ney"
    ids = torch.tensor([[BOS_ID, *mkn.encode("a b c d e")]])
    scores = [m.token_logprobs(ids).sum().item() for m in (mkn, kn, addk)]
    assert len({round(s, 6) for s in scores}) == 3
    # kneser_ney uses one discount per order, modified three
    assert all(len(set(d)) == 1 for d in kn.config.discounts)


def test_add_k_probabilities_follow_the_formula():
    lines = ["a b", "a c", "a b"]
    k = 0.5
    model = NGramLM.train_texts(lines, order=2, smoothing="add_k", k=k)
    V1 = model.vocab_size - 1  # every type but <s>
    lp = model.next_token_logprobs(torch.tensor([[model.word_ids["a"]]]))[0, 0].exp()
    # after "a": b seen twice, c once, 3 continuations in all
    assert lp[model.word_ids["b"]] == pytest.approx((2 + k) / (3 + k * V1))
    assert lp[model.word_ids["c"]] == pytest.approx((1 + k) / (3 + k * V1))


def test_document_boundaries_wrap_each_file(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("a b\nc d\n", encoding="utf-8")
    by_line = NGramLM.train([f], order=2, discount_fallback=True)
    by_file = NGramLM.train([f], order=2, discount_fallback=True, boundary="file")
    assert "b </s>" in by_line.ngram_texts(2)
    texts = by_file.ngram_texts(2)
    assert "b c" in texts and "b </s>" not in texts and "d </s>" in texts


def test_subword_ngram_with_a_tokenizer(tmp_path, lmstack_cli):
    from lmstack.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(["hello world\nhold the door\n"])
    tok.save(tmp_path / "tok")
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\nhold the door\nhello door\n", encoding="utf-8")
    lmstack_cli(
        "ngram", "train", corpus, "--order", "4", "--out", tmp_path / "m", "--tokenizer", tmp_path / "tok", "--discount-fallback"
    )
    assert (tmp_path / "m" / "tokenizer.json").exists()
    model, _ = lmstack.load(tmp_path / "m")
    assert model.tokenizer is not None
    ids = model.encode("hello")
    assert len(ids) == 5 and UNK_ID not in ids and model.decode(ids) == "hello"
    # the ARPA words are the tokenizer's ids
    assert all(w.isdigit() for w in model.vocab[3:])


def test_checkpoint_saves_config_and_arpa(tmp_path):
    model = NGramLM.train_texts(["a b c", "c b a"], order=2, discount_fallback=True)
    model.save(tmp_path / "m")
    loaded, tok = lmstack.load(tmp_path / "m")
    assert isinstance(loaded, NGramLM) and tok is None
    assert loaded.config.order == 2 and loaded.config.discounts == model.config.discounts
    ids = torch.tensor([[BOS_ID, *model.encode("a b c"), EOS_ID]])
    assert torch.allclose(loaded.token_logprobs(ids), model.token_logprobs(ids), atol=1e-7)


# --- bad input --------------------------------------------------------------------------------


def test_order_below_one_is_rejected(tmp_path):
    with pytest.raises(InputError, match="order"):
        NGramLM.train_texts(["a b"], order=0)


def test_empty_corpus_is_rejected(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no words"):
        NGramLM.train([f], order=2)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        NGramLM.train([tmp_path / "empty.txt"], order=2)


def test_non_utf8_corpus_is_rejected(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        NGramLM.train([f], order=2)


def test_reserved_words_in_the_corpus_are_rejected():
    with pytest.raises(InputError, match="reserves"):
        NGramLM.train_texts(["a <s> b"], order=2)


def test_tiny_corpus_names_discount_fallback():
    with pytest.raises(InputError, match="--discount-fallback"):
        NGramLM.train_texts(["a b c"], order=3)


def test_cli_errors_are_one_line(cli, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a b c\n", encoding="utf-8")
    for args in (["--order", "0"], []):
        proc = cli("ngram", "train", f, "--out", tmp_path / "m", *args)
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
    assert not (tmp_path / "m" / "model.arpa").exists()


def test_kenlm_reads_our_arpa_and_scores_as_we_do(ts_split, tmp_path):
    """The exported ARPA loads into KenLM (every smoothing, orders up to 5; KenLM's query needs
    order >= 2) and KenLM's scores are ours."""
    kenlm = pytest.importorskip("kenlm")
    lines = (ts_split / "test.txt").read_text(encoding="utf-8").split("\n")[:200]
    for order, smoothing in ((5, "modified_kneser_ney"), (4, "kneser_ney"), (3, "add_k")):
        model = NGramLM.train([ts_split / "train.txt"], order=order, smoothing=smoothing, k=0.1)
        model.write_arpa(tmp_path / "m.arpa")
        ref = kenlm.Model(str(tmp_path / "m.arpa"))
        for line in lines:
            ids = torch.tensor([[BOS_ID, *model.encode(line), EOS_ID]])
            ours = model.token_logprobs(ids)[0] / math.log(10)
            theirs = [s[0] for s in ref.full_scores(line)]
            assert ours.tolist() == pytest.approx(theirs, abs=2e-5), line


def test_out_of_range_ids_and_literal_markers():
    model = NGramLM.train_texts(["a b", "b a"], order=2, discount_fallback=True)
    with pytest.raises(InputError, match="token ids must lie in"):
        model.token_logprobs(torch.tensor([[BOS_ID, model.vocab_size]]))
    # a literal <s> or </s> inside a line is an unknown word, not a sentence marker
    assert model.encode("a </s> <s>") == [model.word_ids["a"], UNK_ID, UNK_ID]
    # scoring splits words on ASCII 9-13 and space, as KenLM's query does
    assert model.encode("a\fb\vb\t\ra") == [model.word_ids[w] for w in "abba"]

import pytest
import torch

from lmstack.data.batches import CLS, SEP, BatchMaker, required_specials, sentinel, span_counts
from lmstack.data.shards import TokenShards, prepare_shards
from lmstack.errors import InputError
from lmstack.tokenizers import EOT, MASK
from lmstack.tokenizers.char import CharTokenizer


@pytest.fixture(scope="module")
def corpus(shared, tmp_path_factory):
    path = shared / "data" / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")[:200_000]
    out = tmp_path_factory.mktemp("shards")
    (out / "c.txt").write_text(text)
    tok = CharTokenizer.train([text], special_tokens=(EOT,))
    prepare_shards([out / "c.txt"], tok, out / "s", val_fraction=0.0)
    return TokenShards.open(out / "s", "train"), tok, text


def maker(corpus, kind, block=64, rows=8, batch=8, **kw):
    shards, base, _ = corpus
    tok = CharTokenizer(base.chars, dict(base.special_tokens))
    tok.add_special_tokens(required_specials(kind, block))
    return BatchMaker(shards, tok, kind, block, rows, batch, seed=7, **kw), tok


def test_clm_targets_are_the_next_tokens_and_batches_are_seeded(corpus):
    m, tok = maker(corpus, "clm")
    b = m.make(3, 0)
    assert torch.equal(b["idx"][:, 1:], b["targets"][:, :-1])
    text = corpus[2]
    for row in b["idx"]:
        assert tok.decode(row.tolist()) in text
    assert torch.equal(b["idx"], m.make(3, 0)["idx"])
    assert not torch.equal(b["idx"], m.make(4, 0)["idx"])


def test_micro_batches_are_slices_of_the_global_batch(corpus):
    c8, _ = maker(corpus, "clm", rows=8, batch=8)
    c2, _ = maker(corpus, "clm", rows=8, batch=2)
    assert torch.equal(c8.make(5, 0)["idx"], torch.cat([c2.make(5, i)["idx"] for i in range(4)]))
    with pytest.raises(ValueError):
        c2.make(5, 4)


def test_mlm_masks_15_percent_with_80_10_10(corpus):
    m, tok = maker(corpus, "mlm", block=128, rows=64, batch=64)
    b = m.make(0, 0)
    original = torch.where(b["targets"] != -100, b["targets"], b["idx"])
    chosen = b["targets"] != -100
    assert 0.14 < chosen.float().mean() < 0.16
    masked = (b["idx"] == tok.special_tokens[MASK]) & chosen
    kept = (b["idx"] == original) & chosen
    assert 0.77 < masked.sum() / chosen.sum() < 0.83
    assert 0.08 < kept.sum() / chosen.sum() < 0.12  # ~10% kept, plus a random pick that hit the same id
    # special tokens (the end-of-text separators) are never chosen
    assert not (chosen & (original == tok.eot_id)).any()


def test_nsp_pairs_have_segments_types_and_labels(corpus):
    m, tok = maker(corpus, "nsp", block=64, rows=32, batch=32, mlm_probability=0.0)
    b = m.make(1, 0)
    cls, sep = tok.special_tokens[CLS], tok.special_tokens[SEP]
    text = corpus[2]
    assert (b["idx"][:, 0] == cls).all() and (b["idx"][:, -1] == sep).all()
    assert 8 <= b["next_label"].sum() <= 24
    for ids, types, label in zip(b["idx"], b["token_type"], b["next_label"]):
        first_sep = int((ids == sep).nonzero()[0])
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all()
        a, bseg = tok.decode(ids[1:first_sep].tolist()), tok.decode(ids[first_sep + 1 : -1].tolist())
        if label == 0:
            assert a + bseg in text  # B continues A


def test_span_corruption_inputs_and_targets_rebuild_the_window(corpus):
    m, tok = maker(corpus, "span", block=100, rows=8, batch=8)
    noise, spans = span_counts(100, 0.15, 3.0)
    assert (noise, spans) == (15, 5)
    b = m.make(2, 0)
    assert b["idx"].shape == (8, 100 - noise + spans) and b["targets"].shape == (8, noise + spans + 1)
    sentinels = {tok.special_tokens[sentinel(i)]: i for i in range(spans)}
    text = corpus[2]
    for inp, tgt in zip(b["idx"].tolist(), b["targets"].tolist()):
        assert tgt[-1] == tok.eot_id
        filled, current = {}, None
        for t in tgt[:-1]:
            if t in sentinels:
                current = sentinels[t]
                filled[current] = []
            else:
                filled[current].append(t)
        assert sorted(filled) == list(range(spans)) and all(filled.values())
        rebuilt = [x for t in inp for x in (filled[sentinels[t]] if t in sentinels else [t])]
        assert len(rebuilt) == 100 and tok.decode(rebuilt) in text


def test_rtd_keeps_the_original_ids(corpus):
    m, _ = maker(corpus, "rtd")
    b = m.make(0, 0)
    chosen = b["targets"] != -100
    assert torch.equal(b["original"][chosen], b["targets"][chosen])
    assert torch.equal(b["original"][~chosen], b["idx"][~chosen])


def test_missing_special_tokens_and_bad_sizes_are_reported(corpus):
    shards, tok, _ = corpus
    with pytest.raises(InputError, match="needs special tokens"):
        BatchMaker(shards, tok, "mlm", 32, 8, 8)
    with pytest.raises(InputError, match="not a multiple of --batch-size"):
        BatchMaker(shards, tok, "clm", 32, 8, 3)
    with pytest.raises(InputError, match="unknown objective"):
        BatchMaker(shards, tok, "dpo", 32, 8, 8)

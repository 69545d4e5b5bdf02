import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import CheckpointError, ContextLengthError, InputError
from lmstack.models import load
from lmstack.models.bert import BERT, BERTConfig, from_hf_bert

transformers = pytest.importorskip("transformers")

V, CLS, SEP, MASK, PAD = 40, 2, 3, 4, 0


def _randomized(model):
    """BERT's N(0, 0.02) init keeps activations near 0, where gelu variants agree to 1e-4; larger
    random weights make the comparison see every difference."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _hf_config(**kw):
    return transformers.BertConfig(
        **{
            "vocab_size": V,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 24,
            "max_position_embeddings": 24,
            "type_vocab_size": 2,
            "pad_token_id": PAD,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def hf_pretraining(tmp_path_factory):
    """A tiny random BertForPreTraining saved like a hub checkpoint, with a WordPiece vocab.txt."""
    torch.manual_seed(0)
    hf = _randomized(transformers.BertForPreTraining(_hf_config()))
    d = tmp_path_factory.mktemp("hf_bert_pt")
    hf.save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return hf, d


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (3, 10), generator=g)
    ids[:, 0] = CLS
    lengths = [10, 7, 4]
    mask = torch.zeros(3, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = SEP
        ids[b, n:] = PAD
        mask[b, :n] = 1
    types = (torch.arange(10) >= 5).long().expand(3, 10) * mask
    return ids, mask, types


def test_mlm_logits_match_transformers_with_padding(tmp_path):
    torch.manual_seed(0)
    hf = _randomized(transformers.BertForMaskedLM(_hf_config(hidden_act="gelu_new")))
    hf.save_pretrained(tmp_path)
    ours, tok = from_hf_bert(tmp_path)
    assert tok is None and ours.config.activation == "gelu_new"
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types)
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max() <= 1e-4


def test_pretraining_heads_and_size_match_transformers(hf_pretraining):
    hf, d = hf_pretraining
    ours, _ = from_hf_bert(d)
    assert (ours.config.mask_token_id, ours.config.cls_token_id, ours.config.sep_token_id) == (MASK, CLS, SEP)
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        keep = mask.bool()
        assert (ours(ids, mask, types)[keep] - ref.prediction_logits[keep]).abs().max() <= 1e-4
        assert (ours.nsp_logits(ids, mask, types) - ref.seq_relationship_logits).abs().max() <= 1e-4
    assert ours.num_params() == hf.num_parameters()


def test_padding_does_not_change_real_positions(hf_pretraining):
    ours, _ = from_hf_bert(hf_pretraining[1])
    ids, mask, types = _batch()
    with torch.no_grad():
        alone = ours(ids[2:, :4], mask[2:, :4], types[2:, :4])
        batched = ours(ids, mask, types)[2:, :4]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_pseudo_log_likelihood_matches_masking_each_position_in_hf(hf_pretraining):
    hf, d = hf_pretraining
    ours, _ = from_hf_bert(d)
    ids, mask, _ = _batch()
    got = ours.pseudo_log_likelihood(ids, mask, batch_size=7)  # batches straddle sentences
    mlm = transformers.BertForMaskedLM(hf.config).eval()
    mlm.load_state_dict(hf.state_dict(), strict=False)
    for b in range(3):
        n = int(mask[b].sum())
        expect = 0.0
        for i in range(1, n - 1):  # Salazar et al.: every token but [CLS] and [SEP]
            x = ids[b : b + 1, :n].clone()
            x[0, i] = MASK
            with torch.no_grad():
                expect += mlm(input_ids=x).logits[0, i].log_softmax(-1)[ids[b, i]].item()
        assert abs(got[b].item() - expect) <= 1e-4


def test_pll_needs_a_mask_id():
    m = BERT(BERTConfig.preset("tiny")).eval()
    with pytest.raises(InputError, match="mask_token_id"):
        m.pseudo_log_likelihood(torch.tensor([[1, 2, 3]]))


def test_save_load_round_trip(hf_pretraining, tmp_path):
    ours, _ = from_hf_bert(hf_pretraining[1])
    ours.save(tmp_path / "ck")
    again, tok = load(tmp_path / "ck")
    assert isinstance(again, BERT) and tok is None and again.config == ours.config
    ids, mask, types = _batch()
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, types), again(ids, mask, types))
        assert torch.equal(ours.nsp_logits(ids, mask, types), again.nsp_logits(ids, mask, types))


def test_classification_head_learns_to_separate_two_classes():
    torch.manual_seed(0)
    m = BERT(BERTConfig.preset("tiny", vocab_size=V, n_labels=2, dropout=0.0))
    ids = torch.randint(5, V, (8, 6))
    ids[:4, 1], ids[4:, 1] = 5, 6  # the label is the token in position 1
    labels = torch.tensor([0] * 4 + [1] * 4)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(m.classify(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m.classify(ids).argmax(-1) == labels).all()
    with pytest.raises(InputError, match="n_labels"):
        BERT(BERTConfig.preset("tiny")).classify(ids)


def test_too_long_input_is_named():
    m = BERT(BERTConfig.preset("tiny", max_position=8))
    with pytest.raises(ContextLengthError, match="9 tokens .* context of 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_bad_hf_directories_are_named(hf_pretraining, tmp_path):
    _, d = hf_pretraining
    cfg = json.loads((d / "config.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))

    def write(name, config, weights):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        save_file(weights, str(tmp_path / name / "model.safetensors"))
        return tmp_path / name

    with pytest.raises(CheckpointError, match="model_type is 'gpt2', expected 'bert'"):
        from_hf_bert(write("wrong", {**cfg, "model_type": "gpt2"}, tensors))
    key = "bert.encoder.layer.1.attention.self.key.weight"
    with pytest.raises(CheckpointError, match="missing tensors .*encoder.layer.1.attention.self.key.weight"):
        from_hf_bert(write("missing", cfg, {k: v for k, v in tensors.items() if k != key}))
    with pytest.raises(CheckpointError, match="ff_in.weight' has shape"):
        from_hf_bert(write("shape", {**cfg, "intermediate_size": 32}, tensors))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/config.json").write_text(json.dumps(cfg))
    (tmp_path / "bin/pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        from_hf_bert(tmp_path / "bin")


def test_sizes():
    base = BERT(BERTConfig.preset("bert-base"))
    assert 109_000_000 < base.num_params() < 111_000_000  # BERT-base: 110M (Devlin et al.)
    assert BERTConfig.preset("d4") == BERTConfig.sized(4)
    assert BERTConfig.sized(4).d_model == 256
    tiny = BERT(BERTConfig.preset("tiny"))
    c = tiny.config
    per_layer = 4 * c.d_model**2 + 2 * c.d_model * c.d_ff
    weights = c.n_layers * per_layer + c.d_model**2 + c.vocab_size * c.d_model
    assert tiny.flops_per_token(16, training=False) == 2 * weights + 4 * c.n_layers * c.d_model * 16

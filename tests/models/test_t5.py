import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import CheckpointError, InputError
from lmstack.generation import GenerationConfig, beam_search, generate_tokens
from lmstack.models import load
from lmstack.models.t5 import T5, T5Config, from_hf_t5, relative_position_bucket

transformers = pytest.importorskip("transformers")

V = 50


def _hf(tmp_path, feed_forward_proj="relu", tie_word_embeddings=True, untie_head=False):
    """A tiny random T5ForConditionalGeneration saved to `tmp_path`. Few buckets and a short
    max_distance, so the sequences below reach the logarithmic buckets and the last one."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=16,
        d_kv=6,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie_word_embeddings,
        decoder_start_token_id=0,
    )
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init, so every mismatch shows in the logits
        for p in hf.parameters():
            p.normal_(0, 0.4)
    hf.save_pretrained(tmp_path)
    if untie_head:  # a separate output matrix, as in T5 v1.1 hub checkpoints
        hf.lm_head = torch.nn.Linear(16, V, bias=False)
        tensors = load_file(str(tmp_path / "model.safetensors"))
        save_file({**tensors, "lm_head.weight": hf.lm_head.weight.detach().clone()}, str(tmp_path / "model.safetensors"))
    return hf


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, V, (2, 20), generator=g)
    src_mask = torch.ones_like(src)
    src[1, 13:], src_mask[1, 13:] = 0, 0
    tgt = torch.randint(2, V, (2, 15), generator=g)
    return src, src_mask, tgt


@pytest.mark.parametrize(
    "proj,tie,untie_head", [("relu", True, False), ("gated-gelu", False, False), ("gated-gelu", False, True)]
)
def test_teacher_forced_logits_match_transformers(tmp_path, proj, tie, untie_head):
    hf = _hf(tmp_path, proj, tie, untie_head)
    ours, tok = from_hf_t5(tmp_path)
    assert tok is None and ours.config.tie_embeddings == (not untie_head)
    src, src_mask, tgt = _batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, labels=tgt)
        logits, loss = ours(src, tgt, src_mask)
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-4
    # what scoring reads: log p(tgt_t = v | tgt_<t, src) at every target position
    assert (ours.target_logprobs(src, tgt, src_mask) - ref.logits.log_softmax(-1)).abs().max() <= 1e-4
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_log_prob_is_sum_of_target_log_probs_from_transformers(tmp_path):
    hf = _hf(tmp_path, "gated-gelu", False)
    ours, _ = from_hf_t5(tmp_path)
    src, src_mask, tgt = _batch()
    tgt_mask = torch.ones_like(tgt)
    tgt_mask[0, 9:] = 0
    with torch.no_grad():
        lp = hf(input_ids=src, attention_mask=src_mask, labels=tgt).logits.log_softmax(-1)
    expect = (lp.gather(-1, tgt[..., None]).squeeze(-1) * tgt_mask).sum(-1)
    torch.testing.assert_close(ours.log_prob(src, tgt, src_mask, tgt_mask), expect, atol=1e-4, rtol=0)
    # default masks come from the pad id (0): the same sequences, padded
    padded = tgt.masked_fill(tgt_mask == 0, 0)
    torch.testing.assert_close(ours.log_prob(src, padded), expect, atol=1e-4, rtol=0)


def test_cached_incremental_decoding_matches_full_forward(tmp_path):
    hf = _hf(tmp_path)
    ours, _ = from_hf_t5(tmp_path)
    src, src_mask, tgt = _batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, labels=tgt).logits.log_softmax(-1)
    state, lp = ours.start(src, src_mask=src_mask)
    assert (lp - ref[:, 0]).abs().max() <= 1e-4
    for t in range(1, 15):
        state, lp = ours.step(state, tgt[:, t - 1])
        assert (lp - ref[:, t]).abs().max() <= 1e-4
    # starting from a decoder prompt is the same as stepping through it
    state, lp = ours.start(src, prompt=tgt[:, :6], src_mask=src_mask)
    assert (lp - ref[:, 6]).abs().max() <= 1e-4
    state, lp = ours.step(state, tgt[:, 6])
    assert (lp - ref[:, 7]).abs().max() <= 1e-4


def test_greedy_and_beam_search_equal_transformers_generate(tmp_path):
    hf = _hf(tmp_path, "gated-gelu", False)
    ours, _ = from_hf_t5(tmp_path)
    src = [7, 3, 9, 22, 41]

    def hf_generate(**kw):
        # no eos: neither side ends early; no cache: transformers' decoder cache assumes as many
        # decoder layers as encoder layers, and this model has 3 and 2
        with torch.no_grad():
            return hf.generate(
                torch.tensor([src]),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=None,
                use_cache=False,
                output_scores=True,
                return_dict_in_generate=True,
                **kw,
            )

    greedy = hf_generate().sequences[0, 1:].tolist()  # after the decoder start token
    assert generate_tokens(ours, [src], GenerationConfig(max_new_tokens=10, temperature=0))[0].tokens == greedy
    assert beam_search(ours, src, num_beams=1, max_new_tokens=10)[0].tokens == greedy
    # wider beams diverge from greedy and from each other: `reorder` must carry each beam's cache
    ref = hf_generate(num_beams=4, num_return_sequences=3)
    beams = beam_search(ours, src, num_beams=4, max_new_tokens=10, n=3)
    assert [b.tokens for b in beams] == ref.sequences[:, 1:].tolist()
    torch.testing.assert_close(torch.tensor([b.score for b in beams]), ref.sequences_scores.float(), atol=1e-4, rtol=0)


def test_relative_position_buckets_match_transformers():
    rel = torch.arange(-300, 300)[None, :]
    T5Attention = transformers.models.t5.modeling_t5.T5Attention
    for bidirectional in (True, False):
        for buckets, distance in [(32, 128), (8, 12)]:
            ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), ref)


def test_source_padding_does_not_change_the_result():
    torch.manual_seed(0)
    m = T5(T5Config.preset("tiny", dropout=0.0)).eval()
    src = torch.randint(2, 256, (1, 7))
    tgt = torch.randint(2, 256, (1, 5))
    padded = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(m.log_prob(padded, tgt), m.log_prob(src, tgt), atol=1e-5, rtol=0)


def test_learns_a_seq2seq_task_and_greedy_decodes_it():
    torch.manual_seed(0)
    m = T5(T5Config.preset("tiny", vocab_size=12, dropout=0.0, n_layers=1, n_decoder_layers=1))
    src = torch.tensor([[3, 4, 5, 1], [6, 7, 8, 1], [9, 10, 11, 1]])
    tgt = torch.tensor([[5, 4, 3, 1], [8, 7, 6, 1], [11, 10, 9, 1]])  # reverse, then eos
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for _ in range(30):
        _, loss = m(src, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    state, lp = m.start(src)
    out = []
    for _ in range(4):
        tok = lp.argmax(-1)
        out.append(tok)
        state, lp = m.step(state, tok)
    assert torch.equal(torch.stack(out, 1), tgt)


def test_ignored_targets_do_not_count_in_the_loss():
    torch.manual_seed(0)
    m = T5(T5Config.preset("tiny", dropout=0.0)).eval()
    src, tgt = torch.randint(2, 256, (1, 6)), torch.randint(2, 256, (1, 5))
    _, full = m(src, tgt)
    ignored = tgt.clone()
    ignored[0, 3:] = -100
    logits, part = m(src, ignored)
    expect = torch.nn.functional.cross_entropy(logits[0, :3], tgt[0, :3])
    torch.testing.assert_close(part, expect)
    assert not torch.isclose(part, full)


def test_save_load_round_trip(tmp_path):
    _hf(tmp_path / "hf", "gated-gelu", False, untie_head=True)
    ours, _ = from_hf_t5(tmp_path / "hf")
    ours.save(tmp_path / "ck")
    again, _ = load(tmp_path / "ck")
    assert isinstance(again, T5) and again.config == ours.config
    src, src_mask, tgt = _batch()
    assert torch.equal(ours.log_prob(src, tgt, src_mask), again.log_prob(src, tgt, src_mask))


def test_bad_input_is_named(tmp_path):
    _hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))

    def write(name, config, weights):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        save_file(weights, str(tmp_path / name / "model.safetensors"))
        return tmp_path / name

    with pytest.raises(CheckpointError, match="model_type is 'bert', expected 't5'"):
        from_hf_t5(write("wrong", {**cfg, "model_type": "bert"}, tensors))
    key = "decoder.block.2.layer.1.EncDecAttention.v.weight"
    with pytest.raises(CheckpointError, match=f"missing tensors .*{key}"):
        from_hf_t5(write("missing", cfg, {k: v for k, v in tensors.items() if k != key}))
    with pytest.raises(CheckpointError, match="ff.wi.weight' has shape"):
        from_hf_t5(write("shape", {**cfg, "d_ff": 32}, tensors))
    m, _ = from_hf_t5(tmp_path / "hf")
    with pytest.raises(InputError, match="source token ids must be in"):
        m.log_prob(torch.tensor([[1, V]]), torch.tensor([[1]]))


def test_sizes():
    small = T5(T5Config.preset("t5-small", dropout=0.0))
    assert 60_000_000 < small.num_params() < 61_000_000  # t5-small: 60M (Raffel et al.)
    assert T5Config.preset("d6") == T5Config.sized(6)
    tiny = T5(T5Config.preset("tiny"))
    c = tiny.config
    # one example of 10 source and 4 target tokens, counted by hand
    inner, S, T = c.n_heads * c.d_kv, 10, 4
    enc = c.n_layers * (2 * (4 * c.d_model * inner + 2 * c.d_model * c.d_ff) * S + 4 * inner * S * S)
    dec = c.n_decoder_layers * (
        2 * (6 * c.d_model * inner + 2 * c.d_model * c.d_ff) * T
        + 4 * c.d_model * inner * S
        + 4 * inner * T * T
        + 4 * inner * T * S
    )
    head = 2 * c.d_model * c.vocab_size * T
    assert tiny.flops_per_token(S, T, training=False) == (enc + dec + head) // (S + T)

"""Scores of a GPT-2 and a T5 imported from tiny random `transformers` models equal `transformers`' own."""

import json
import math

import pytest
import torch

from lmstack.errors import ContextLengthError, InputError
from lmstack.evaluation.scoring import loglikelihoods, score_text, token_scores
from lmstack.tokenizers.char import CharTokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.train(["the quick brown fox jumps over the lazy dog. THE END?"], special_tokens=("<|endoftext|>",))


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """(lmstack GPT, transformers GPT2LMHeadModel) with the same random weights."""
    from lmstack.models.hf import from_hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(path)
    model, _ = from_hf(path)
    return model, hf


@pytest.fixture(scope="module")
def t5_pair(tokenizer, tmp_path_factory):
    """(lmstack T5, transformers T5ForConditionalGeneration), v1.1 layout, the same random weights."""
    from lmstack.models.t5 import from_hf_t5

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("hf-t5")
    hf.save_pretrained(path)
    model, _ = from_hf_t5(path)
    return model, hf


def hf_t5(hf, source, target):
    """(log p(target | source) from transformers' own loss, [T, V] log-probs of each target position)."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([source]), labels=torch.tensor([target]))
    return -out.loss.item() * len(target), out.logits[0].log_softmax(-1)


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_per_token_logprobs_and_perplexity_match_transformers(pair):
    model, hf = pair
    ids = torch.randint(0, model.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = token_scores(model, ids, top=3)
    ref = hf_logprobs(hf, ids)[:-1]
    expected = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in ours]), expected, atol=1e-4, rtol=0)
    assert [t.top[0][0] for t in ours] == ref.argmax(-1).tolist()
    with torch.no_grad():
        hf_ppl = math.exp(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    ppl = math.exp(-sum(t.logprob for t in ours) / len(ours))
    assert ppl == pytest.approx(hf_ppl, rel=1e-4)


def test_conditional_score_of_a_continuation(pair, tokenizer):
    model, hf = pair
    prompt, answer = "the quick brown fox", " jumps over"
    out = score_text(model, tokenizer, prompt, answer, top=2)
    p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
    ref = hf_logprobs(hf, p + a)[len(p) - 1 : -1].gather(-1, torch.tensor(a)[:, None])[:, 0]
    assert out["logprob"] == pytest.approx(float(ref.sum()), abs=1e-4)
    assert out["num_tokens"] == len(a) and "".join(t["piece"] for t in out["tokens"]) == answer
    assert out["perplexity"] == pytest.approx(math.exp(-float(ref.mean())), rel=1e-4)
    assert all(len(t["top"]) == 2 and t["top"][0]["logprob"] >= t["top"][1]["logprob"] for t in out["tokens"])
    # The same answer after a different prompt gets its own, different score.
    other = score_text(model, tokenizer, "THE END?", answer)
    assert other["logprob"] != pytest.approx(out["logprob"], abs=1e-6)


def test_a_whole_text_is_scored_from_end_of_text(pair, tokenizer):
    model, hf = pair
    out = score_text(model, tokenizer, "lazy dog", top=0)
    ids = [tokenizer.eot_id] + tokenizer.encode("lazy dog")
    ref = hf_logprobs(hf, ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum()
    assert out["logprob"] == pytest.approx(float(ref), abs=1e-4)
    assert out["is_greedy"] is None


def test_batched_loglikelihoods_equal_one_at_a_time(pair):
    model, _ = pair
    g = torch.Generator().manual_seed(2)
    requests = [
        (
            torch.randint(0, model.vocab_size, (c,), generator=g).tolist(),
            torch.randint(0, model.vocab_size, (k,), generator=g).tolist(),
        )
        for c, k in ((3, 2), (20, 5), (1, 1), (9, 9))
    ]
    greedy_ctx = [5, 6, 7]
    greedy_cont = [int(model.next_token_logprobs(torch.tensor([greedy_ctx]))[0, -1].argmax())]
    results = loglikelihoods(model, requests + [(greedy_ctx, greedy_cont)])
    for (context, continuation), (logprob, is_greedy) in zip(requests, results):
        alone = token_scores(model, context + continuation, start=len(context), top=1)
        assert logprob == pytest.approx(sum(t.logprob for t in alone), abs=1e-4)
        assert is_greedy == all(t.top[0][0] == t.token for t in alone)
    assert results[-1][1] is True


def test_a_long_context_keeps_its_end(pair):
    model, _ = pair  # context of 48 tokens
    context, continuation = list(range(5)) * 20, [3, 4]
    [(logprob, _)] = loglikelihoods(model, [(context, continuation)])
    kept = (context + continuation)[-49:]
    assert logprob == pytest.approx(sum(t.logprob for t in token_scores(model, kept, start=47)), abs=1e-4)
    with pytest.raises(ContextLengthError):
        token_scores(model, list(range(50)))


def test_bad_input_is_one_clear_error(pair, tokenizer):
    model, _ = pair
    with pytest.raises(InputError, match="nothing to score"):
        score_text(model, tokenizer, "the", "")
    with pytest.raises(InputError, match="non-empty"):
        loglikelihoods(model, [([], [1])])


def test_score_command(cli, pair, tokenizer, tmp_path):
    model, _ = pair
    model.save(tmp_path, tokenizer)
    proc = cli("score", "--model", tmp_path, "--prompt", "the lazy", "--continuation", " dog", "--top", "3", "--json", check=True)
    result = json.loads(proc.stdout)
    expected = score_text(model, tokenizer, "the lazy", " dog", top=3)
    assert result["logprob"] == pytest.approx(expected["logprob"], abs=1e-5)
    assert [t["top"][0]["token"] for t in result["tokens"]] == [t["top"][0]["token"] for t in expected["tokens"]]
    text = cli("score", "--model", tmp_path, "--prompt", "the lazy", "--continuation", " dog", check=True).stdout
    assert f"logprob {expected['logprob']:.4f} over 4 tokens" in text
    bad = cli("score", "--model", tmp_path, "--prompt", "x", "--continuation", "")
    assert bad.returncode != 0 and "nothing to score" in bad.stderr


def test_t5_scores_the_continuation_as_target_given_the_prompt_as_source(t5_pair, tokenizer):
    model, hf = t5_pair
    prompt, answer = "the quick brown fox", " jumps over"
    out = score_text(model, tokenizer, prompt, answer, top=3)
    total, lp = hf_t5(hf, tokenizer.encode(prompt), tokenizer.encode(answer))
    target = torch.tensor(tokenizer.encode(answer))
    assert out["logprob"] == pytest.approx(total, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(-total / len(target)), rel=1e-4)
    assert out["num_tokens"] == len(target) and "".join(t["piece"] for t in out["tokens"]) == answer
    torch.testing.assert_close(
        torch.tensor([t["logprob"] for t in out["tokens"]]), lp.gather(-1, target[:, None])[:, 0], atol=1e-4, rtol=0
    )
    for t, row in zip(out["tokens"], lp):
        alts = [a["logprob"] for a in t["top"]]
        assert alts == sorted(alts, reverse=True) and t["top"][0]["token"] == int(row.argmax())
        torch.testing.assert_close(torch.tensor(alts), row.topk(3).values, atol=1e-4, rtol=0)
    assert out["is_greedy"] == bool((lp.argmax(-1) == target).all())


def test_t5_loglikelihoods_batched_equal_transformers(t5_pair):
    model, hf = t5_pair
    g = torch.Generator().manual_seed(3)
    # contexts of every length, one longer than any GPT window here: T5 reads it all as its source
    requests = [
        (
            torch.randint(0, model.vocab_size, (c,), generator=g).tolist(),
            torch.randint(0, model.vocab_size, (k,), generator=g).tolist(),
        )
        for c, k in ((3, 2), (80, 5), (1, 1), (9, 9))
    ]
    source = [5, 6, 7]
    greedy = [int(model.start(torch.tensor([source]), src_mask=torch.ones(1, 3))[1][0].argmax())]
    results = loglikelihoods(model, requests + [(source, greedy)])
    for (context, continuation), (logprob, is_greedy) in zip(requests, results):
        total, lp = hf_t5(hf, context, continuation)
        assert logprob == pytest.approx(total, abs=1e-4)
        assert is_greedy == (lp.argmax(-1).tolist() == continuation)
    assert results[-1][1] is True


def test_t5_needs_a_continuation(t5_pair, tokenizer):
    model, _ = t5_pair
    with pytest.raises(InputError, match="--continuation"):
        score_text(model, tokenizer, "the quick brown fox")


def test_an_ngram_scores_from_the_start_of_a_line():
    """Without a continuation, an n-gram's text is scored after <s>, as its perplexity counts a line
    (less the final </s>); with one, the prompt too begins a line."""
    from lmstack.models.ngram import BOS_ID, NGramLM

    model = NGramLM.train_texts(["x y"] * 3 + ["z x w"] * 5, order=3, discount_fallback=True)
    vocab = model.text_tokenizer()
    line = torch.tensor([[BOS_ID, *model.encode("x y")]])
    assert score_text(model, vocab, "x y")["logprob"] == pytest.approx(float(model.token_logprobs(line).sum()))
    after_x = score_text(model, vocab, "x", " y")
    assert after_x["logprob"] == pytest.approx(float(model.token_logprobs(line)[0, 1]))

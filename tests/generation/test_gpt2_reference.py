"""Greedy decoding and beam search on a GPT-2 imported from a tiny random `transformers` model
equal `transformers`' `generate`."""

import pytest
import torch

from lmstack.generation import GenerationConfig, beam_search, generate_tokens

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from lmstack.models.hf import from_hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=211, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharpen the random model so greedy paths are not near-ties
        hf.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(path)
    model, _ = from_hf(path)
    return model, hf


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate(pair):
    model, hf = pair
    prompts = [[5], [17, 3, 99, 42, 8, 150], list(range(100, 130))]
    outs = generate_tokens(model, prompts, GenerationConfig(max_new_tokens=30, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.tokens == hf_greedy(hf, prompt, 30)


def test_beam_width_one_equals_transformers_greedy(pair):
    model, hf = pair
    [beam] = beam_search(model, [17, 3, 99], num_beams=1, max_new_tokens=20)
    assert beam.tokens == hf_greedy(hf, [17, 3, 99], 20)


def test_beam_search_equals_transformers_beam_search(pair):
    model, hf = pair
    prompt = [17, 3, 99]
    ours = beam_search(model, prompt, num_beams=4, max_new_tokens=12, n=3)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 3, dtype=torch.long),
            max_new_tokens=12,
            min_new_tokens=12,
            num_beams=4,
            num_return_sequences=3,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert [b.tokens for b in ours] == ref.sequences[:, 3:].tolist()
    torch.testing.assert_close(torch.tensor([b.score for b in ours]), ref.sequences_scores.float(), atol=1e-4, rtol=0)

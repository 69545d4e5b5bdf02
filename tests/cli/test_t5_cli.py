"""`lmstack score` and `lmstack generate` on a T5 checkpoint: the prompt is the encoder's source."""

import json

import pytest
import torch

from lmstack.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random T5 with a char tokenizer whose pad and end-of-text ids the config names, as
    `lmstack train` saves one."""
    from lmstack.models.t5 import T5, T5Config
    from lmstack.tokenizers import EOT, PAD
    from lmstack.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(["the cat sat on the mat. a dog!"], special_tokens=(EOT, PAD))
    pad = tok.special_id(PAD)
    torch.manual_seed(0)
    model = T5(
        T5Config.preset("tiny", vocab_size=tok.vocab_size, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=tok.eot_id)
    )
    return model.save(tmp_path_factory.mktemp("t5"), tok)


def log_p(model, tok, source: str, target: list[int]) -> float:
    """log p(target | source) by the model's own teacher-forced `log_prob`."""
    tgt = torch.tensor([target])
    with torch.no_grad():
        return float(model.log_prob(torch.tensor([tok.encode(source)]), tgt, tgt_mask=torch.ones_like(tgt)))


def test_score_json_is_log_p_of_the_continuation_given_the_prompt(lmstack_cli, checkpoint):
    import lmstack

    got = json.loads(
        lmstack_cli("score", "--model", checkpoint, "--prompt", "the cat", "--continuation", " sat on", "--top", "3", "--json")
    )
    model, tok = lmstack.load(checkpoint)
    assert got["logprob"] == pytest.approx(log_p(model, tok, "the cat", tok.encode(" sat on")), abs=1e-4)
    assert "".join(t["piece"] for t in got["tokens"]) == " sat on" and got["num_tokens"] == 7
    assert all(len(t["top"]) == 3 for t in got["tokens"])


def test_score_without_a_continuation_is_one_clear_error(checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")
    assert main(["score", "--model", str(checkpoint), "--prompt", "the cat"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--continuation" in err


def test_greedy_generate_decodes_from_the_prompt_as_source(lmstack_cli, checkpoint):
    import lmstack

    model, tok = lmstack.load(checkpoint)
    prompts = ["the cat", "a"]  # two source lengths in one call
    out = lmstack_cli(
        "generate",
        "--model",
        checkpoint,
        *(a for p in prompts for a in ("--prompt", p)),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    )
    rows = [json.loads(line) for line in out.splitlines()]
    for prompt, row in zip(prompts, rows):
        state, lp = model.start(torch.tensor([tok.encode(prompt)]))
        expected = []
        while len(expected) < 8 and (token := int(lp[0].argmax())) != tok.eot_id:
            expected.append(token)
            state, lp = model.step(state, torch.tensor([token]))
        assert row["prompt"] == prompt and row["tokens"] == expected and row["text"] == tok.decode(expected)


def test_beam_search_scores_each_beam_given_the_source(lmstack_cli, checkpoint):
    import lmstack

    model, tok = lmstack.load(checkpoint)
    out = json.loads(
        lmstack_cli(
            "generate",
            "--model",
            checkpoint,
            "--prompt",
            "the cat",
            "--beams",
            "3",
            "--num-return",
            "2",
            "--max-tokens",
            "6",
            "--ignore-eot",
            "--json",
        )
    )
    beams = out["beams"]
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"] and beams[0]["tokens"] != beams[1]["tokens"]
    for b in beams:
        assert b["logprob"] == pytest.approx(log_p(model, tok, "the cat", b["tokens"]), abs=1e-4)

"""`lmstack generate` as a user runs it."""

import json

import pytest
import torch

from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers.char import CharTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = CharTokenizer.train(["hello world, the cat sat on the mat"], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt")
    GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).save(path, tok)
    return path


def test_greedy_json_is_reproducible_and_matches_the_api(cli, checkpoint):
    import lmstack
    from lmstack.generation import GenerationConfig, generate

    args = (
        "generate",
        "--model",
        checkpoint,
        "--prompt",
        "the cat",
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    )
    lines = cli(*args, check=True).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    model, tok = lmstack.load(checkpoint)
    expected = generate(model, tok, ["the cat", "hello"], GenerationConfig(max_new_tokens=8, temperature=0))
    assert [r["tokens"] for r in rows] == [e.tokens for e in expected]
    assert [r["prompt"] for r in rows] == ["the cat", "hello"]
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)


def test_seeded_sampling_and_streaming(cli, checkpoint):
    args = (
        "generate",
        "--model",
        checkpoint,
        "--prompt",
        "the",
        "--seed",
        "3",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--max-tokens",
        "12",
    )
    first = cli(*args, check=True).stdout
    assert first == cli(*args, check=True).stdout
    assert first.startswith("the")
    streamed = cli(*args, "--stream", check=True).stdout
    assert streamed == first


def test_beam_search_prints_the_n_best(cli, checkpoint):
    out = cli(
        "generate",
        "--model",
        checkpoint,
        "--prompt",
        "the",
        "--beams",
        "3",
        "--num-return",
        "2",
        "--max-tokens",
        "5",
        "--json",
        check=True,
    ).stdout
    beams = json.loads(out)["beams"]
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--top-p", "0"), "top_p must be in"),
        (("--max-tokens", "-1"), "--max-tokens must be >= 0; got -1"),
        (("--stop", ""), "--stop takes non-empty strings"),
        (("--beams", "2", "--stream"), "--beams cannot be combined"),
        (("--beams", "2", "--num-return", "3"), "num_beams"),
        (("--beams", "0"), "need num_beams >= 1 (--beams; 1 turns beam search off)"),
        (("--temperature", "inf"), "temperature must be a finite number; got inf"),
        (("--beams", "2", "--length-penalty", "nan"), "length_penalty must be a finite number; got nan"),
    ],
)
def test_bad_flags_are_one_line_errors(cli, checkpoint, args, message):
    proc = cli("generate", "--model", checkpoint, "--prompt", "x", *args)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_stream_whose_prompt_is_refused_prints_nothing(cli, checkpoint):
    proc = cli("generate", "--model", checkpoint, "--prompt", "the cat " * 2000, "--stream", "--max-tokens", "4")
    assert proc.returncode == 2 and "longer than the model's context" in proc.stderr
    assert proc.stdout == ""


def test_a_checkpoint_without_tokenizer_is_a_clear_error(cli, tmp_path):
    GPT(GPTConfig.preset("tiny", vocab_size=50)).save(tmp_path)
    proc = cli("generate", "--model", tmp_path, "--prompt", "x")
    assert proc.returncode != 0 and "no tokenizer.json" in proc.stderr


def test_an_ngram_generates_and_scores_in_its_own_vocabulary(cli, tmp_path):
    from lmstack.models.ngram import NGramLM

    model = NGramLM.train_texts(["a b c", "a b d", "a b c"] * 20, order=2, discount_fallback=True)
    model.save(tmp_path)
    out = json.loads(cli("generate", "--model", tmp_path, "--prompt", "a", "--temperature", "0", "--json", check=True).stdout)
    assert out["text"] == " b c" and out["finish_reason"] == "stop"  # then </s>, the likeliest after c
    got = json.loads(cli("score", "--model", tmp_path, "--prompt", "a", "--continuation", "b c", "--json", check=True).stdout)
    want = model.token_logprobs(torch.tensor([model.encode("a b c")]))[0]
    assert [t["piece"] for t in got["tokens"]] == ["b", "c"]
    assert got["logprob"] == pytest.approx(float(want.sum()))


@pytest.mark.slow
def test_compiled_decoding_prints_what_eager_decoding_does(cli, checkpoint):
    args = (
        "generate",
        "--model",
        checkpoint,
        "--prompt",
        "the cat",
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    )
    compiled = [json.loads(line) for line in cli(*args, "--compile", check=True).stdout.splitlines()]
    eager = [json.loads(line) for line in cli(*args, check=True).stdout.splitlines()]
    assert [(c["tokens"], c["text"]) for c in compiled] == [(e["tokens"], e["text"]) for e in eager]
    assert [c["logprob"] for c in compiled] == pytest.approx([e["logprob"] for e in eager], abs=1e-4)


def test_compile_is_refused_for_a_model_without_a_static_cache(cli, tmp_path):
    from lmstack.models.rnn import RNNLM, RNNConfig

    tok = CharTokenizer.train(["abc"], special_tokens=("<|endoftext|>",))
    RNNLM(RNNConfig(vocab_size=tok.vocab_size, d_embed=4, d_hidden=4, n_layers=1)).save(tmp_path, tok)
    proc = cli("generate", "--model", tmp_path, "--prompt", "ab", "--compile")
    assert proc.returncode != 0 and "--compile needs a GPT checkpoint" in proc.stderr


@pytest.mark.parametrize("extra", [(), ("--beams", "2")])
def test_a_masked_lm_is_refused_with_a_pointer_to_what_it_can_do(tmp_path, capsys, extra):
    from lmstack.cli import main
    from lmstack.models.bert import BERT, BERTConfig

    tok = CharTokenizer.train(["hello world"], special_tokens=("<|endoftext|>", "<|mask|>", "<|pad|>"))
    BERT(BERTConfig.preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path, tok)
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hello", *extra])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "does not generate text" in err and "eval perplexity" in err


def test_prompts_file_is_one_batch_after_the_prompt_flags(lmstack_cli, checkpoint, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the cat\n\nhello\n", encoding="utf-8")
    args = ("generate", "--model", checkpoint, "--temperature", "0", "--max-tokens", "6", "--json")
    from_file = [json.loads(x) for x in lmstack_cli(*args, "--prompt", "world", "--prompts-file", f).splitlines()]
    out = lmstack_cli(*args, "--prompt", "world", "--prompt", "the cat", "--prompt", "hello")
    flags = [json.loads(x) for x in out.splitlines()]
    assert [r["prompt"] for r in from_file] == ["world", "the cat", "hello"]
    assert from_file == flags


@pytest.mark.parametrize("beams", ["1", "2"])
def test_max_tokens_past_the_context_warns_once_and_stops_there(cli, checkpoint, beams):
    limit = GPTConfig.preset("tiny", vocab_size=10).block_size
    proc = cli(
        "generate",
        "--model",
        checkpoint,
        "--prompt",
        "the",
        "--prompt",
        "cat",
        "--temperature",
        "0",
        "--ignore-eot",
        "--beams",
        beams,
        "--max-tokens",
        "1000000",
        "--json",
        check=True,
    )
    warning = f"warning: max_new_tokens=1000000 goes past the model's context of {limit} tokens"
    assert proc.stderr.startswith(warning) and proc.stderr.count("\n") == 1  # one line, once for the batch
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    if beams == "1":
        assert [(len(r["tokens"]), r["finish_reason"]) for r in rows] == [(limit - 3, "length")] * 2
    else:
        assert [len(b["tokens"]) for r in rows for b in r["beams"]] == [limit - 3] * 2


@pytest.mark.parametrize("config", ["null", "[1, 2]", "42"])
def test_a_config_json_that_is_not_an_object_is_named(cli, checkpoint, tmp_path, config):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    (broken / "config.json").write_text(config)
    proc = cli("generate", "--model", broken, "--prompt", "x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "config.json: must be a JSON object of model settings" in proc.stderr

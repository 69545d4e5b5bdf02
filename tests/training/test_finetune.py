"""Supervised fine-tuning: the loss is -log P(A | Q) as `lmstack score` computes it, packing does
not change it, a tiny model learns a held-out answer format, LoRA runs train adapters only and
resume exactly, and bad input fails before the run directory exists."""

import json
import random

import pytest
import torch

from lmstack.cli import main
from lmstack.data.chat import add_chat_tokens, prompt_ids, render, turn_end_id
from lmstack.data.sft import Example, collate
from lmstack.errors import InputError
from lmstack.evaluation.scoring import loglikelihoods
from lmstack.generation import GenerationConfig
from lmstack.generation.engine import generate_tokens
from lmstack.models.checkpoint import load
from lmstack.training import checkpoint
from lmstack.training.finetune import AnswerLoss, FinetuneConfig, finetune, fit_vocab
from lmstack.training.metrics import read_metrics
from lmstack.training.pretrain import train

WORDS = "apple river stone cloud night bread horse tiger paper lemon grass storm candle mirror garden silver".split()


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """A one-layer character GPT pretrained for a few steps on Shakespeare."""
    out = tmp_path_factory.mktemp("base")
    train(tiny(out, block_size=64, max_steps=30, warmup_steps=3, model={"n_layer": 1, "n_head": 2, "n_embd": 48}))
    return checkpoint.latest(out)


@pytest.fixture(scope="module")
def tiny(small_text):  # module-scoped twin of conftest's `tiny`
    from lmstack.training.config import TrainConfig

    def make(out, **kw):
        base = dict(
            out_dir=str(out),
            data=[str(small_text)],
            block_size=32,
            batch_size=4,
            max_steps=6,
            warmup_steps=2,
            eval_interval=0,
            eval_batches=2,
            ckpt_interval=0,
        )
        return TrainConfig(**{**base, **kw})

    return make


def format_rows(n: int, seed: int) -> list[dict]:
    """Questions about a word; every answer has the format 'Answer: WORD.'"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"{rng.choice(['Shout', 'Say', 'Spell'])} {w}", "response": f"Answer: {w.upper()}."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_model(base):
    model, tok = load(base)
    add_chat_tokens(tok)
    model, _ = fit_vocab(model, tok)
    return model.eval(), tok


def test_sft_loss_is_minus_mean_log_p_of_the_answers_as_score_computes_it(base):
    model, tok = chat_model(base)
    rows = [
        render(tok, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        for r in format_rows(4, 0)
    ]
    examples = [Example(torch.tensor(ids).numpy(), torch.tensor(mask).numpy()) for ids, mask in rows]
    loss = AnswerLoss(model)(collate([[e] for e in examples], max(len(e.ids) for e in examples)))
    # the answer is the masked end of each row: score it given everything before it
    requests = [(ids[: mask.index(True)], ids[mask.index(True) :]) for ids, mask in rows]
    logp = sum(lp for lp, _ in loglikelihoods(model, requests))
    n = sum(len(c) for _, c in requests)
    assert float(loss.detach()) == pytest.approx(-logp / n, abs=1e-5)


def test_packed_rows_give_the_loss_of_unpacked_rows(base):
    model, tok = chat_model(base)
    examples = []
    for r in format_rows(6, 1):
        ids, mask = render(tok, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        examples.append(Example(torch.tensor(ids).numpy(), torch.tensor(mask).numpy()))
    objective = AnswerLoss(model)
    packed = collate([examples[:2], examples[2:4], examples[4:]], 64)
    unpacked = collate([[e] for e in examples], max(len(e.ids) for e in examples))
    assert int((packed["segments"] > 0).sum()) == sum(len(e.ids) for e in examples)
    with torch.no_grad():
        assert float(objective(packed)) == pytest.approx(float(objective(unpacked)), abs=1e-5)


def greedy_answers(ckpt, rows) -> list[str]:
    model, tok = load(ckpt)
    end = turn_end_id(tok)
    prompts = [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    outs = generate_tokens(model, prompts, GenerationConfig(max_new_tokens=20, temperature=0.0), tok)
    answers = []
    for out in outs:
        ids = list(out.tokens)
        answers.append(tok.decode(ids[: ids.index(end)] if end in ids else ids) + ("<end>" if end in ids else ""))
    return answers


def test_a_tiny_model_learns_a_held_out_answer_format(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(200, 2))
    cfg = FinetuneConfig(
        init_from=str(base),
        data=[str(data)],
        out_dir=str(tmp_path / "run"),
        max_length=64,
        batch_size=8,
        max_steps=80,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=0,
        val_fraction=0.1,
    )
    last = finetune(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "val_logp_answer" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 80
    # held-out log P(A|Q) per answer rises by more than 10 nats (from about -60)
    assert evals[-1]["val_logp_answer"] > evals[0]["val_logp_answer"] + 10
    answers = greedy_answers(last["checkpoint"], format_rows(20, 99))
    follows = [a.startswith("Answer: ") and a.endswith(".<end>") for a in answers]
    assert sum(follows) >= 16, answers
    # `lmstack generate --chat` frames the prompt the same way and ends the reply at its end of turn
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                last["checkpoint"],
                "--chat",
                "--prompt",
                "Say apple",
                "--temperature",
                "0",
                "--max-tokens",
                "30",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("Answer: ") and out["finish_reason"] == "stop" and "<|end|>" not in out["text"]


def test_lora_run_trains_adapters_only_and_resumes_exactly(base, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", format_rows(60, 3))
    common = dict(
        init_from=str(base),
        data=[str(data)],
        max_length=64,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=0,
        ckpt_interval=3,
        keep_last=5,
        lora={"r": 4, "alpha": 8},
    )
    whole = finetune(FinetuneConfig(out_dir=str(tmp_path / "a"), max_steps=6, **common))
    ckpt = checkpoint.latest(tmp_path / "a")
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    # the base's weights are untouched: the adapter directory loads on the base and differs from it
    adapted, tok = load(ckpt)
    plain, _ = load(base)
    assert adapted.config.vocab_size == tok.vocab_size > plain.config.vocab_size  # chat tokens grew it
    # resume from step 3 reproduces steps 4-6 exactly
    finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), max_steps=6, **common))
    import shutil

    shutil.rmtree(checkpoint.step_dir(tmp_path / "b", 6))
    resumed = finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), max_steps=6, **common), resume=True)
    assert resumed["loss"] == whole["loss"]


def test_bad_input_fails_before_the_run_directory_exists(base, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert main(["finetune", "--init-from", str(base), "--data", str(bad), "--out-dir", str(out)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", "--init-from", str(tmp_path / "nope"), "--data", str(bad), "--out-dir", str(out)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err and not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", format_rows(20, 4))
    args = ["finetune", "--init-from", str(base), "--data", str(good), "--out-dir", str(out)]
    assert main([*args, "--lora", "targets=nothing_like_this"]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.q" in err and not out.exists()  # the message lists the modules that exist
    assert main([*args, "--max-length", "100000"]) == 2
    assert "longer than the model's context" in capsys.readouterr().err and not out.exists()
    with pytest.raises(InputError, match=r"\[lora\].*unknown key"):
        FinetuneConfig(lora={"rank": 4})


@pytest.mark.parametrize("name", ["instruct", "chat-zh"])
def test_shipped_configs_run(base, tmp_path, name, capsys):
    out = tmp_path / name
    assert (
        main(
            [
                "finetune",
                "--config",
                name,
                "--init-from",
                str(base),
                "--out-dir",
                str(out),
                "--max-steps",
                "2",
                "--max-length",
                "64",
                "--batch-size",
                "2",
                "--eval-interval",
                "0",
            ]
        )
        == 0
    )
    assert "done: step 2" in capsys.readouterr().out
    assert (checkpoint.latest(out) / "model.safetensors").exists()


def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_its_gradients():
    from lmstack.training.finetune import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(600, 16, generator=g, requires_grad=True)  # more rows than one chunk
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (600,), generator=g)
    ours = LinearCrossEntropy.apply(hidden, weight, targets) * 3.0
    grads = torch.autograd.grad(ours, (hidden, weight))
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), targets) * 3.0
    want = torch.autograd.grad(plain, (hidden, weight))
    assert float(ours) == pytest.approx(float(plain), rel=1e-6)
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, atol=1e-6)

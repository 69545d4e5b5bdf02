"""DPO and its variants: the losses against their closed forms and against TRL on the same batch,
the reference computed once (ln 2 at the start, LoRA runs checkpoint adapters only), bad pairs
named by row, and end to end a tiny model that comes to prefer the chosen behaviour.

The helpers at the top (a tiny chat GPT, rule-based pairs, a pretrained + SFT model) are shared
with test_reward.py and test_ppo.py."""

import json
import math
import random

import pytest
import torch

from lmstack.data.chat import add_chat_tokens, prompt_ids, turn_end_id
from lmstack.data.pairs import PairBatches, collate_pairs, hh_messages, read_pairs
from lmstack.errors import InputError
from lmstack.evaluation.scoring import loglikelihoods
from lmstack.generation import GenerationConfig
from lmstack.generation.engine import generate_tokens
from lmstack.models.checkpoint import load
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers import EOT
from lmstack.tokenizers.char import CharTokenizer
from lmstack.training import checkpoint
from lmstack.training.dpo import DPOConfig, PreferenceLoss, dpo, preference_loss, reference_logprobs, response_logprobs
from lmstack.training.metrics import read_metrics

WORDS = "apple river stone cloud night bread horse tiger paper lemon grass storm candle mirror garden silver".split()
LN2 = math.log(2)


# --- shared helpers -------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rule_rows(n: int, seed: int, kind: str) -> list[dict]:
    """Requests to say a word. The preferred reply ends with an exclamation mark ("Answer: apple!"),
    the other with a full stop ("Answer: apple."). kind: "pairs" (chosen "!"), "sft" (either, half
    and half), "prompts" (the request only)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        prompt = f"{rng.choice(['Shout', 'Say', 'Spell'])} {w}"
        liked, other = f"Answer: {w}!", f"Answer: {w}."
        rows.append(
            {
                "pairs": {"prompt": prompt, "chosen": liked, "rejected": other},
                "sft": {"prompt": prompt, "response": liked if rng.random() < 0.5 else other},
                "prompts": {"prompt": prompt},
            }[kind]
        )
    return rows


def tiny_chat_gpt(path, block_size: int = 96, seed: int = 0):
    """An untrained one-layer character GPT with the chat tokens, saved at `path`."""
    tok = CharTokenizer.train([" ".join(WORDS) + "AnswerSyShoutSpell:.!"], special_tokens=(EOT,))
    add_chat_tokens(tok)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32))
    model.save(path, tok)
    return path


def sft_model(tmp_path_factory, small_text) -> str:
    """A one-layer character GPT pretrained on Shakespeare, then fine-tuned to answer the rule's
    requests in either form (half end with "!", half with ".")."""
    from lmstack.training.config import TrainConfig
    from lmstack.training.finetune import FinetuneConfig, finetune
    from lmstack.training.pretrain import train

    out = tmp_path_factory.mktemp("sft")
    train(
        TrainConfig(
            out_dir=str(out / "base"),
            data=[str(small_text)],
            block_size=64,
            batch_size=4,
            max_steps=30,
            warmup_steps=3,
            eval_interval=0,
            eval_batches=2,
            ckpt_interval=0,
            model={"n_layer": 1, "n_head": 2, "n_embd": 48},
        )
    )
    data = write_jsonl(out / "sft.jsonl", rule_rows(200, 2, "sft"))
    last = finetune(
        FinetuneConfig(
            init_from=str(checkpoint.latest(out / "base")),
            data=[str(data)],
            out_dir=str(out / "run"),
            max_length=64,
            batch_size=8,
            max_steps=80,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=5,
            eval_interval=0,
        )
    )
    return last["checkpoint"]


def greedy_replies(ckpt, rows) -> list[str]:
    model, tok = load(ckpt)
    end = turn_end_id(tok)
    prompts = [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    outs = generate_tokens(model.eval(), prompts, GenerationConfig(max_new_tokens=24, temperature=0.0), tok)
    return [tok.decode(o.tokens[: o.tokens.index(end)] if end in o.tokens else o.tokens) for o in outs]


def preferred_rate(ckpt, rows) -> float:
    """How often the greedy reply to a request has the preferred form, "Answer: ...!"."""
    replies = greedy_replies(ckpt, rows)
    return sum(r.startswith("Answer: ") and r.endswith("!") for r in replies) / len(rows)


# --- the losses -----------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    return tiny_chat_gpt(tmp_path / "tiny")


def test_loss_closed_forms_on_hand_built_tensors():
    c, r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.0, -4.0])
    nc, nr = torch.tensor([3, 4]), torch.tensor([2, 5])
    beta, gamma = 0.5, 0.3
    h = [(-3 + 4) - (-5 + 4), (-10 + 9) - (-2 + 4)]  # = [2, -3]
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = {
        "sigmoid": [-math.log(sig(beta * x)) for x in h],
        "hinge": [max(0.0, 1 - beta * x) for x in h],  # [0, 2.5]
        "ipo": [((-3 + 4) / 3 - (-5 + 4) / 2 - 1 / (2 * beta)) ** 2, ((-10 + 9) / 4 - (-2 + 4) / 5 - 1 / (2 * beta)) ** 2],
        "simpo": [-math.log(sig(beta * (-3 / 3 - -5 / 2) - gamma)), -math.log(sig(beta * (-10 / 4 - -2 / 5) - gamma))],
    }
    for kind, want in expected.items():
        got, margin = preference_loss(kind, beta, c, r, rc, rr, nc, nr, gamma)
        assert got.tolist() == pytest.approx(want, abs=1e-6), kind
    # policy == reference: every pair's DPO loss is ln 2 and the margin 0
    losses, margin = preference_loss("sigmoid", 0.1, c, r, c, r, nc, nr)
    assert losses.tolist() == pytest.approx([LN2, LN2], abs=1e-7) and margin.tolist() == [0.0, 0.0]


def test_response_logprobs_are_log_p_of_the_replies_as_scoring_computes_them(tiny, tmp_path):
    model, tok = load(tiny)
    pairs, _ = read_pairs(write_jsonl(tmp_path / "p.jsonl", rule_rows(5, 0, "pairs")), tok, 96)
    logp, count = response_logprobs(model.eval(), collate_pairs(pairs))
    requests = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    assert logp.tolist() == pytest.approx([lp for lp, _ in loglikelihoods(model, requests)], abs=1e-4)
    assert count.tolist() == [len(k) for _, k in requests]
    # the reply ends with its end-of-turn token, so the policy learns to stop
    assert all(p.chosen[-1] == turn_end_id(tok) for p in pairs)


def test_reference_computed_once_gives_ln2_before_the_first_step(tiny, tmp_path):
    model, tok = load(tiny)
    pairs, _ = read_pairs(write_jsonl(tmp_path / "p.jsonl", rule_rows(6, 1, "pairs")), tok, 96)
    batches = PairBatches(pairs, 3, 0, 3)
    batches.extras = {"reference": reference_logprobs(model, batches.in_order(), torch.device("cpu"))}
    objective = PreferenceLoss(model.eval(), DPOConfig(init_from="x", data=["x"]))
    with torch.no_grad():
        assert float(objective(batches.make(0, 0))) == pytest.approx(LN2, abs=1e-6)
    assert objective.take_stats(type("D", (), {"enabled": False})())["reward_margin"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow  # importing trl and datasets takes ~10 s
def test_dpo_loss_equals_trl_on_the_same_batch(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from lmstack.data.pairs import Pair
    from lmstack.models.hf import from_hf

    chars = "abcdefghijklmnopqrstuvwxyz .:"
    vocab = {ch: i for i, ch in enumerate(chars)} | {"<eos>": len(chars), "<pad>": len(chars) + 1, "<unk>": len(chars) + 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = from_hf(tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, len(chars), (n,), generator=g).tolist()
    pairs = [Pair(ids(5), ids(4), ids(7), "a"), Pair(ids(9), ids(6), ids(3), "b"), Pair(ids(3), ids(2), ids(2), "c")]
    ref = torch.tensor([[-20.0, -25.0], [-30.0, -18.0], [-9.0, -12.0]])
    batch = collate_pairs(pairs, {"reference": ref}, range(3))
    # TRL's layout of the same rows: right-padded, the completion marked
    real = batch["segments"] > 0
    completion = torch.zeros_like(real)
    for i, p in enumerate(pairs + pairs):
        n = len(p.chosen) if i < len(pairs) else len(p.rejected)
        completion[i, len(p.prompt) : len(p.prompt) + n] = True
    inputs = {
        "input_ids": batch["idx"].masked_fill(~real, vocab["<pad>"]),
        "attention_mask": real.long(),
        "completion_mask": completion.long(),
        "ref_chosen_logps": ref[:, 0],
        "ref_rejected_logps": ref[:, 1],
    }
    train = Dataset.from_list([{"prompt": "say a", "chosen": "a.", "rejected": "b."}] * 4)
    for kind in ("sigmoid", "ipo", "hinge"):
        args = TRLConfig(
            output_dir=str(tmp_path / "trl"),
            beta=0.1,
            loss_type=[kind],
            precompute_ref_log_probs=True,
            use_cpu=True,
            report_to=[],
            per_device_train_batch_size=2,
        )
        trainer = DPOTrainer(model=hf, args=args, train_dataset=train, processing_class=hf_tok)
        hf.eval()
        with torch.no_grad():
            theirs = float(trainer._compute_loss(hf, inputs, False))
            mine = float(PreferenceLoss(ours.eval(), DPOConfig(init_from="x", data=["x"], loss=kind, beta=0.1))(batch))
        assert mine == pytest.approx(theirs, abs=1e-5), kind


# --- the recipe -----------------------------------------------------------------------------


def test_lora_run_starts_at_ln2_and_checkpoints_only_the_adapter(tiny, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", rule_rows(40, 2, "pairs"))
    cfg = DPOConfig(
        init_from=str(tiny),
        data=[str(data)],
        out_dir=str(tmp_path / "run"),
        max_length=96,
        batch_size=4,
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        eval_interval=0,
        lora={"r": 4, "alpha": 8},
    )
    last = dpo(cfg)
    records = read_metrics(tmp_path / "run")
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(LN2, abs=1e-6)
    first = next(r for r in records if "loss" in r)
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["val_loss"] != pytest.approx(LN2, abs=1e-4)  # it moved
    ckpt = checkpoint.latest(tmp_path / "run")
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    assert not (ckpt / "objective.safetensors").exists()  # no reference model or log-probs in the checkpoint


def test_resumed_run_recomputes_the_same_reference_and_continues_exactly(tiny, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", rule_rows(12, 3, "pairs"))
    common = dict(
        init_from=str(tiny),
        data=[str(data)],
        max_length=96,
        batch_size=2,
        lr=1e-2,
        warmup_steps=1,
        eval_interval=0,
        ckpt_interval=2,
        keep_last=5,
        max_steps=4,
    )
    whole = dpo(DPOConfig(out_dir=str(tmp_path / "a"), **common))
    dpo(DPOConfig(out_dir=str(tmp_path / "b"), **{**common, "max_steps": 2}))
    resumed = dpo(DPOConfig(out_dir=str(tmp_path / "b"), **common), resume=True)
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)


# --- bad input ------------------------------------------------------------------------------


def test_bad_pairs_are_named_by_row_and_fail_before_the_run_directory_exists(tiny, tmp_path):
    rows = rule_rows(4, 4, "pairs")
    rows[2]["rejected"] = "  "
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = dict(init_from=str(tiny), data=[str(data)], out_dir=str(tmp_path / "run"), max_length=96, max_steps=1)
    with pytest.raises(InputError, match=r"p\.jsonl:3: \"rejected\" is empty.*--skip-bad-pairs"):
        dpo(DPOConfig(**cfg))
    assert not (tmp_path / "run").exists()
    model, tok = load(tiny)
    pairs, report = read_pairs(data, tok, 96, skip_bad=True)
    assert len(pairs) == 3 and report.skipped == 1 and "p.jsonl:3" in str(report)
    # a prompt that leaves no room for a reply: its row, and the two ways out
    long = write_jsonl(tmp_path / "long.jsonl", [rows[0], {**rows[1], "prompt": "Say " + "apple " * 30}])
    with pytest.raises(InputError, match=r"long\.jsonl:2: the prompt has \d+ tokens.*--max-prompt-length"):
        dpo(DPOConfig(**{**cfg, "data": [str(long)]}))
    pairs, report = read_pairs(long, tok, 96, max_prompt_length=40)
    assert len(pairs[1].prompt) == 40 and report.prompts_cut == 1
    assert pairs[1].prompt[-1] == prompt_ids(tok, [{"role": "user", "content": "x"}])[-1]  # still ends in the open turn
    for bad, message in [
        ('{"prompt": "a", "chosen": "b"}', "no 'rejected' field"),
        ("{oops", "not valid JSON"),
        ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "must be a string or a list"),
    ]:
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(InputError, match=rf"bad\.jsonl:1: .*{message}"):
            read_pairs(tmp_path / "bad.jsonl", tok, 96)
    with pytest.raises(InputError, match="loss must be one of"):
        DPOConfig(loss="kto")


def test_hh_rlhf_transcripts_become_chat_turns(shared):
    row = json.loads((shared / "data" / "hh_rlhf_helpful_base_test.jsonl").read_text().splitlines()[1])
    messages = hh_messages(row["prompt"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == "How can I find out what types of butterflies are in my area?"
    assert hh_messages("just a question") is None


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft(tmp_path_factory, small_text):
    return sft_model(tmp_path_factory, small_text)


@pytest.mark.slow
def test_dpo_raises_the_held_out_rate_of_the_preferred_behaviour(sft, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(200, 3, "pairs"))
    held_out = rule_rows(40, 99, "prompts")
    before = preferred_rate(sft, held_out)
    last = dpo(
        DPOConfig(
            init_from=sft,
            data=[str(data)],
            out_dir=str(tmp_path / "dpo"),
            max_length=64,
            batch_size=8,
            max_steps=30,
            lr=3e-4,
            min_lr=3e-5,
            warmup_steps=3,
            eval_interval=10,
        )
    )
    after = preferred_rate(last["checkpoint"], held_out)
    assert last["val_reward_accuracy"] == 1.0
    assert after >= before + 0.3 and after >= 0.8, (before, after)

"""PPO: GAE against its direct sum, the clipped losses on hand-built tensors, the reference with
LoRA adapters switched off, rewards from a reward model with another tokenizer (re-tokenised
text), bad prompts named by row, and end to end a policy whose reward rises with bounded KL."""

import math

import pytest
import torch
from test_dpo import rule_rows, sft_model, tiny_chat_gpt, write_jsonl

from lmstack.data.chat import turn_end_id
from lmstack.errors import InputError
from lmstack.models.checkpoint import load
from lmstack.tokenizers import EOT
from lmstack.tokenizers.char import CharTokenizer
from lmstack.training.metrics import read_metrics
from lmstack.training.ppo import PolicyWithValue, PPOConfig, Reference, encode_prompts, gae, ppo, read_prompts, rollout
from lmstack.training.reward import RewardConfig, load_reward_model, train_reward


def test_gae_equals_the_direct_sum_of_discounted_td_errors():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 3, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 7), (1, 4), (3, 4)]):  # replies of 5, 3 and 1 tokens, right-padded
        mask[b, s:e] = True
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        steps = mask[b].nonzero()[:, 0].tolist()
        v = lambda t: float(values[b, t]) if t in steps else 0.0  # no value after the reply ends
        delta = {t: float(rewards[b, t]) + gamma * v(t + 1) - v(t) for t in steps}
        for t in range(T):
            want = sum((gamma * lam) ** (k - t) * delta[k] for k in steps if k >= t) if t in steps else 0.0
            assert float(adv[b, t]) == pytest.approx(want, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(want + v(t) if t in steps else 0.0, abs=1e-5)


@pytest.fixture
def tiny(tmp_path):
    return tiny_chat_gpt(tmp_path / "tiny")


def test_clipped_policy_and_value_losses_on_hand_built_rollouts(tiny):
    model, tok = load(tiny)
    cfg = PPOConfig(init_from="x", reward_model="x", prompts=["x"], clip=0.2, value_clip=0.1, vf_coef=0.5)
    objective = PolicyWithValue(model.eval(), cfg)
    torch.nn.init.normal_(objective.value_head.weight, std=0.1)
    idx = torch.randint(0, 30, (2, 6))
    targets = torch.full((2, 6), -100)
    targets[:, 2:5] = idx[:, 3:6]
    batch = {"idx": idx, "targets": targets, "segments": torch.ones_like(idx)}
    with torch.no_grad():
        logp, values = objective.logprobs_values(batch)
    mask = targets != -100
    adv = torch.tensor([[0, 0, 1.0, -2.0, 0.5, 0], [0, 0, -1.0, 3.0, 2.0, 0]]) * mask
    ret = torch.tensor([[0, 0, 0.3, 0.1, -0.2, 0], [0, 0, 0.0, 1.0, 0.4, 0]])
    old_values = values + 0.5  # the new values moved by -0.5, beyond the value clip of 0.1
    for shift, ratio in [(0.0, 1.0), (0.5, math.exp(0.5))]:  # old log-probs below the new ones: ratio e^0.5 > 1.2
        full = {**batch, "old_logp": logp - shift, "advantages": adv, "old_values": old_values, "returns": ret}
        with torch.no_grad():
            loss = float(objective(full))
        a = adv[mask].tolist()
        pg = sum(max(-x * ratio, -x * min(max(ratio, 0.8), 1.2)) for x in a) / len(a)
        v, r, old = values[mask].tolist(), ret[mask].tolist(), old_values[mask].tolist()
        vf = 0.5 * sum(max((vi - ri) ** 2, (oi - 0.1 - ri) ** 2) for vi, ri, oi in zip(v, r, old)) / len(a)
        assert loss == pytest.approx(pg + 0.5 * vf, abs=1e-5)


def test_under_lora_the_reference_is_the_base_with_the_adapters_off(tiny):
    from lmstack.models.lora import LoraConfig, attach, lora_modules

    base, _ = load(tiny)
    model, _ = load(tiny)
    attach(model, LoraConfig(r=2, alpha=4))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B)  # a trained adapter: the policy differs from the base
    batch = {"idx": torch.randint(0, 30, (2, 8)), "segments": torch.ones(2, 8, dtype=torch.long)}
    batch["targets"] = torch.roll(batch["idx"], -1, 1)
    ref = Reference(model)
    assert ref.model is model  # no copy under LoRA
    with torch.no_grad():
        want = torch.log_softmax(base.eval()(batch["idx"]), -1).gather(-1, batch["targets"][..., None])[..., 0]
        policy = torch.log_softmax(model.eval()(batch["idx"]), -1).gather(-1, batch["targets"][..., None])[..., 0]
    assert torch.allclose(ref.logprobs(batch), want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)
    assert torch.allclose(
        torch.log_softmax(model(batch["idx"]), -1).gather(-1, batch["targets"][..., None])[..., 0], policy, atol=1e-6
    )  # the adapters are back on afterwards


def test_a_reward_model_with_another_tokenizer_scores_the_decoded_replies(tiny, tmp_path):
    # the reward model's own vocabulary: other characters, other ids
    from lmstack.data.chat import add_chat_tokens
    from lmstack.models.gpt import GPT, GPTConfig

    tok = CharTokenizer.train(["zyxwvutsrqponmlkjihgfedcba ZYXWVUTSRQPONMLKJIHGFEDCBA.:"], special_tokens=(EOT,))
    add_chat_tokens(tok)
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32)).save(tmp_path / "other", tok)
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(8, 1, "pairs"))
    rm = train_reward(
        RewardConfig(
            init_from=str(tmp_path / "other"),
            data=[str(data)],
            out_dir=str(tmp_path / "rm"),
            max_length=96,
            batch_size=2,
            max_steps=2,
            warmup_steps=0,
            lr=1e-2,
            eval_interval=0,
        )
    )
    scorer = load_reward_model(rm["checkpoint"])
    policy, ptok = load(tiny)
    assert ptok.encode("Say apple") != scorer.tokenizer.encode("Say apple")
    cfg = PPOConfig(init_from="x", reward_model="x", prompts=["x"], max_new_tokens=8, whiten_rewards=False, kl_coef=0.0)
    items = [([{"role": "user", "content": r["prompt"]}], str(i)) for i, r in enumerate(rule_rows(4, 2, "prompts"))]
    prompts = encode_prompts(ptok, items, 96, 8)
    conversations = [m for m, _ in items]
    objective = PolicyWithValue(policy, cfg)
    end = turn_end_id(ptok)
    got = rollout(objective, Reference(policy), scorer, ptok, conversations, prompts, cfg, 5, end, torch.device("cpu"))
    mask = got.batch["targets"] != -100
    texts = [ptok.decode([t for t in row[m].tolist() if t != end]).strip() for row, m in zip(got.batch["targets"], mask)]
    spoken = [i for i, t in enumerate(texts) if t]
    assert spoken
    want = torch.full((len(texts),), float("nan"))
    want[spoken] = scorer.score([conversations[i] for i in spoken], [texts[i] for i in spoken])
    want = torch.nan_to_num(want, nan=float(want[spoken].min()))  # an empty reply gets the rollout's lowest score
    assert got.stats["reward"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert got.stats["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference at the start


def test_bad_prompts_are_named_by_row(tiny, tmp_path):
    _, tok = load(tiny)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say apple"}\n{"prompt": "' + "Say apple " * 10 + '"}\n')
    with pytest.raises(InputError, match=r"prompts\.jsonl:2: the prompt has \d+ tokens; with --max-new-tokens 32"):
        encode_prompts(tok, read_prompts(path), 96, 32)
    path.write_text('{"text": "Say apple"}\n')
    with pytest.raises(InputError, match=r"prompts\.jsonl:1: no \"prompt\" field"):
        read_prompts(path)
    with pytest.raises(InputError, match="no reward model"):
        ppo(PPOConfig(init_from=str(tiny), prompts=[str(path)], out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sft(tmp_path_factory, small_text):
    return sft_model(tmp_path_factory, small_text)


@pytest.mark.slow
def test_ppo_raises_the_reward_models_mean_score_on_held_out_prompts_with_bounded_kl(sft, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(200, 3, "pairs"))
    rm = train_reward(
        RewardConfig(
            init_from=sft,
            data=[str(pairs)],
            out_dir=str(tmp_path / "rm"),
            max_length=64,
            batch_size=8,
            max_steps=30,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=3,
            eval_interval=0,
        )
    )
    assert rm["val_accuracy"] == 1.0
    # Rollouts of 32 replies (not 8) for 80 steps, a KL penalty of 0.07, and 40 held-out prompts (of 200) rather than 20:
    # with 8-reply rollouts and 30 steps the update was noisy enough that the outcome hung on the order of float sums
    # (torch threads: +0.62 on two; on one, +0.16 by step 10, then back to -0.06). Here, over 9 seeds of the pairs, the
    # prompts and PPO, on 1 and 2 threads each, the held-out reward rose by 0.83 to 1.44 and the KL stayed under 15 nats.
    # (This reward model scores "Answer: w!" about 1.9 above "Answer: w.", so +0.5 is a quarter of the replies turned.)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rule_rows(200, 4, "prompts"))
    ppo(
        PPOConfig(
            init_from=sft,
            reward_model=rm["checkpoint"],
            prompts=[str(prompts)],
            out_dir=str(tmp_path / "ppo"),
            max_new_tokens=16,
            batch_size=32,
            max_steps=80,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=2,
            kl_coef=0.07,
            eval_interval=20,
            val_fraction=0.2,
        )
    )
    evals = [r for r in read_metrics(tmp_path / "ppo") if "val_reward" in r]
    assert [e["step"] for e in evals] == [0, 20, 40, 60, 80]
    assert evals[-1]["val_reward"] > evals[0]["val_reward"] + 0.5
    assert evals[-1]["val_kl"] < 20  # nats per reply: the policy stays near its start
    steps = [r for r in read_metrics(tmp_path / "ppo") if "kl" in r]
    assert max(s["kl"] for s in steps) < 20

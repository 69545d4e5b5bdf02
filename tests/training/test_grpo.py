"""GRPO: advantages against their closed forms, the clipped loss and k3 on hand-built tensors,
forked group sampling equal to independent generation, and a short run that logs what it should
and rejects bad input before the run directory exists."""

import json

import pytest
import torch

from lmstack.data import arithmetic
from lmstack.errors import LmstackError
from lmstack.evaluation.cot import Item
from lmstack.generation import GenerationConfig, generate_groups, generate_tokens
from lmstack.generation.engine import Generation
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.training import checkpoint
from lmstack.training.config import TrainConfig
from lmstack.training.finetune import load_base
from lmstack.training.grpo import GRPOConfig, advantages, grpo, grpo_loss, k3, rollout, score_groups
from lmstack.training.metrics import read_metrics
from lmstack.training.pretrain import train

# --- advantages ---------------------------------------------------------------------------------


def test_equal_rewards_give_zero_advantage_and_zero_loss():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    logp = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5, dtype=torch.bool)
    for kind in ("grpo", "dr_grpo", "rloo"):
        adv = advantages(rewards, kind)
        assert torch.equal(adv, torch.zeros_like(adv)), kind
        for agg in ("sequence", "token", "constant"):
            loss, _ = grpo_loss(logp, logp.detach(), adv.flatten(), mask, agg=agg)
            loss.backward()
            assert loss.item() == 0 and torch.count_nonzero(logp.grad) == 0, (kind, agg)
            logp.grad = None


def test_advantages_match_closed_forms():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 2.0, 1.0, 0.0]])
    G = r.shape[1]
    for p in range(2):
        xs = r[p].tolist()
        mean = sum(xs) / G
        std = (sum((x - mean) ** 2 for x in xs) / (G - 1)) ** 0.5  # unbiased, as TRL
        for i, x in enumerate(xs):
            others = (sum(xs) - x) / (G - 1)
            assert advantages(r, "grpo")[p, i].item() == pytest.approx((x - mean) / (std + 1e-4), abs=1e-6)
            assert advantages(r, "dr_grpo")[p, i].item() == pytest.approx(x - mean, abs=1e-6)
            assert advantages(r, "rloo")[p, i].item() == pytest.approx(x - others, abs=1e-6)
    assert torch.allclose(advantages(r, "rloo"), G / (G - 1) * advantages(r, "dr_grpo"))


# --- the loss -------------------------------------------------------------------------------------


def test_loss_at_ratio_one_is_minus_advantage_weighted_mean():
    """At the rollout policy (ratio 1) the surrogate is -A per token; each aggregation averages it
    its own way, and the gradient of log p is -A/len (sequence), -A/total (token), -A/(B*T) (constant)."""
    logp = torch.log(torch.rand(3, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 0.5])
    lengths = mask.sum(-1).float()
    expected = {
        "sequence": (-adv).mean(),
        "token": (-adv * lengths).sum() / lengths.sum(),
        "constant": (-adv * lengths).sum() / (3 * 4),
    }
    grads = {
        "sequence": -adv[:, None] / lengths[:, None] / 3,
        "token": -adv[:, None] / lengths.sum(),
        "constant": -adv[:, None] / 12,
    }
    for agg, value in expected.items():
        loss, stats = grpo_loss(logp, logp.detach(), adv, mask, agg=agg)
        (g,) = torch.autograd.grad(loss, logp)
        assert loss.item() == pytest.approx(value.item(), abs=1e-6), agg
        assert torch.allclose(g, grads[agg].expand(3, 4) * mask, atol=1e-6), agg
        assert stats["clipped"] == 0


def test_clipping_stops_the_gradient_past_the_trust_region():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_()  # ratios 1.5 and 0.5, eps 0.2
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, clip=0.2, agg="token")
    (g,) = torch.autograd.grad(loss, logp)
    # A > 0 and ratio above 1+eps, A < 0 and ratio below 1-eps: both clipped, no gradient, loss at the clip
    assert torch.equal(g, torch.zeros_like(g))
    assert loss.item() == pytest.approx((-1.2 * 1 + 0.8 * 1) / 2)
    assert stats["clipped"] == 1.0
    # the other side is not clipped: A > 0 with ratio 0.5 still pushes up
    loss, _ = grpo_loss(logp, old, torch.tensor([-1.0, 1.0]), mask, clip=0.2, agg="token")
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0].item() == pytest.approx(1.5 / 2) and g[1].item() == pytest.approx(-0.5 / 2)


def test_k3_is_the_closed_form_and_an_unbiased_kl():
    p, q = torch.tensor([-0.1, -2.0]), torch.tensor([-0.5, -1.0])
    assert torch.allclose(k3(p, q), torch.exp(q - p) - (q - p) - 1)
    assert torch.equal(k3(p, p), torch.zeros(2))
    # E_{x~pi}[k3] = KL(pi || ref) over a small categorical
    pi, ref = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    expected = (pi * (pi / ref).log()).sum()
    assert (pi * k3(pi.log(), ref.log())).sum().item() == pytest.approx(expected.item(), abs=1e-6)
    # the KL term adds kl * mean k3 to the loss when advantages are zero
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo_loss(p[None], p[None], torch.zeros(1), mask, agg="token", ref_logp=q[None], kl=0.5)
    assert loss.item() == pytest.approx(0.5 * k3(p, q).mean().item()) and stats["kl"] == pytest.approx(k3(p, q).mean().item())


# --- rewards and the rollout batch -------------------------------------------------------------------


def test_a_reply_cut_at_the_length_limit_scores_zero_even_when_right():
    items = [Item("q", 12.0)]
    groups = [
        [
            Generation([1], "3 * 4 = 12\nAnswer: 12", "stop", 0.0),
            Generation([1], "3 * 4 = 12\nAnswer: 12", "length", 0.0),
            Generation([1], "3 * 4 = 13\nAnswer: 13", "stop", 0.0),
        ]
    ]
    rewards, right, ended = score_groups(groups, items, format_reward=0.5)
    assert rewards.tolist() == [[1.5, 0.0, 0.5]]  # right + well formed, cut, well formed but wrong
    assert right.tolist() == [[1.0, 1.0, 0.0]] and ended.tolist() == [[True, False, True]]


def test_groups_with_equal_rewards_are_left_out_of_the_batch(base, monkeypatch):
    """A group whose replies all score alike has zero advantages: it is not laid out for the update,
    and the other groups' rows keep their own advantages."""
    model, tok = load_base(str(base))
    items = [Item("a", 1.0), Item("b", 2.0), Item("c", 3.0)]
    texts = {"a": ["Answer: 1", "Answer: 5"], "b": ["Answer: 7", "Answer: 8"], "c": ["Answer: 3", "Answer: 3"]}

    def fake_groups(model, prompts, n, configs, tokenizer):
        return [[Generation(tok.encode(t), t, "stop", 0.0) for t in texts[it.question]] for it in items]

    monkeypatch.setattr("lmstack.training.grpo.generate_groups", fake_groups)
    cfg = GRPOConfig(group=2, batch_size=3, max_new_tokens=8)
    batch, metrics = rollout(model, tok, items, cfg, 0, torch.device("cpu"))
    assert metrics["zero_variance_groups"] == pytest.approx(2 / 3, abs=1e-6) and metrics["reward_mean"] == 0.5
    assert batch["adv"].tolist() == pytest.approx(advantages(torch.tensor([[1.0, 0.0]])).flatten().tolist())
    assert batch["idx"].shape[0] == 2 and batch["mask"].sum(-1).tolist() == [len(tok.encode(t)) + 1 for t in texts["a"]]
    texts["b"] = texts["a"] = ["Answer: 0", "Answer: 0"]  # nothing to learn anywhere: the batch stays whole
    batch, metrics = rollout(model, tok, items, cfg, 0, torch.device("cpu"))
    assert batch["idx"].shape[0] == 6 and torch.count_nonzero(batch["adv"]) == 0


# --- forked sampling ------------------------------------------------------------------------------


def test_forked_groups_sample_what_independent_generation_samples():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]  # different lengths: left padding, then forked
    G = 4
    configs = [GenerationConfig(max_new_tokens=12, temperature=1.0, seed=100 + k) for k in range(len(prompts) * G)]
    groups = generate_groups(model, prompts, G, configs)
    alone = generate_tokens(model, [p for p in prompts for _ in range(G)], configs)
    flat = [g for grp in groups for g in grp]
    assert [g.tokens for g in flat] == [a.tokens for a in alone]
    assert [g.logprob for g in flat] == pytest.approx([a.logprob for a in alone], abs=1e-4)
    assert len({tuple(g.tokens) for g in groups[0]}) > 1  # the seeds make the samples differ
    for grp, p in zip(groups, prompts):  # and each one's log-prob is the model's own
        for g in grp:
            ids = torch.tensor([p + g.tokens])
            lp = model.token_logprobs(ids)[0, len(p) - 1 :].sum().item()
            assert g.logprob == pytest.approx(lp, abs=1e-4)


# --- a run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A one-layer character GPT pretrained for a few steps on arithmetic problems."""
    out = tmp_path_factory.mktemp("grpo_base")
    text = out / "arith.txt"
    arithmetic.write(text, arithmetic.generate(200, seed=1, levels=(1,)), "text")
    train(
        TrainConfig(
            out_dir=str(out / "run"),
            data=[str(text)],
            tokenizer="char",
            block_size=224,
            batch_size=4,
            max_steps=4,
            warmup_steps=1,
            eval_interval=0,
            eval_batches=1,
            ckpt_interval=0,
            device="cpu",
            model={"n_layer": 1, "n_head": 2, "n_embd": 32},
        )
    )
    return checkpoint.latest(out / "run")


def test_a_short_run_logs_rewards_and_checkpoints(base, tmp_path):
    cfg = GRPOConfig(
        out_dir=str(tmp_path / "g"),
        init_from=str(base),
        group=4,
        batch_size=2,
        max_steps=2,
        lr=1e-3,
        max_new_tokens=12,
        n_train=10,
        n_eval=4,
        eval_interval=0,
        kl=0.1,
        updates=2,
        device="cpu",
        temperature=1.5,
    )
    last = grpo(cfg)
    rows = read_metrics(tmp_path / "g")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and "val_accuracy" in rows[0] and "val_accuracy" in rows[-1]
    for key in ("reward_mean", "reward_std", "zero_variance_groups", "accuracy", "reply_length", "kl", "clipped"):
        assert all(key in r for r in steps), key
    assert 0 < steps[0]["reply_length"] <= 12
    assert (tmp_path / "g" / "checkpoints").is_dir() and last["checkpoint"]
    saved = json.loads((tmp_path / "g" / "train_config.json").read_text())
    assert saved["group"] == 4 and saved["loss_agg"] == "sequence"


def test_a_task_file_without_answers_names_the_row(base, tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"question": "1+1?", "answer": 2}\n{"question": "2+2?"}\n')
    with pytest.raises(LmstackError, match=r"tasks.jsonl:2: missing field\(s\) \['answer'\]"):
        grpo(GRPOConfig(out_dir=str(tmp_path / "g"), init_from=str(base), task=str(bad), device="cpu"))
    assert not (tmp_path / "g").exists()


def test_bad_settings_fail_with_the_rule():
    with pytest.raises(LmstackError, match="group must be >= 2"):
        GRPOConfig(group=1)
    with pytest.raises(LmstackError, match="advantage must be one of"):
        GRPOConfig(advantage="ppo")
    assert GRPOConfig(advantage="dr_grpo").loss_agg == "constant"

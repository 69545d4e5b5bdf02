"""Alignment end to end on a CPU: a character GPT that lmstack pretrains and fine-tunes, then DPO on
generated preference pairs, a reward model on the same rule and on hh-rlhf, and PPO against the
rule's reward model. Prints the numbers of docs/alignment.md and draws its curves.

    python -P benchmarks/alignment.py --out runs/alignment          # ~15 minutes on 2 busy cores
    python -P benchmarks/alignment.py --out runs/alignment --plots docs/img

The rule: requests "Say WORD" (also "Shout", "Spell"); the preferred reply ends with an
exclamation mark ("Answer: apple!"), the other with a full stop ("Answer: apple."). The SFT data
has both forms half and half, so the fine-tuned model answers in the format with either ending;
the behaviour measured is the share of greedy replies to 60 held-out requests of the form
"Answer: ...!". hh-rlhf: `shared/data/hh_rlhf_helpful_base_test.jsonl` (2,354 rows, 4 with an
empty side skipped), transcripts split into chat turns, prompts cut to their last 192 characters,
rows to 256, on a base of its own (the same shape, 150 steps at a 256-character context, no SFT);
10% held out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
WORDS = "apple river stone cloud night bread horse tiger paper lemon grass storm candle mirror garden silver".split()


def rule_rows(n: int, seed: int, kind: str) -> list[dict]:
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


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def preferred_rate(ckpt: str, rows: list[dict]) -> tuple[float, list[str]]:
    """Share of greedy replies of the form "Answer: ...!", and the first few replies."""
    from lmstack.data.chat import prompt_ids, turn_end_id
    from lmstack.generation import GenerationConfig
    from lmstack.generation.engine import generate_tokens
    from lmstack.models.checkpoint import load

    model, tok = load(ckpt)
    end = turn_end_id(tok)
    prompts = [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    outs = generate_tokens(model.eval(), prompts, GenerationConfig(max_new_tokens=24, temperature=0.0), tok)
    replies = [tok.decode(o.tokens[: o.tokens.index(end)] if end in o.tokens else o.tokens) for o in outs]
    return sum(r.startswith("Answer: ") and r.endswith("!") for r in replies) / len(rows), replies[:4]


def plot(run: Path, keys: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.training.metrics import read_metrics

    records = read_metrics(run)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/alignment")
    ap.add_argument("--plots", default="", help="write the PNG curves here")
    args = ap.parse_args()
    from lmstack.training import checkpoint
    from lmstack.training.config import TrainConfig
    from lmstack.training.dpo import DPOConfig, dpo
    from lmstack.training.finetune import FinetuneConfig, finetune
    from lmstack.training.ppo import PPOConfig, ppo
    from lmstack.training.pretrain import train
    from lmstack.training.reward import RewardConfig, train_reward

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = ROOT.parent / "shared" / "data"
    times, numbers = {}, {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    text = out / "shakespeare.txt"
    text.write_text((shared / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    train(
        TrainConfig(
            out_dir=str(out / "base"),
            data=[str(text)],
            block_size=128,
            batch_size=16,
            max_steps=300,
            warmup_steps=20,
            lr=3e-3,
            eval_interval=100,
            ckpt_interval=0,
            model={"n_layer": 2, "n_head": 4, "n_embd": 64},
        )
    )
    lap("pretrain")
    sft = finetune(
        FinetuneConfig(
            init_from=str(checkpoint.latest(out / "base")),
            out_dir=str(out / "sft"),
            max_length=64,
            data=[write_jsonl(out / "sft.jsonl", rule_rows(400, 2, "sft"))],
            batch_size=16,
            max_steps=150,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=10,
            eval_interval=50,
        )
    )["checkpoint"]
    lap("sft")
    held = rule_rows(60, 99, "prompts")
    numbers["sft_preferred_rate"], numbers["sft_replies"] = preferred_rate(sft, held)
    pairs = write_jsonl(out / "pairs.jsonl", rule_rows(300, 3, "pairs"))
    common = dict(max_length=64, batch_size=8, warmup_steps=3, eval_interval=5)
    last = dpo(DPOConfig(init_from=sft, data=[pairs], out_dir=str(out / "dpo"), max_steps=40, lr=3e-5, min_lr=3e-6, **common))
    lap("dpo")
    numbers["dpo_preferred_rate"], numbers["dpo_replies"] = preferred_rate(last["checkpoint"], held)
    numbers["dpo_val_reward_accuracy"] = last["val_reward_accuracy"]
    rm = train_reward(
        RewardConfig(init_from=sft, data=[pairs], out_dir=str(out / "rm"), max_steps=40, lr=1e-3, min_lr=1e-4, **common)
    )
    lap("reward_rule")
    numbers["rule_rm_val_accuracy"] = rm["val_accuracy"]
    prompts = write_jsonl(out / "prompts.jsonl", rule_rows(300, 4, "prompts"))
    ppo(
        PPOConfig(
            init_from=sft,
            reward_model=rm["checkpoint"],
            prompts=[prompts],
            out_dir=str(out / "ppo"),
            max_new_tokens=16,
            batch_size=16,
            max_steps=40,
            lr=5e-4,
            min_lr=5e-5,
            warmup_steps=3,
            eval_interval=10,
            val_fraction=0.2,
        )
    )
    lap("ppo")
    from lmstack.training.metrics import read_metrics

    evals = [r for r in read_metrics(out / "ppo") if "val_reward" in r]
    numbers["ppo_val_reward"] = [(e["step"], round(e["val_reward"], 3), round(e["val_kl"], 2)) for e in evals]
    numbers["ppo_max_rollout_kl"] = max(r["kl"] for r in read_metrics(out / "ppo") if "kl" in r)
    # hh-rlhf needs a longer context than the rule's model has: a base of its own, 256 characters
    train(
        TrainConfig(
            out_dir=str(out / "hh_base"),
            data=[str(text)],
            block_size=256,
            batch_size=8,
            max_steps=150,
            warmup_steps=10,
            lr=3e-3,
            eval_interval=50,
            ckpt_interval=0,
            model={"n_layer": 2, "n_head": 4, "n_embd": 64},
        )
    )
    hh = train_reward(
        RewardConfig(
            init_from=str(checkpoint.latest(out / "hh_base")),
            skip_bad_pairs=True,
            data=[str(shared / "hh_rlhf_helpful_base_test.jsonl")],
            out_dir=str(out / "rm_hh"),
            max_length=256,
            max_prompt_length=192,
            batch_size=8,
            max_steps=150,
            lr=3e-4,
            min_lr=3e-5,
            warmup_steps=10,
            eval_interval=50,
        )
    )
    lap("reward_hh")
    numbers["hh_rm_val_accuracy"] = [
        (r["step"], round(r["val_accuracy"], 3)) for r in read_metrics(out / "rm_hh") if "val_accuracy" in r
    ]
    numbers["hh_final"] = hh["val_accuracy"]
    print(json.dumps({"seconds": times, **numbers}, indent=1))
    if args.plots:
        plots = Path(args.plots)
        plots.mkdir(parents=True, exist_ok=True)
        plot(
            out / "dpo",
            ["loss", "val_reward_accuracy", "val_logp_chosen", "val_logp_rejected"],
            "DPO on the rule's pairs",
            plots / "alignment_dpo.png",
        )
        plot(
            out / "ppo",
            ["reward", "kl", "val_reward", "val_kl"],
            "PPO against the rule's reward model",
            plots / "alignment_ppo.png",
        )
        plot(
            out / "rm_hh",
            ["loss", "val_loss", "val_accuracy"],
            "Reward model on hh-rlhf (helpful-base test split)",
            plots / "alignment_rm_hh.png",
        )


if __name__ == "__main__":
    main()

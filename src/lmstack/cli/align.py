"""`lmstack align`: steer a model towards preferred outputs — reward models, DPO and its variants, PPO.

    lmstack align reward --init-from runs/sft/checkpoints/step_0000300 --data pairs.jsonl --out-dir runs/rm
    lmstack align score-reward --reward-model runs/rm/checkpoints/step_0000200 --prompt "Hi" --continuation "Hello!"
    lmstack align dpo --init-from SFT --data pairs.jsonl --loss ipo --beta 0.1 --lora r=16
    lmstack align ppo --init-from SFT --reward-model RM --prompts prompts.jsonl
    lmstack align tasks --out arith.jsonl --n 2000 --lang mix --format sft
    lmstack align grpo --init-from SFT --task arithmetic --group 8 --advantage grpo --kl 0.0

Each recipe is one block: `add_recipe(sub, name, module, config class, recipe function, help,
description)` gives it every field of its config as a flag, `--config FILE.toml` and `--resume RUN_DIR`.
"""

from __future__ import annotations

import importlib
import json

from lmstack.cli import add_group
from lmstack.cli.train import finish, resolve_config


def add_recipe(sub, name: str, module: str, config: str, recipe: str, help: str, description: str) -> None:
    """`lmstack align NAME`: the recipe `module.recipe(cfg, resume)` with `module.config`'s fields as flags."""
    from lmstack.training.config import add_arguments

    mod = importlib.import_module(module)
    cls = getattr(mod, config)
    p = sub.add_parser(
        name,
        help=help,
        description=description + " Settings come from the defaults, then --config, "
        "then flags; the run directory (--out-dir) gets the resolved config, metrics.jsonl and checkpoints.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of settings")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its saved config, with any flags given here on top)",
    )
    add_arguments(p.add_argument_group(f"{name} config (each overrides the --config file)"), cls)
    p.set_defaults(func=lambda args: _run(args, cls, getattr(mod, recipe), name))


def _run(args, cls, recipe, name: str) -> int:
    cfg = resolve_config(args, cls)
    last = recipe(cfg, resume=bool(args.resume))
    return finish(last, f"checkpoint {last.get('checkpoint')}", name)


HELP = "align a model with preferences: reward models, DPO (IPO, SimPO, hinge), PPO, and RL on verifiable answers (GRPO)"


def register(sub) -> None:
    group = add_group(sub, "align", help=HELP)
    add_recipe(
        group,
        "reward",
        "lmstack.training.reward",
        "RewardConfig",
        "train_reward",
        help="train a reward model on preference pairs (Bradley-Terry)",
        description="Train a scalar reward head on the model given by --init-from (a GPT: its state at the last token; "
        "a BERT: its pooled [CLS]) on JSONL {prompt, chosen, rejected} rows with the loss -log sigmoid(r_chosen - "
        "r_rejected); reports the held-out pairwise accuracy. Score text with `lmstack align score-reward`.",
    )
    add_recipe(
        group,
        "dpo",
        "lmstack.training.dpo",
        "DPOConfig",
        "dpo",
        help="direct preference optimisation of a policy on preference pairs (sigmoid, ipo, simpo, hinge)",
        description="Optimise the model given by --init-from on JSONL {prompt, chosen, rejected} rows with the DPO loss "
        "(--loss sigmoid) or a variant (ipo, simpo, hinge); the reference log-probs are computed once, before the first "
        "step, by the starting model. Logs chosen/rejected log-probs, reward margins and reward accuracy.",
    )
    add_recipe(
        group,
        "ppo",
        "lmstack.training.ppo",
        "PPOConfig",
        "ppo",
        help="RLHF with PPO: sample replies, score them with a reward model, improve the policy",
        description="Classic RLHF on the model given by --init-from: replies to --prompts sampled through lmstack's "
        "decoding engine, scored by --reward-model (a checkpoint of `lmstack align reward`) minus a KL penalty to the "
        "starting model, advantages by GAE from a value head, clipped policy and value losses.",
    )
    add_recipe(
        group,
        "grpo",
        "lmstack.training.grpo",
        "GRPOConfig",
        "grpo",
        help="RL on verifiable answers with GRPO (groups of sampled replies, exact-answer rewards)",
        description="Group Relative Policy Optimization on the model given by --init-from: --group replies sampled to each "
        "problem of --task (arithmetic, gsm8k, svamp or a JSONL file of {question, answer} rows), the prompt read once and "
        "its decoding state forked; reward 1 for the right number (+ --format-reward for reasoning before the answer line); "
        "advantages within each group (--advantage grpo | dr_grpo | rloo); PPO's clipped ratio loss, aggregated per reply, "
        "per token or by a constant (--loss-agg); optional k3 KL to the starting model (--kl). Logs reward mean/std, the "
        "fraction of groups with zero reward variance, accuracy and reply length; held-out exact match every "
        "--eval-interval steps.",
    )
    t = group.add_parser(
        "tasks",
        help="write arithmetic word problems: task rows, SFT rows or pretraining text",
        description="Multi-step arithmetic word problems (levels = steps, 1-4) with worked solutions, in "
        "English or Chinese, deterministic by --seed; the held-out split is fixed by a hash of each "
        "problem's arithmetic. --format task: {question, solution, answer, lang, level, paraphrases}; "
        "sft: {prompt, response} with the steps then 'Answer: N' (for `lmstack finetune`); text: question "
        "and response as plain text (for `lmstack train`).",
    )
    t.add_argument("--out", required=True, metavar="FILE", help="the file to write (replaced atomically)")
    t.add_argument("--n", type=int, default=1000, metavar="N", help="problems to write (default: 1000)")
    t.add_argument("--lang", choices=("en", "zh", "mix"), default="en", help="language (default: en)")
    t.add_argument(
        "--level",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        metavar="K",
        help="steps per problem, one or more of 1 2 3 4 (default: all)",
    )
    t.add_argument("--split", choices=("train", "test", "all"), default="train", help="split (default: train)")
    t.add_argument("--format", choices=("task", "sft", "text"), default="task", help="row format (default: task)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument(
        "--direct-share",
        type=float,
        default=0.0,
        metavar="S",
        help="sft/text rows: this share answers at once ('Answer: N', no steps), as data from mixed sources (default: 0)",
    )
    t.set_defaults(func=cmd_tasks)
    p = group.add_parser(
        "score-reward",
        help="print a reward model's score of a reply to a prompt",
        description="The reward a checkpoint of `lmstack align reward` gives CONTINUATION as the reply to "
        "PROMPT (a user message, or an hh-rlhf transcript '\\n\\nHuman: ...\\n\\nAssistant:').",
    )
    p.add_argument("--reward-model", required=True, metavar="DIR", help="a reward model checkpoint directory")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user's message (or an hh-rlhf transcript)")
    p.add_argument(
        "--continuation",
        required=True,
        action="append",
        metavar="TEXT",
        help="the reply to score (repeatable: one score per reply)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object per reply")
    p.set_defaults(func=cmd_score_reward)


def cmd_score_reward(args) -> int:
    from lmstack.training.reward import load_reward_model

    scorer = load_reward_model(args.reward_model, args.device)
    scores = scorer.score([args.prompt] * len(args.continuation), args.continuation).tolist()
    for reply, score in zip(args.continuation, scores):
        print(
            json.dumps({"prompt": args.prompt, "continuation": reply, "reward": score}, ensure_ascii=False)
            if args.json
            else f"{score:.4f}\t{reply}"
        )
    return 0


def cmd_tasks(args) -> int:
    from lmstack.data.arithmetic import generate, write

    problems = generate(args.n, seed=args.seed, lang=args.lang, levels=args.level, split=args.split)
    write(args.out, problems, args.format, args.direct_share, args.seed)
    what = f"{len(problems)} {args.split} problems ({args.lang}, levels {args.level})"
    direct = f", {args.direct_share:g} answered at once," if args.direct_share else ""
    print(f"wrote {what} as {args.format}{direct} to {args.out}")
    return 0

"""End to end on a CPU: pretrain a small GPT on arithmetic word problems, SFT it on answers from
mixed sources (worked steps or the bare answer), then GRPO on exact-answer rewards; held-out exact
match before and after, pass@8 of the SFT model, wall and CPU time of each stage, and a plot.

    python -P benchmarks/grpo_arithmetic.py --out runs/grpo-e2e --plots docs/img

Stages (each an `lmstack` command, printed before it runs; a stage whose output exists is skipped):
1. data: `lmstack align tasks` writes 20,000 training problems with worked solutions as text
   (pretraining) and 4,000 as {prompt, response} rows (SFT) of which --direct-share answer at once
   ("Answer: 19", no steps), English, levels 1-2 (one or two steps);
2. tokenizer: `lmstack tokenizer train --kind bpe` on the pretraining text (plus --tokenizer-extra
   files, e.g. English text and dialogues as in `quickstart --assistant`), or `--tokenizer word`;
3. pretrain: a 2-layer, 128-wide GPT, --pretrain-steps steps;
4. SFT: `lmstack finetune` on the mixed rows, in the built-in chat format: the model answers at
   once on some problems (mostly wrong beyond one step) and shows the steps on the others;
5. GRPO: `lmstack align grpo` on freshly drawn training-split problems, 32 problems x 8 replies
   per step, held-out greedy exact match on 200 test-split problems every 10 steps (step 0 = SFT);
6. on the SFT and GRPO models: greedy accuracy, the share of greedy replies without steps, sampled
   accuracy and pass@8 (temperature 1), and `lmstack eval cot` (accuracy with and without the
   reasoning); a PNG of reward and held-out accuracy by step.
Every stage is counted in steps and seeded (no wall-clock budget), so the numbers repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

LEVELS = (1, 2)
REPLY_TOKENS = 32  # the longest worked solution of levels 1-2 is ~25 BPE tokens with its end of turn
HELD_OUT = 200
GRPO_SEED = 3  # GRPO draws its training problems with this seed (pretraining used 1, SFT 2), held-out ones with 4


def sh(*args, capture: bool = False) -> str:
    cmd = ["lmstack", *map(str, args)]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run([sys.executable, "-m", "lmstack.cli", *map(str, args)], check=True, capture_output=capture, text=True)
    return proc.stdout if capture else ""


def timed(times: dict, stage: str, *args, capture: bool = False) -> str:
    """Run one command and add its wall and CPU seconds (user + system of the child) to `times`."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = sh(*args, capture=capture)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, used = times.setdefault(stage, [0.0, 0.0])
    times[stage] = [wall + time.perf_counter() - t0, used + after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime]
    return out


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def sampled(ckpt: Path, group: int = 8) -> dict:
    """Greedy accuracy, the share of greedy replies that answer at once (no steps), and over
    `group` samples per problem at temperature 1: accuracy and pass@group, on the held-out problems
    GRPO evaluates on. Pass@G well above greedy accuracy is what RL can select."""
    import torch

    from lmstack.evaluation.cot import ANSWER, correct, question_ids, reply_config
    from lmstack.generation import generate_groups, generate_tokens
    from lmstack.training.finetune import load_base
    from lmstack.training.grpo import GRPOConfig, _tasks

    model, tok = load_base(str(ckpt))
    model.eval()
    _, held = _tasks(GRPOConfig(levels=",".join(map(str, LEVELS)), lang="en", n_eval=HELD_OUT, n_train=1, seed=GRPO_SEED))
    prompts = [question_ids(tok, it.question) for it in held]
    with torch.no_grad():
        greedy = generate_tokens(model, prompts, reply_config(tok, REPLY_TOKENS), tok)
        configs = [reply_config(tok, REPLY_TOKENS, 1.0, seed=k) for k in range(len(held) * group)]
        groups = generate_groups(model, prompts, group, configs, tok)
    right = [[correct(g.text, it.answer) for g in grp] for grp, it in zip(groups, held)]
    n = len(held)
    return {
        "greedy_accuracy": sum(correct(g.text, it.answer) for g, it in zip(greedy, held)) / n,
        "greedy_direct_share": sum(g.text.strip().startswith(ANSWER) for g in greedy) / n,
        "sampled_accuracy": sum(map(sum, right)) / (n * group),
        "sampled_direct_share": sum(g.text.strip().startswith(ANSWER) for grp in groups for g in grp) / (n * group),
        f"pass@{group}": sum(map(any, right)) / n,
    }


def plot(rows: list[dict], path: Path, samples: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label=f"train reward (mean of {samples} samples)")
    ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label="held-out exact match (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grpo-e2e"))
    ap.add_argument("--plots", type=Path, default=Path("docs/img"))
    ap.add_argument("--plot-name", default="grpo_reward.png")
    ap.add_argument("--tokenizer", choices=("bpe", "word"), default="bpe")
    ap.add_argument("--vocab-size", type=int, default=1024, help="bpe: target vocabulary (arithmetic alone stops at ~440)")
    ap.add_argument("--tokenizer-extra", type=Path, nargs="*", default=[], help="bpe: more text files to train the tokenizer on")
    ap.add_argument(
        "--tokenizer-problems", type=int, default=0, help="bpe: train the tokenizer on the first N pretraining problems (0 = all)"
    )
    ap.add_argument("--direct-share", type=float, default=0.5, help="share of SFT rows that answer at once")
    ap.add_argument("--pretrain-steps", type=int, default=1200)
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--grpo-lr", type=float, default=3e-5)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pre, sft, rl = out / "pretrain", out / "sft", out / "grpo"
    levels = [str(k) for k in LEVELS]
    times: dict = {}
    load = [os.getloadavg()[0]]
    task = ("align", "tasks", "--lang", "en", "--level", *levels)
    if not (out / "sft.jsonl").exists():
        timed(times, "data", *task, "--out", out / "pretrain.txt", "--n", 20000, "--format", "text", "--seed", 1)
        timed(
            times, "data", *task, "--out", out / "sft.jsonl", "--n", 4000, "--format", "sft", "--seed", 2,
            "--direct-share", args.direct_share,
        )  # fmt: skip
    tokenizer = args.tokenizer
    if args.tokenizer == "bpe":
        tokenizer = out / "tokenizer"
        if not tokenizer.exists():
            text = out / "pretrain.txt"
            if args.tokenizer_problems:  # the same problems as the start of pretrain.txt (same seed), fewer of them
                text = out / "tokenizer_problems.txt"
                timed(times, "tokenizer", *task, "--out", text, "--n", args.tokenizer_problems, "--format", "text", "--seed", 1)
            timed(
                times, "tokenizer", "tokenizer", "train", "--kind", "bpe", "--vocab-size", args.vocab_size, "--out", tokenizer,
                text, *args.tokenizer_extra,
            )  # fmt: skip
    if not (pre / "checkpoints").exists():
        timed(
            times, "pretrain", "train", "--data", out / "pretrain.txt", "--tokenizer", tokenizer, "--block-size", 128,
            "--model", "n_layer=2", "--model", "n_head=4", "--model", "n_embd=128", "--batch-size", 32,
            "--max-steps", args.pretrain_steps, "--lr", 3e-3, "--min-lr", 3e-4, "--warmup-steps", 20,
            "--eval-interval", 200, "--ckpt-interval", 0, "--out-dir", pre, "--device", "cpu",
        )  # fmt: skip
    if not (sft / "checkpoints").exists():
        timed(
            times, "sft", "finetune", "--init-from", last_checkpoint(pre), "--data", out / "sft.jsonl", "--out-dir", sft,
            "--max-steps", 60, "--lr", 1e-3, "--min-lr", 1e-4, "--warmup-steps", 5, "--batch-size", 16,
            "--max-length", 128, "--eval-interval", 0, "--device", "cpu",
        )  # fmt: skip
    group, batch = 8, 32
    if not (rl / "checkpoints").exists():
        timed(
            times, "grpo", "align", "grpo", "--init-from", last_checkpoint(sft), "--task", "arithmetic", "--lang", "en",
            "--levels", ",".join(levels), "--seed", GRPO_SEED, "--group", group, "--batch-size", batch, "--advantage", "grpo",
            "--kl", 0.0, "--lr", args.grpo_lr, "--min-lr", args.grpo_lr, "--max-new-tokens", REPLY_TOKENS,
            "--n-train", 4000, "--n-eval", HELD_OUT, "--eval-interval", 10, "--max-steps", args.grpo_steps,
            "--out-dir", rl, "--device", "cpu",
        )  # fmt: skip
    models = {"sft": last_checkpoint(sft), "grpo": last_checkpoint(rl)}
    report, cot = {}, {}
    for name, ckpt in models.items():
        t0, c0 = time.perf_counter(), time.process_time()
        report[name] = sampled(ckpt)
        wall, used = times.setdefault("pass@8", [0.0, 0.0])
        times["pass@8"] = [wall + time.perf_counter() - t0, used + time.process_time() - c0]
        print(f"{name}: {json.dumps(report[name])}", flush=True)
        got = timed(
            times, "eval cot", "eval", "cot", "--model", ckpt, "--task", "arithmetic", "--lang", "en", "--level", *levels,
            "--limit", HELD_OUT, "--seed", GRPO_SEED + 1, "--max-tokens", REPLY_TOKENS, "--json", capture=True,
        )  # fmt: skip
        cot[name] = {k: v for k, v in json.loads(got).items() if k != "items"}
        print(f"eval cot {name}: {json.dumps(cot[name])}", flush=True)
    load.append(os.getloadavg()[0])
    rows = metrics(rl)
    evals = [r for r in rows if "val_accuracy" in r]
    summary = {
        "tokenizer": str(tokenizer),
        "direct_share": args.direct_share,
        "sft_accuracy": evals[0]["val_accuracy"],
        "grpo_accuracy": evals[-1]["val_accuracy"],
        "grpo_steps": evals[-1]["step"],
        "val_accuracy_by_step": {r["step"]: r["val_accuracy"] for r in evals},
        "sampled": report,
        "eval_cot": cot,
        "seconds_wall_cpu": times,
        "load_start_end": load,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"held-out exact match: SFT {summary['sft_accuracy']:.3f} -> GRPO {summary['grpo_accuracy']:.3f} "
        f"(step {summary['grpo_steps']}); load average {load[0]:.1f} -> {load[1]:.1f}"
    )
    for stage, (wall, cpu) in times.items():
        print(f"{stage}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    kind = "word-level" if args.tokenizer == "word" else "BPE"
    plot(rows, args.plots / args.plot_name, group * batch, f"GRPO on arithmetic word problems ({kind} GPT, CPU)")


if __name__ == "__main__":
    main()

"""End to end on a CPU: pretrain a character GPT on arithmetic word problems, SFT it on worked
solutions, then GRPO on exact-answer rewards; held-out exact match before and after, and a plot.

    python -P benchmarks/grpo_arithmetic.py --out runs/grpo-e2e --plots docs/img [--minutes 8 5 13]

Stages (each an `lmstack` command, printed before it runs; a stage whose output exists is skipped):
1. data: `lmstack align tasks` writes 20,000 training problems as text (pretraining) and 3,000 as
   {prompt, response} rows (SFT), English and Chinese, levels 1-3;
2. pretrain: a 2-layer, 96-wide character GPT (`lmstack train`);
3. SFT: `lmstack finetune` on the worked solutions, in the built-in chat format;
4. GRPO: `lmstack align grpo --task arithmetic --levels 1,2,3`, 8 problems x 8 replies per step,
   held-out greedy exact match on 100 test-split problems every 20 steps (step 0 = the SFT model);
5. `lmstack eval cot` on the SFT and GRPO models; a PNG of reward and held-out accuracy by step.
--minutes gives each training stage's time budget (the runs lower their step counts to fit).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path


def sh(*args) -> None:
    cmd = ["lmstack", *map(str, args)]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "lmstack.cli", *map(str, args)], check=True)


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label="train reward (mean of 64 samples)",
            alpha=0.6)
    ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label="held-out exact match (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("GRPO on arithmetic word problems (character GPT, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grpo-e2e"))
    ap.add_argument("--plots", type=Path, default=Path("docs/img"))
    ap.add_argument("--minutes", type=float, nargs=3, default=[8, 5, 13], metavar=("PRETRAIN", "SFT", "GRPO"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pre, sft, rl = out / "pretrain", out / "sft", out / "grpo"
    if not (out / "pretrain.txt").exists():
        sh("align", "tasks", "--out", out / "pretrain.txt", "--n", 20000, "--lang", "mix", "--level", 1, 2, 3,
           "--format", "text", "--seed", 1)
        sh("align", "tasks", "--out", out / "sft.jsonl", "--n", 3000, "--lang", "mix", "--level", 1, 2, 3,
           "--format", "sft", "--seed", 2)
    if not (pre / "checkpoints").exists():
        sh("train", "--data", out / "pretrain.txt", "--tokenizer", "char", "--block-size", 192, "--model", "n_layer=2",
           "--model", "n_head=4", "--model", "n_embd=96", "--batch-size", 16, "--max-steps", 1000, "--max-minutes",
           args.minutes[0], "--lr", 3e-3, "--min-lr", 3e-4, "--warmup-steps", 30, "--eval-interval", 100,
           "--ckpt-interval", 0, "--out-dir", pre, "--device", "cpu")
    if not (sft / "checkpoints").exists():
        sh("finetune", "--init-from", last_checkpoint(pre), "--data", out / "sft.jsonl", "--out-dir", sft,
           "--max-steps", 200, "--max-minutes", args.minutes[1], "--lr", 1e-3, "--min-lr", 1e-4, "--warmup-steps", 10,
           "--batch-size", 8, "--max-length", 192, "--eval-interval", 100, "--device", "cpu")
    if not (rl / "checkpoints").exists():
        sh("align", "grpo", "--init-from", last_checkpoint(sft), "--task", "arithmetic", "--levels", "1,2,3",
           "--group", 8, "--batch-size", 8, "--advantage", "grpo", "--kl", 0.0, "--lr", 2e-4, "--min-lr", 2e-4,
           "--max-new-tokens", 72, "--n-train", 2000, "--n-eval", 100, "--eval-interval", 20, "--max-steps", 100,
           "--max-minutes", args.minutes[2], "--out-dir", rl, "--device", "cpu")
    for run in (sft, rl):
        sh("eval", "cot", "--model", last_checkpoint(run), "--task", "arithmetic", "--level", 1, 2, 3, "--limit", 100,
           "--max-tokens", 72)
    rows = metrics(rl)
    evals = [r for r in rows if "val_accuracy" in r]
    print(f"held-out exact match: SFT {evals[0]['val_accuracy']:.3f} -> GRPO {evals[-1]['val_accuracy']:.3f} "
          f"(step {evals[-1]['step']})")
    plot(rows, args.plots / "grpo_reward.png")


if __name__ == "__main__":
    main()

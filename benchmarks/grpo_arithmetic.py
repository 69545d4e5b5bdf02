"""End to end on a CPU: pretrain a small GPT on arithmetic word problems, SFT it on worked
solutions, then GRPO on exact-answer rewards; held-out exact match before and after, wall and CPU
time of each stage, and a plot.

    python -P benchmarks/grpo_arithmetic.py --out runs/grpo-e2e --plots docs/img

Stages (each an `lmstack` command, printed before it runs; a stage whose output exists is skipped):
1. data: `lmstack align tasks` writes 20,000 training problems as text (pretraining) and 4,000 as
   {prompt, response} rows (SFT), English, levels 1-2 (one or two steps);
2. pretrain: a 2-layer, 128-wide GPT over a word vocabulary (`--tokenizer word`: every number
   below 100 is one token, so a step "16 + 9 = 25" is five tokens and a whole problem about 35);
3. SFT: `lmstack finetune` on the worked solutions, in the built-in chat format;
4. GRPO: `lmstack align grpo`, 64 problems x 8 replies per step, held-out greedy exact match on
   200 test-split problems every 25 steps (step 0 = the SFT model);
5. `lmstack eval cot` on the SFT and GRPO models; a PNG of reward and held-out accuracy by step.
--minutes gives each training stage's time budget (a run lowers its step count to fit).
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
REPLY_TOKENS = 24  # the longest worked solution of levels 1-2 is 17 tokens with its end of turn


def sh(*args) -> None:
    cmd = ["lmstack", *map(str, args)]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "lmstack.cli", *map(str, args)], check=True)


def timed(times: dict, stage: str, *args) -> None:
    """Run one command and add its wall and CPU seconds (user + system of the child) to `times`."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    sh(*args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, used = times.setdefault(stage, [0.0, 0.0])
    times[stage] = [wall + time.perf_counter() - t0, used + after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime]


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(rows: list[dict], path: Path, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [r["step"] for r in steps],
        [r["reward_mean"] for r in steps],
        label=f"train reward (mean of {samples} samples)",
        alpha=0.6,
    )
    ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label="held-out exact match (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("GRPO on arithmetic word problems (word-level GPT, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grpo-e2e"))
    ap.add_argument("--plots", type=Path, default=Path("docs/img"))
    ap.add_argument("--minutes", type=float, nargs=3, default=[4, 2, 6], metavar=("PRETRAIN", "SFT", "GRPO"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pre, sft, rl = out / "pretrain", out / "sft", out / "grpo"
    levels = [str(k) for k in LEVELS]
    times: dict = {}
    load = [os.getloadavg()[0]]
    if not (out / "pretrain.txt").exists():
        timed(
            times,
            "data",
            "align",
            "tasks",
            "--out",
            out / "pretrain.txt",
            "--n",
            20000,
            "--lang",
            "en",
            "--level",
            *levels,
            "--format",
            "text",
            "--seed",
            1,
        )
        timed(
            times,
            "data",
            "align",
            "tasks",
            "--out",
            out / "sft.jsonl",
            "--n",
            4000,
            "--lang",
            "en",
            "--level",
            *levels,
            "--format",
            "sft",
            "--seed",
            2,
        )
    if not (pre / "checkpoints").exists():
        timed(
            times,
            "pretrain",
            "train",
            "--data",
            out / "pretrain.txt",
            "--tokenizer",
            "word",
            "--block-size",
            128,
            "--model",
            "n_layer=2",
            "--model",
            "n_head=4",
            "--model",
            "n_embd=128",
            "--batch-size",
            32,
            "--max-steps",
            600,
            "--max-minutes",
            args.minutes[0],
            "--lr",
            3e-3,
            "--min-lr",
            3e-4,
            "--warmup-steps",
            20,
            "--eval-interval",
            100,
            "--ckpt-interval",
            0,
            "--out-dir",
            pre,
            "--device",
            "cpu",
        )
    if not (sft / "checkpoints").exists():
        timed(
            times,
            "sft",
            "finetune",
            "--init-from",
            last_checkpoint(pre),
            "--data",
            out / "sft.jsonl",
            "--out-dir",
            sft,
            "--max-steps",
            60,
            "--max-minutes",
            args.minutes[1],
            "--lr",
            1e-3,
            "--min-lr",
            1e-4,
            "--warmup-steps",
            5,
            "--batch-size",
            16,
            "--max-length",
            128,
            "--eval-interval",
            0,
            "--device",
            "cpu",
        )
    group, batch = 8, 64
    if not (rl / "checkpoints").exists():
        timed(
            times,
            "grpo",
            "align",
            "grpo",
            "--init-from",
            last_checkpoint(sft),
            "--task",
            "arithmetic",
            "--lang",
            "en",
            "--levels",
            ",".join(levels),
            "--group",
            group,
            "--batch-size",
            batch,
            "--advantage",
            "grpo",
            "--kl",
            0.0,
            "--lr",
            3e-5,
            "--min-lr",
            3e-5,
            "--max-new-tokens",
            REPLY_TOKENS,
            "--n-train",
            4000,
            "--n-eval",
            200,
            "--eval-interval",
            25,
            "--max-steps",
            150,
            "--max-minutes",
            args.minutes[2],
            "--out-dir",
            rl,
            "--device",
            "cpu",
        )
    cot = {}
    for name, run in (("sft", sft), ("grpo", rl)):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmstack.cli",
                "eval",
                "cot",
                "--model",
                last_checkpoint(run),
                "--task",
                "arithmetic",
                "--lang",
                "en",
                "--level",
                *levels,
                "--limit",
                200,
                "--max-tokens",
                REPLY_TOKENS,
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        times.setdefault("eval cot", [0.0, 0.0])[0] += time.perf_counter() - t0
        cot[name] = {k: v for k, v in json.loads(proc.stdout).items() if k != "items"}
        print(f"eval cot {name}: {json.dumps(cot[name])}")
    load.append(os.getloadavg()[0])
    rows = metrics(rl)
    evals = [r for r in rows if "val_accuracy" in r]
    summary = {
        "sft_accuracy": evals[0]["val_accuracy"],
        "grpo_accuracy": evals[-1]["val_accuracy"],
        "grpo_steps": evals[-1]["step"],
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
    plot(rows, args.plots / "grpo_reward.png", group * batch)


if __name__ == "__main__":
    main()

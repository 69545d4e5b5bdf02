"""G samples of one prompt, read once and forked, against G independent generations.

    python benchmarks/grpo_fork.py [--group 8] [--prompt-tokens 256] [--new-tokens 32] [--depth 4] [--repeats 3]

GRPO samples a group of G replies to each problem. `generate_groups` reads the prompt once and
copies its decoding state G ways through the contract's `reorder`; the alternatives read the
prompt G times: G separate `generate_tokens` calls (independent generations), or one batch of G
copies of the prompt. All three sample the same tokens with the same seeds (checked here). Prints
the median wall time of --repeats runs and the ratios (> 1: forking is faster), with the load
average, since timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lmstack.generation import GenerationConfig, generate_groups, generate_tokens
from lmstack.models.gpt import GPT, GPTConfig


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds and last output of each function, run in turn `repeats` times, so a change
    in the machine's load hits them all alike."""
    times: dict = {name: [] for name in fns}
    outs: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=4096, block_size=args.prompt_tokens + args.new_tokens, n_layer=args.depth, n_head=4, n_embd=args.width
        )
    ).eval()
    prompt = torch.randint(0, 4096, (args.prompt_tokens,)).tolist()
    G = args.group
    configs = [GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, seed=k) for k in range(G)]
    secs, outs = timed(
        {
            "forked": lambda: generate_groups(model, [prompt], G, configs)[0],
            "alone": lambda: [generate_tokens(model, [prompt], c)[0] for c in configs],
            "batch": lambda: generate_tokens(model, [prompt] * G, configs),
        },
        args.repeats,
    )
    forked_s, alone_s, batch_s = secs["forked"], secs["alone"], secs["batch"]
    same = [g.tokens for g in outs["forked"]] == [a.tokens for a in outs["alone"]] == [b.tokens for b in outs["batch"]]
    print(
        f"GPT {args.depth}x{args.width} ({model.num_params():,} parameters), G={G}, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; same samples: {same}"
    )
    print(f"forked (prompt read once)        {forked_s * 1000:8.1f} ms")
    print(f"G independent generations        {alone_s * 1000:8.1f} ms   ratio {alone_s / forked_s:.2f}x")
    print(f"one batch of G prompt copies     {batch_s * 1000:8.1f} ms   ratio {batch_s / forked_s:.2f}x")


if __name__ == "__main__":
    main()

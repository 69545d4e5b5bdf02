"""Decode speed of lmstack's generation engine beside `transformers` `generate`, same weights, same process.

    python benchmarks/generation.py [--depth 2 4] [--vocab 8192] [--batch 1 8] [--new-tokens 64] [--threads 1] [--compile]

A random GPT-2-architecture `transformers` model is saved and imported into lmstack (`from_hf`), so
both compute the same function. For each batch size, prompts of 16 tokens are decoded greedily for
--new-tokens tokens (no end-of-text, so every row runs to the end): lmstack's
`generate_tokens(temperature=0)` against `GPT2LMHeadModel.generate(do_sample=False)`, and the same
pair for top-k/top-p sampling. A last row decodes a ragged batch, 8 prompts of 1x to 8x
--prompt-tokens, greedily: both left-pad it (transformers with an attention mask). Prints
decode tokens/s (new tokens of the whole batch, prompt included in the time) as the median of
--repeats runs, and the ratio lmstack / transformers (> 1: lmstack faster); it also checks that
both greedy outputs agree. --compile adds a column for
lmstack's compiled decoding (`GPT.compile_decoding`: static KV cache, torch.compile'd step; CUDA
graphs on a GPU), timed after its compile. Timings on a shared CPU are noisy: the load average is
printed with them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--depth", type=int, nargs="+", default=[2, 4], help="model sizes: layers, width 64·depth, heads of 64 (default: 2 4)"
    )
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time lmstack's compiled decoding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, device "
        f"{args.device}, load {os.getloadavg()[0]:.1f}; GPT-2 arch, vocab {args.vocab}; prompt {args.prompt_tokens} "
        f"+ {args.new_tokens} new tokens; ratio = lmstack / transformers"
    )
    print(
        f"{'params':>7} {'mode':>6} {'batch':>5} {'prompts':>7} {'lmstack tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}"
        + (f" {'compiled tok/s':>15} {'ratio':>6}" if args.compile else "")
    )
    for depth in args.depth:
        run_size(args, depth)


def run_size(args, d: int) -> None:
    import transformers

    from lmstack.generation import GenerationConfig, generate_tokens
    from lmstack.models.hf import from_hf

    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=512, n_embd=64 * d, n_layer=d, n_head=d)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval().to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = from_hf(tmp)
    model.to(args.device)
    longest = 8 * args.prompt_tokens  # the ragged batch's longest prompt
    compiled = None
    if args.compile:  # a second copy, so the eager model keeps its growing cache
        compiled = copy.deepcopy(model).compile_decoding(capacity=longest + args.new_tokens)
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
    n = args.new_tokens
    modes = {
        "greedy": (GenerationConfig(max_new_tokens=n, temperature=0), dict(do_sample=False)),
        "top-p": (GenerationConfig(max_new_tokens=n, top_k=50, top_p=0.9, seed=0), dict(do_sample=True, top_k=50, top_p=0.9)),
    }
    g = torch.Generator().manual_seed(0)

    def draw(lengths):
        return [torch.randint(0, args.vocab, (k,), generator=g).tolist() for k in lengths]

    cases = [(mode, draw([args.prompt_tokens] * batch)) for batch in args.batch for mode in modes]
    # prompts of 1x..8x --prompt-tokens in one batch: left-padded on both sides
    cases.append(("greedy", draw([args.prompt_tokens * (1 + i % 8) for i in range(8)])))
    for mode, prompts in cases:
        ours_cfg, hf_kw = modes[mode]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)

        def ours(m=model):
            return generate_tokens(m, prompts, ours_cfg)

        def theirs():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **hf_kw)

        if mode == "greedy" and [o.tokens for o in ours()] != theirs()[:, width:].tolist():
            print("  warning: greedy outputs differ (near-tie logits?)")
        t_ours, t_theirs = timed(ours, args.repeats), timed(theirs, args.repeats)
        tokens = len(prompts) * n
        lengths = sorted({len(p) for p in prompts})
        plen = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        line = (
            f"{size:>7} {mode:>6} {len(prompts):>5} {plen:>7} {tokens / t_ours:>14.0f} {tokens / t_theirs:>19.0f} "
            f"{t_theirs / t_ours:>6.2f}"
        )
        if compiled is not None:
            t_comp = timed(lambda: ours(compiled), args.repeats)
            line += f" {tokens / t_comp:>15.0f} {t_theirs / t_comp:>6.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

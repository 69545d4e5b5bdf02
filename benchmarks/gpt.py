"""lmstack's GPT beside Hugging Face transformers on identical weights, in the same process.

    python benchmarks/gpt.py [--arch gpt2 llama] [--depth 6] [--threads 1] [--device cpu]

For each architecture a random lmstack GPT (`GPTConfig.sized(depth)`, GPT-2 or Llama style) is
exported with `to_hf` and loaded by `transformers`, so both compute the same function. Timed:

- forward: a [4, 256] batch, no grad (tokens/s);
- train step: forward + backward on the same batch (tokens/s);
- decode: greedy, 1 prompt of 16 tokens + 128 new ones, lmstack's KV cache (start/step) vs
  `generate(do_sample=False)` with HF's cache, and lmstack recomputing the whole prefix per token
  (what the KV cache saves).

Prints the median of --repeats runs and the ratio lmstack / transformers (> 1: lmstack faster).
Timings on a shared CPU are noisy: note `uptime` beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


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
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.models.hf import to_hf

    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
        f"device {args.device}, load {os.getloadavg()[0]:.1f}"
    )
    style = {"gpt2": {}, "llama": GPTConfig.PRESETS["tiny-llama"] | {"n_kv_head": args.depth // 2}}
    for arch in args.arch:
        extra = {k: v for k, v in style[arch].items() if k not in ("block_size", "n_layer", "n_head", "n_embd")}
        cfg = GPTConfig.sized(args.depth, vocab_size=args.vocab, block_size=512, **extra)
        torch.manual_seed(0)
        ours = GPT(cfg).eval().to(args.device)
        with tempfile.TemporaryDirectory() as d:
            to_hf(ours.cpu(), d)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval().to(args.device)
        ours.to(args.device)
        print(
            f"\n{arch}: {ours.num_params() / 1e6:.1f} M params ({cfg.n_layer} layers, width {cfg.n_embd}, "
            f"{cfg.n_head} heads / {cfg.n_kv_head} kv)"
        )
        x = torch.randint(0, args.vocab, (4, 256), device=args.device)

        def fwd(m, logits):
            with torch.no_grad():
                logits(m(x))

        def train(m, logits):
            logits(m(x)).float().square().mean().backward()

        rows = []
        for name, step in (("forward", fwd), ("train step", train)):
            a = timed(lambda: step(ours, lambda out: out), args.repeats)
            b = timed(lambda: step(ref, lambda out: out.logits), args.repeats)
            rows.append((name, x.numel() / a, x.numel() / b))

        prompt, new = x[:1, :16], 128

        def decode_cached():
            with torch.no_grad():
                state, lp = ours.start(prompt)
                for _ in range(new - 1):
                    state, lp = ours.step(state, lp.argmax(-1))

        def decode_recompute():
            with torch.no_grad():
                seq = prompt
                for _ in range(new):
                    seq = torch.cat([seq, ours.next_token_logprobs(seq)[:, -1].argmax(-1, keepdim=True)], 1)

        def decode_hf():
            with torch.no_grad():
                ref.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        a, b = timed(decode_cached, args.repeats), timed(decode_hf, args.repeats)
        c = timed(decode_recompute, max(1, args.repeats // 2))
        rows.append(("decode (KV cache)", new / a, new / b))
        rows.append(("decode, no cache", new / c, new / b))
        print(f"  {'':<20}{'lmstack tok/s':>15}{'transformers tok/s':>20}{'ratio':>8}")
        for name, ours_tps, ref_tps in rows:
            print(f"  {name:<20}{ours_tps:>15,.0f}{ref_tps:>20,.0f}{ours_tps / ref_tps:>8.2f}")


if __name__ == "__main__":
    main()

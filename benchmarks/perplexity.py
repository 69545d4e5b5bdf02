"""Sliding-window perplexity: lmstack's `stream_perplexity` beside Hugging Face's recipe, in one process.

    python benchmarks/perplexity.py [--chars 20000] [--context 256] [--strides 256 128]

A random GPT-2 (4 layers, 256 wide, context 256) is built with `transformers`, imported into
lmstack, and both score the same Tiny Shakespeare text with the same windows: lmstack through
`stream_perplexity` (batched windows), the peer through the loop of Hugging Face's "Perplexity of
fixed-length models" guide (one window per forward pass, log-probabilities of the window's new tokens). Prints
both perplexities (they must agree: the peer loop scores lmstack's windows, since the guide's
own code never scores the first token of a window when stride = context) and tokens/s, with
lmstack batching windows (its default) and with one window per call (as the peer).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMSTACK_SHARED", REPO.parent / "shared"))


def hf_windows(hf, ids: torch.Tensor, context: int, stride: int) -> float:
    """Total nats of ids[1:], each token once, the window ids[s:s+C] predicting ids[s+1:s+C+1]."""
    total, done, s, n = 0.0, 0, 0, len(ids) - 1
    with torch.no_grad():
        while done < n:
            end = min(s + context, n)
            lp = hf(ids[None, s:end]).logits[0].float().log_softmax(-1)
            keep = end - done
            total -= float(lp[-keep:].gather(-1, ids[end - keep + 1 : end + 1, None]).sum())
            done, s = end, s + stride
    return total


def main() -> None:
    import transformers

    from lmstack.evaluation.perplexity import stream_perplexity
    from lmstack.models.hf import from_hf
    from lmstack.tokenizers.char import CharTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=20000)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--strides", type=int, nargs="+", default=[256, 128])
    args = ap.parse_args()

    text = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[: args.chars]
    tok = CharTokenizer.train([text], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=args.context,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = from_hf(d)
    ids = torch.tensor([tok.eot_id, *tok.encode(text), tok.eot_id])
    print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, {len(ids) - 1} tokens")
    n = len(ids) - 1
    hf_windows(hf, ids[: args.context + 1], args.context, args.context)  # warm-up, both sides
    stream_perplexity(model, [text[: args.context]], tok.encode, tok.eot_id, context=args.context)
    for stride in args.strides:
        t = time.perf_counter()
        theirs = hf_windows(hf, ids, args.context, stride)
        t_hf = time.perf_counter() - t
        print(
            f"context {args.context} stride {stride}: HF guide loop, perplexity {math.exp(theirs / n):.6f}, "
            f"{n / t_hf:,.0f} tokens/s"
        )
        # batched windows (the default), then one window per model call as the HF loop does
        for label, batch_tokens in (("batched", 1 << 16), ("one window per call", args.context + 1)):
            t = time.perf_counter()
            ours = stream_perplexity(
                model, [text], tok.encode, tok.eot_id, context=args.context, stride=stride, max_batch_tokens=batch_tokens
            )
            t_ours = time.perf_counter() - t
            print(
                f"  lmstack {label}: perplexity {ours.perplexity:.6f}, {n / t_ours:,.0f} tokens/s, "
                f"{t_hf / t_ours:.2f}x HF's speed"
            )


if __name__ == "__main__":
    main()

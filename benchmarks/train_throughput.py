"""Training throughput of `lmstack train` beside a bare Hugging Face GPT-2 loop, in one process.

    python benchmarks/train_throughput.py                       # GPT-2 124M, 16 x 1024, bf16 (a GPU)
    python benchmarks/train_throughput.py --preset tiny --batch-size 4 --block-size 64 --dtype float32 --steps 10

lmstack: the real loop (`lmstack.training.pretrain.train`) on Tiny Shakespeare tokenized with GPT-2's
tokenizer, reading tokens/s and MFU from its metrics.jsonl (median over the steps after the first
three, which include compilation and warm-up). MFU needs the device's peak FLOP/s: known GPUs are
looked up, else pass --peak-flops.

Peer: `transformers.GPT2LMHeadModel` of the same shape with a minimal loop (autocast forward,
backward, clip, fused AdamW where available) on random tokens: what the model costs without
lmstack's data, logging and checkpointing. Prints tokens/s of both and the ratio lmstack / peer
(> 1: lmstack faster). On a shared CPU the numbers are noisy: note `uptime` beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def lmstack_run(args, tmp: Path) -> tuple[float, float | None, int]:
    from lmstack.tokenizers.gpt2 import load_gpt2
    from lmstack.training.config import TrainConfig
    from lmstack.training.metrics import read_metrics
    from lmstack.training.pretrain import train

    tok = load_gpt2(SHARED / "fixtures/gpt2/encoder.json", SHARED / "fixtures/gpt2/vocab.bpe")
    tok.save(tmp / "gpt2-tokenizer")
    cfg = TrainConfig(
        out_dir=str(tmp / "run"),
        data=[str(SHARED / "data/tinyshakespeare.txt")],
        tokenizer=str(tmp / "gpt2-tokenizer"),
        family="gpt",
        preset=args.preset,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=2,
        eval_interval=0,
        eval_batches=1,
        ckpt_interval=0,
        dtype=args.dtype,
        compile=args.compile,
        device=args.device,
        peak_flops=args.peak_flops,
        model={"vocab_size": 50304},
    )
    train(cfg)
    steps = [r for r in read_metrics(cfg.out_dir) if "tokens_per_s" in r][3:]
    mfus = [r["mfu"] for r in steps if r["mfu"] is not None]
    return statistics.median(r["tokens_per_s"] for r in steps), (statistics.median(mfus) if mfus else None), len(steps)


def peer_run(args) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmstack.models.gpt import GPTConfig

    c = GPTConfig.preset(args.preset, block_size=args.block_size, vocab_size=50304)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu")
    )
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).to(device)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    step_fn = torch.compile(model) if args.compile else model
    autocast = (
        contextlib.nullcontext() if args.dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, args.dtype))
    )
    times = []
    for _ in range(args.steps):
        x = torch.randint(0, 50257, (args.batch_size, args.block_size), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = step_fn(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the loop reads the loss every step too
        times.append(time.perf_counter() - t0)
    return statistics.median(args.batch_size * args.block_size / t for t in times[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m", help="GPT preset (default: gpt2-124m)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s for MFU (0: look up known GPUs)")
    args = p.parse_args()
    if args.steps < 5:
        p.error("--steps must be at least 5 (the first three are warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        tps, mfu, n = lmstack_run(args, Path(tmp))
    peer = peer_run(args)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(
        f"\n{args.preset}, batch {args.batch_size} x {args.block_size}, {args.dtype}, compile={args.compile}, "
        f"{name}, median of {n} steps"
    )
    print(f"{'':<28}{'tokens/s':>12}{'MFU':>8}")
    print(f"{'lmstack train':<28}{tps:>12,.0f}{(f'{mfu:.1%}' if mfu is not None else 'n/a'):>8}")
    print(f"{'transformers GPT2 (bare)':<28}{peer:>12,.0f}{'':>8}")
    print(f"ratio lmstack / transformers: {tps / peer:.2f}")


if __name__ == "__main__":
    main()

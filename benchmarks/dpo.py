"""lmstack's DPO step beside TRL's on identical weights and the same batch, in the same process.

    python -P benchmarks/dpo.py               # GPT-2 shape 256 wide, 4 layers, vocab 8000; 8 pairs of 128 tokens
    python -P benchmarks/dpo.py --quick       # smoke run, under a minute

A random `transformers.GPT2LMHeadModel` is saved and imported with `lmstack.models.hf.from_hf`, so
both sides start from the same weights. One batch of `--pairs` pairs, each row a prompt of
`--prompt` tokens and a response of `--response` tokens (no padding), with reference log-probs
precomputed on both sides (TRL: `precompute_ref_log_probs=True`; lmstack always). lmstack runs the
recipe's own step: `training.dpo.PreferenceLoss` under `training.step.OptimizerStep`. TRL runs its
trainer's loss (`DPOTrainer._compute_loss`: the model forward with its fused LM-head log-probs,
then the sigmoid loss), backward, clip, AdamW step, zero the gradients. Both: float32, AdamW with
the same lr and betas, no weight decay, gradient norm clipped to 1.0, beta 0.1.

Steps alternate between the two sides, so a change in the machine's load hits both; the first
`--warmup` steps are not timed; the median of the others is reported with the ratio TRL time /
lmstack time (> 1: lmstack faster), for wall and process CPU time. Honesty check: the first
step's loss (same weights, same batch) agrees to ~1e-5 on both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

BETAS = (0.9, 0.95)


def hf_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` ids: TRL's trainer wants one, the batch is given as ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<eos>": vocab - 2, "<pad>": vocab - 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")),
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<eos>",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="128 wide, 2 layers, 4 steps")
    args = ap.parse_args()
    if args.quick:
        args.width, args.layers, args.steps, args.warmup = 128, 2, 4, 1
    torch.set_num_threads(args.threads)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true")
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from lmstack.data.pairs import Pair, collate_pairs
    from lmstack.models.hf import from_hf
    from lmstack.training.distributed import Dist
    from lmstack.training.dpo import DPOConfig, PreferenceLoss
    from lmstack.training.step import OptimizerStep

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=args.vocab,
            n_positions=args.prompt + args.response,
            n_embd=args.width,
            n_layer=args.layers,
            n_head=max(1, args.width // 64),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    hf.save_pretrained(tmp / "hf")
    ours, _ = from_hf(tmp / "hf")
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, args.vocab - 2, (n,), generator=g).tolist()
    pairs = [Pair(ids(args.prompt), ids(args.response), ids(args.response), str(i)) for i in range(args.pairs)]
    ref = -torch.rand(args.pairs, 2, generator=g) * 10 - args.response * 9
    batch = collate_pairs(pairs, {"reference": ref}, range(args.pairs))
    completion = (batch["targets"] != -100).roll(1, 1)  # the response tokens themselves
    inputs = {
        "input_ids": batch["idx"],
        "attention_mask": torch.ones_like(batch["idx"]),
        "completion_mask": completion.long(),
        "ref_chosen_logps": ref[:, 0],
        "ref_rejected_logps": ref[:, 1],
    }

    cfg = DPOConfig(
        init_from="x",
        data=["x"],
        lr=1e-4,
        beta1=BETAS[0],
        beta2=BETAS[1],
        weight_decay=0.0,
        grad_clip=1.0,
        out_dir=str(tmp / "run"),
    )
    stepper = OptimizerStep(PreferenceLoss(ours.train(), cfg), cfg, Dist(), torch.device("cpu"))
    targs = TRLConfig(
        output_dir=str(tmp / "trl"),
        beta=cfg.beta,
        precompute_ref_log_probs=True,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=hf,
        args=targs,
        processing_class=hf_tokenizer(args.vocab),
        train_dataset=Dataset.from_list([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 4),
    )
    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=0.0)

    def lmstack_step(step: int) -> float:
        return stepper(lambda micro: batch, 1, cfg.lr, step).loss

    def trl_step(step: int) -> float:
        loss = trainer._compute_loss(hf, inputs, False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    times: dict[str, list[tuple[float, float]]] = {"lmstack": [], "trl": []}
    first = {}
    for step in range(args.steps):
        for name, fn in (("lmstack", lmstack_step), ("trl", trl_step)):
            w, c = time.perf_counter(), time.process_time()
            loss = fn(step)
            if step >= args.warmup:
                times[name].append((time.perf_counter() - w, time.process_time() - c))
            first.setdefault(name, loss)
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    rows = args.pairs * 2
    print(
        f"DPO step, GPT-2 shape {args.width} wide x {args.layers} layers, vocab {args.vocab}; {args.pairs} pairs "
        f"({rows} rows of {args.prompt + args.response} tokens); {args.threads} thread(s); median of {len(times['trl'])} steps"
    )
    print(
        f"first-step loss: lmstack {first['lmstack']:.6f}, TRL {first['trl']:.6f} (|diff| "
        f"{abs(first['lmstack'] - first['trl']):.1e})"
    )
    for name in ("lmstack", "trl"):
        print(f"  {name:8s} wall {wall[name] * 1e3:8.1f} ms   cpu {cpu[name] * 1e3:8.1f} ms")
    print(
        f"TRL / lmstack: wall {wall['trl'] / wall['lmstack']:.2f}x, cpu {cpu['trl'] / cpu['lmstack']:.2f}x (> 1: lmstack faster)"
    )


if __name__ == "__main__":
    main()

"""lmstack's fine-tuning step beside transformers (+ peft) on identical weights, in the same process.

    python -P benchmarks/finetune.py                  # sizes small and medium, 8 x 256 tokens, 1 thread
    python -P benchmarks/finetune.py --quick          # smoke run, under a minute

A random `transformers.LlamaForCausalLM` is saved and imported with `lmstack.models.hf.from_hf`, so
both sides start from the same weights. One batch is used on both sides: `--rows` rows of exactly
`--length` tokens (no padding on either side), each one prompt + answer example with the loss on
the answer only (the prompt is the first 25-50% of its row). lmstack runs the recipe's own step:
`AnswerLoss` (which passes the row's `segments`, as packed fine-tuning does) under
`training.step.OptimizerStep`. transformers runs a bare loop: forward with `labels` (-100 on the
prompt) and an all-ones `attention_mask`, backward, clip, AdamW step, zero the gradients, read the
loss. Both: float32, AdamW with the same lr, betas and weight decay (matrices only, as lmstack's
`make_optimizer` groups them), gradient norm clipped to 1.0.

Modes: full SFT (every parameter trains), and LoRA on q, k, v, o, gate, up, down (lmstack's
`lora.attach` vs peft's `get_peft_model`, same r and alpha; peft's lora_A is overwritten with
lmstack's so both train the same adapters). Steps alternate between the two sides, so a change
in the machine's load hits both; the first `--warmup` steps are not timed; the median of the
others is reported, with the ratio transformers time / lmstack time (> 1: lmstack faster), for wall
and process CPU time (the steadier one on a loaded machine).

Honesty check: the loss of the first step (same weights, same batch) and of the last one (same
updates) are printed for both sides; they agree to ~1e-5 unless something differs.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "small": (256, 4, 8, 4, 688, 8000),
    "medium": (512, 6, 8, 4, 1376, 16000),
}
LORA_TARGETS = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
BETAS = (0.9, 0.95)
CLIP = 1.0


def save_llama(size: str, out: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)


def make_batch(rows: int, length: int, vocab: int, seed: int) -> tuple[dict, dict]:
    """(lmstack batch, transformers kwargs) of the same rows: prompt + answer, loss on the answer."""
    from lmstack.data.sft import Example, collate

    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rows):
        ids = rng.integers(0, vocab, length)
        mask = np.arange(length) >= rng.integers(length // 4, length // 2)
        examples.append(Example(ids, mask))
    ours = collate([[e] for e in examples], length)
    ids = torch.from_numpy(np.stack([e.ids for e in examples]))
    labels = torch.from_numpy(np.stack([np.where(e.mask, e.ids, -100) for e in examples]))
    return ours, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """lmstack's optimizer for the peer: decay on matrices, none on vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


def lmstack_side(hf_dir: Path, batch: dict, lora: bool, args, tmp: Path):
    """lmstack's step as the fine-tuning recipe runs it -> (step function, model)."""
    from lmstack.models.hf import from_hf
    from lmstack.models.lora import LoraConfig, attach
    from lmstack.training.distributed import Dist
    from lmstack.training.finetune import AnswerLoss, FinetuneConfig
    from lmstack.training.step import OptimizerStep

    model, _ = from_hf(hf_dir)
    model.float().train()
    if lora:
        attach(model, LoraConfig(r=args.r, alpha=args.alpha, targets=("attn", "mlp")))
    cfg = FinetuneConfig(
        out_dir=str(tmp / "run"),
        device="cpu",
        dtype="float32",
        lr=args.lr,
        weight_decay=args.weight_decay,
        beta1=BETAS[0],
        beta2=BETAS[1],
        grad_clip=CLIP,
    )
    stepper = OptimizerStep(AnswerLoss(model), cfg, Dist(), torch.device("cpu"))
    steps = iter(range(10**9))
    return lambda: stepper(lambda micro: batch, accum=1, lr=args.lr, step=next(steps)).loss, model


def hf_side(hf_dir: Path, kwargs: dict, lora_from, args):
    """transformers (+ peft) in a bare loop -> step function."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32).train()
    if lora_from is not None:
        model = peft_model(model, lora_from, args)
    opt = adamw(model, args.lr, args.weight_decay)
    trained = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        loss = model(**kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peft_model(model, ours, args):
    """peft's LoRA on the same modules, its lora_A copied from lmstack's (lora_B starts at zero on both)."""
    from peft import LoraConfig, get_peft_model

    from lmstack.models.lora import lora_modules

    model = get_peft_model(
        model,
        LoraConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=[v.split(".")[1] for v in LORA_TARGETS.values()],
        ),
    )
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            _, layer, where = name.split(".", 2)
            theirs = model.get_submodule(f"base_model.model.model.layers.{layer}.{LORA_TARGETS[where]}")
            theirs.lora_A["default"].weight.copy_(m.lora_A)
    return model


def race(ours, theirs, warmup: int, steps: int) -> dict:
    """Alternate the two step functions -> per side: median wall and CPU seconds of the timed
    steps, first and last loss. CPU time (the process's) is what a loaded machine disturbs least."""
    wall: dict[str, list[float]] = {"ours": [], "theirs": []}
    cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
    losses: dict[str, list[float]] = {"ours": [], "theirs": []}
    for k in range(warmup + steps):
        for side, fn in (("ours", ours), ("theirs", theirs)) if k % 2 == 0 else (("theirs", theirs), ("ours", ours)):
            t, c = time.perf_counter(), time.process_time()
            losses[side].append(fn())
            if k >= warmup:
                wall[side].append(time.perf_counter() - t)
                cpu[side].append(time.process_time() - c)
    return {
        side: (statistics.median(wall[side]), statistics.median(cpu[side]), losses[side][0], losses[side][-1]) for side in wall
    }


def run_size(size: str, args) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_llama(size, tmp / "hf", args.seed)
        ours_batch, hf_kwargs = make_batch(args.rows, args.length, SIZES[size][5], args.seed)
        for mode in ("full SFT", "LoRA"):
            lora = mode == "LoRA"
            ours, model = lmstack_side(tmp / "hf", ours_batch, lora, args, tmp)
            theirs = hf_side(tmp / "hf", hf_kwargs, model if lora else None, args)
            result = race(ours, theirs, args.warmup, args.steps)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append((size, mode, trained, result["ours"], result["theirs"]))
            del ours, theirs, model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small size, 4 x 128 tokens, 3 timed steps")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rows, args.length, args.steps, args.warmup = ["small"], 4, 128, 3, 1
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a transformers method deprecated in v5
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.rows} x {args.length}, float32, load {os.getloadavg()[0]:.1f}"
    )
    rows = [row for size in args.sizes for row in run_size(size, args)]
    print(
        f"\n{'size':<8}{'mode':<10}{'trained':>12}{'lmstack s':>11}{'peer s':>9}{'ratio':>7}{'CPU ratio':>11}  "
        f"{'first loss lmstack / peer':>28}  {'last loss lmstack / peer':>26}"
    )
    for size, mode, trained, ours, peer in rows:
        print(
            f"{size:<8}{mode:<10}{trained:>12,}{ours[0]:>11.3f}{peer[0]:>9.3f}{peer[0] / ours[0]:>7.2f}"
            f"{peer[1] / ours[1]:>11.2f}  {ours[2]:>13.6f} / {peer[2]:<12.6f}  {ours[3]:>12.6f} / {peer[3]:<12.6f}"
        )
    print(
        f"\nratio = peer time / lmstack time (> 1: lmstack faster), wall and process CPU time; median of {args.steps} "
        f"steps after {args.warmup} warm-up; load {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()

"""The serving engine in-process: continuous batching and mixed LoRA cards, against one request
and against peft's mixed-adapter batch.

    python benchmarks/serving_engine.py [--clients 32] [--cards 8] [--prompt-tokens 32] [--new-tokens 32]
                                        [--depth 4] [--width 512] [--rank 8] [--repeats 3] [--threads 0]
                                        [--device cpu] [--compile]

A small GPT-2-style model (random weights; speed does not depend on them) and --cards random LoRA
adapters (rank --rank on attention and MLP), decoded greedily for --new-tokens tokens each:

- one: one request alone on the scheduler;
- base: --clients requests at once, no adapter;
- mixed: the same requests, request i on card i % --cards, all in one batch;
- peft: the same mixed batch through `transformers` + `peft` (the `transformers` twin of the model,
  the same adapter files, `generate(..., adapter_names=[...])`).

Prints aggregate tokens/s (generated tokens / wall seconds, prompts read included), the ratios
the issue asks for (base/one >= 4, mixed/base >= 0.7, mixed/peft >= 2) and how many of the mixed
rows' tokens agree with peft's (a check that both computed the same thing). Wall times are the
fastest of --repeats interleaved runs (the one the machine's other work disturbed least); the load
average is printed, since a shared CPU is noisy. The process's CPU seconds (`time.process_time`,
every thread) are printed too: with --threads 1 tokens per CPU second depend much less on what
else the machine runs than tokens per wall second do. Both engines use the same torch threads;
the default is every core, as `lmstack serve` runs (--threads 1 is steadier on a shared CPU).

lmstack's model is laid out as `lmstack serve` lays it out (`models.base.input_major`: linear
weights input-major on a CPU, as transformers' GPT-2 stores them).

--compile decodes lmstack's rows through `GPT.compile_decoding` (static KV cache, torch.compile'd
one-token step; CUDA graphs with --device cuda), compiled by `Scheduler.warm_up` before any timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/tokenizers.py would shadow Hugging Face's `tokenizers`, which transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lmstack.generation import GenerationConfig  # noqa: E402
from lmstack.generation.scheduler import Scheduler  # noqa: E402
from lmstack.models import lora  # noqa: E402
from lmstack.models.base import input_major  # noqa: E402
from lmstack.models.gpt import GPT, GPTConfig  # noqa: E402
from lmstack.models.hf import to_hf  # noqa: E402


def make_cards(base_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    dirs = []
    for i in range(count):
        model = GPT.load(base_dir)
        lora.attach(model, lora.LoraConfig(r=rank, alpha=2 * rank, targets=("attn", "mlp")))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
        dirs.append(lora.save_adapter(model, out / f"card{i}", base_dir))
    return dirs


def serve(scheduler: Scheduler, prompts: list[list[int]], config: GenerationConfig, cards: list[str | None]):
    """Run the requests to the end; ((wall, CPU) seconds, generated tokens per request)."""
    t, c = time.perf_counter(), time.process_time()
    ids = [scheduler.add(p, config, adapter=c) for p, c in zip(prompts, cards)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while scheduler.busy:
        for e in scheduler.step():
            if e.token is not None:
                out[e.request].append(e.token)
    return (time.perf_counter() - t, time.process_time() - c), [out[i] for i in ids]


def peft_mixed(hf_dir: Path, card_dirs: list[Path], device: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
    model = PeftModel.from_pretrained(model, card_dirs[0], adapter_name="card0")
    for i, d in enumerate(card_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"card{i}")
    model.eval()

    def run(prompts: list[list[int]], names: list[str], new_tokens: int):
        ids = torch.tensor(prompts, device=device)
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=names,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return (time.perf_counter() - t, time.process_time() - c), out[:, ids.shape[1] :].tolist()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default 0: torch's default, every core, as `lmstack serve` runs)"
    )
    ap.add_argument("--device", default="cpu", help="torch device of both engines (default: cpu)")
    ap.add_argument("--compile", action="store_true", help="decode lmstack's rows through a compiled step (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 4096
    model = GPT(
        GPTConfig(
            vocab_size=vocab, block_size=args.prompt_tokens + args.new_tokens, n_layer=args.depth, n_head=4, n_embd=args.width
        )
    ).eval()
    prompts = torch.randint(0, vocab, (args.clients, args.prompt_tokens)).tolist()
    names = [f"card{i % args.cards}" for i in range(args.clients)]
    config = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save(tmp / "base")
        card_dirs = make_cards(tmp / "base", tmp, args.cards, args.rank)
        to_hf(model, tmp / "hf")
        served = GPT.load(tmp / "base").to(args.device).eval()
        input_major(served)  # as `lmstack serve` does
        if args.compile:
            served.compile_decoding()
        sched = Scheduler(served, None, max_batch=args.clients)
        for i, d in enumerate(card_dirs):
            sched.load_adapter(f"card{i}", d)
        if args.compile:
            sched.warm_up()
        peft_run = peft_mixed(tmp / "hf", card_dirs, args.device)
        runs = {
            "one": lambda: serve(sched, prompts[:1], config, [None]),
            "base": lambda: serve(sched, prompts, config, [None] * args.clients),
            "mixed": lambda: serve(sched, prompts, config, names),
            "peft": lambda: peft_run(prompts, names, args.new_tokens),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        outs: dict = {}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                secs, outs[k] = fn()
                times[k].append(secs)
    tokens = {k: (1 if k == "one" else args.clients) * args.new_tokens for k in runs}
    rate = {k: tokens[k] / min(w for w, _ in ts) for k, ts in times.items()}
    cpu_rate = {k: tokens[k] / min(c for _, c in ts) for k, ts in times.items()}
    agree = sum(a == b for x, y in zip(outs["mixed"], outs["peft"]) for a, b in zip(x, y)) / (args.clients * args.new_tokens)
    print(
        f"model: GPT d{args.depth} width {args.width}, vocab {vocab}; {args.clients} clients x {args.new_tokens} new "
        f"tokens after {args.prompt_tokens}-token prompts; {args.cards} cards of rank {args.rank} (attn + mlp); "
        f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}; device {args.device}"
        f"{', lmstack compiled' if args.compile else ''}"
    )
    for k in runs:
        print(
            f"  {k:6s} {rate[k]:9.1f} tokens/s   {cpu_rate[k]:9.1f} tokens/CPU s   (fastest of {args.repeats}: "
            f"{min(w for w, _ in times[k]):.3f} s wall, {min(c for _, c in times[k]):.3f} s CPU)"
        )
    for (a, b), target in ((("base", "one"), 4), (("mixed", "base"), 0.7), (("mixed", "peft"), 2)):
        ratio = f"{a} / {b}"
        print(f"{ratio:12s} = {rate[a] / rate[b]:.2f}x wall, {cpu_rate[a] / cpu_rate[b]:.2f}x CPU   (target >= {target})")
    print(f"mixed tokens equal to peft's: {agree:.1%}")


if __name__ == "__main__":
    main()

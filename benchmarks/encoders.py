"""BERT and T5 speed beside Hugging Face `transformers` on the same weights, in the same process.

    python benchmarks/encoders.py [--batch 8] [--src-len 128] [--tgt-len 32] [--repeats 5]

Each model is imported from a random `transformers` model saved to a temp directory (so both
compute the same function), then the two run on the same inputs in float32 on CPU,
alternating, and the median wall and CPU times of `--repeats` runs are compared:
- BERT masked-LM forward over a padded batch;
- T5 teacher-forced forward (encoder + decoder over the whole target);
- T5 greedy decoding of `--tgt-len` tokens with caches (lmstack `start`/`step` vs `generate`).
A ratio above 1 means lmstack is faster.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def compare(name: str, ours, theirs, repeats: int) -> None:
    """Run the two alternately (so load from other processes hits both alike) and print median
    wall and CPU times; CPU time is steadier on a shared machine."""
    ours(), theirs()  # warm-up
    times = {ours: ([], []), theirs: ([], [])}
    for _ in range(repeats):
        for fn in (ours, theirs):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[fn][0].append(time.perf_counter() - wall)
            times[fn][1].append(time.process_time() - cpu)
    (ow, oc), (tw, tc) = ([statistics.median(x) for x in times[f]] for f in (ours, theirs))
    print(
        f"{name:<28} wall: lmstack {ow * 1e3:7.1f} ms, transformers {tw * 1e3:7.1f} ms, ratio {tw / ow:4.2f}x | "
        f"cpu: {oc * 1e3:7.1f} ms vs {tc * 1e3:7.1f} ms, ratio {tc / oc:4.2f}x"
    )


def bench_bert(args) -> None:
    import transformers

    from lmstack.models.bert import from_hf_bert

    cfg = transformers.BertConfig(
        vocab_size=8000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, _ = from_hf_bert(d)
    ids = torch.randint(5, 8000, (args.batch, args.src_len))
    mask = torch.ones_like(ids)
    mask[args.batch // 2 :, args.src_len // 2 :] = 0
    with torch.no_grad():
        compare("bert mlm forward", lambda: ours(ids, mask), lambda: hf(input_ids=ids, attention_mask=mask), args.repeats)


def bench_t5(args) -> None:
    import transformers

    from lmstack.models.t5 import from_hf_t5

    cfg = transformers.T5Config(
        vocab_size=8000, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, _ = from_hf_t5(d)
    src = torch.randint(2, 8000, (args.batch, args.src_len))
    tgt = torch.randint(2, 8000, (args.batch, args.tgt_len))
    mask = torch.ones_like(src)

    def greedy():
        state, lp = ours.start(src, src_mask=mask)
        for _ in range(args.tgt_len - 1):
            state, lp = ours.step(state, lp.argmax(-1))

    with torch.no_grad():
        compare(
            "t5 teacher-forced forward",
            lambda: ours(src, tgt, mask),
            lambda: hf(input_ids=src, attention_mask=mask, labels=tgt),
            args.repeats,
        )
        compare(
            f"t5 greedy decode {args.tgt_len} tokens",
            greedy,
            lambda: hf.generate(
                input_ids=src,
                attention_mask=mask,
                max_new_tokens=args.tgt_len,
                min_new_tokens=args.tgt_len,
                do_sample=False,
                num_beams=1,
            ),
            args.repeats,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch}, source {args.src_len}, target {args.tgt_len}")
    bench_bert(args)
    bench_t5(args)


if __name__ == "__main__":
    main()

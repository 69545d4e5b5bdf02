"""Tokenizer training time, encoding speed and bytes per token, beside peers in the same process.

    python benchmarks/tokenizers.py [--corpus english|tang] [--size-mb 36.6] [--vocab-size 8192]
                                    [--threads 2] [--quick] [--no-unigram]

Corpus: "english", text assembled from ../shared/data (Tiny Shakespeare plus every text field
of the JSONL sets, one line per text line), or "tang", the Tang poems (Chinese), repeated until
it reaches --size-mb. Encoding speed
and bytes per token are measured on the first --encode-mb of the corpus, with fresh (cold
cache) tokenizers.

Peers: Hugging Face `tokenizers` (byte-level BPE, GPT-2 pattern, as in lmstack), sentencepiece
(BPE and Unigram, byte fallback) and tiktoken (GPT-2's encoding built from
../shared/fixtures/gpt2, and lmstack's trained vocabulary handed to tiktoken directly). Training
uses --threads threads/processes everywhere and is timed on the wall clock; encoding is
single-threaded everywhere and timed in CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the `tokenizers` package it benchmarks against; keep its own folder
# off the import path so `import tokenizers` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMSTACK_SHARED", REPO.parent / "shared"))
EOT = "<|endoftext|>"


def english_lines() -> list[str]:
    data = SHARED / "data"
    lines = data.joinpath("tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    for f in sorted(data.glob("*.jsonl")):
        for row in f.read_text(encoding="utf-8").splitlines():
            for v in json.loads(row).values():
                if isinstance(v, str):
                    lines.extend(p.strip() for p in v.split("\n") if p.strip())
    return lines


def build_corpus(path: Path, corpus: str, size_mb: float) -> tuple[int, int]:
    """Write the corpus repeated up to `size_mb`; returns (bytes written, bytes of one copy)."""
    if corpus == "tang":
        base = (SHARED / "data" / "zh_tang_poems.txt").read_bytes()
    else:
        base = ("\n".join(english_lines()) + "\n").encode("utf-8")
    target = int(size_mb * 1e6)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            piece = base[: target - written]
            piece = piece[: piece.rfind(b"\n") + 1] or piece
            f.write(piece)
            written += len(piece)
    return written, len(base)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def mb_per_s(encode, text: str) -> tuple[float, int]:
    """Encoding speed over `text` in 64 KB pieces cut at line ends, and the token count."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + (1 << 16))
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    n_tokens = 0
    t0 = time.process_time()  # CPU time: fairer than wall time on a shared, loaded machine
    for p in pieces:
        n_tokens += len(encode(p))
    dt = time.process_time() - t0
    return len(text.encode("utf-8")) / 1e6 / dt, n_tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=["english", "tang"], default="english")
    ap.add_argument("--size-mb", type=float, default=36.6, help="training corpus size (default 36.6)")
    ap.add_argument("--encode-mb", type=float, default=4.0, help="text encoded for speed and bytes/token (default 4)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2, help="training threads/processes for every tokenizer")
    ap.add_argument("--quick", action="store_true", help="small run: 4 MB corpus, 1 MB encoded, vocab 2048")
    ap.add_argument("--no-unigram", action="store_true", help="skip the Unigram trainers (the slowest part)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mb, args.encode_mb, args.vocab_size = 4.0, 1.0, 2048
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers starts its pool
    os.environ["LMSTACK_NO_PROGRESS"] = "1"

    import sentencepiece as spm
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lmstack.tokenizers.bpe import PATTERNS, BPETokenizer
    from lmstack.tokenizers.hf import save_hf

    work = Path(tempfile.mkdtemp(prefix="lmstack-tok-bench-"))
    corpus = work / f"{args.corpus}.txt"
    size, base_size = build_corpus(corpus, args.corpus, args.size_mb)
    with open(corpus, "rb") as f:  # never past the first copy: repeats would only measure caches
        head = f.read(min(int(args.encode_mb * 1e6), base_size))
    sample = head[: head.rfind(b"\n") + 1].decode("utf-8")
    load = os.getloadavg()
    print(
        f"corpus: {size / 1e6:.1f} MB {args.corpus} ({corpus}); vocab {args.vocab_size}; {args.threads} threads; "
        f"encode sample {len(sample.encode()) / 1e6:.1f} MB; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    train, speed, bpt = {}, {}, {}

    # --- byte-level BPE: lmstack vs Hugging Face ---------------------------------------------
    ours, train["lmstack bpe"] = timed(
        lambda: BPETokenizer.train_files([corpus], args.vocab_size, special_tokens=(EOT,), pattern="gpt2", workers=args.threads)
    )
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    _, train["hf bpe"] = timed(lambda: hf.train([str(corpus)], trainer))
    save_hf(ours, work / "ours.json")
    hf_ours = Tokenizer.from_file(str(work / "ours.json"))  # lmstack's vocabulary inside HF

    fast = BPETokenizer(ours.tokens, ours.merges, ours.pattern, ours.special_tokens, engine="tiktoken")
    slow = BPETokenizer(ours.tokens, ours.merges, ours.pattern, ours.special_tokens, engine="python")
    raw_tiktoken = tiktoken.Encoding("raw", pat_str=ours.pattern, mergeable_ranks=fast._ranks, special_tokens={})
    d = SHARED / "fixtures" / "gpt2"
    gpt2 = tiktoken.Encoding(
        "gpt2-files",
        pat_str=PATTERNS["gpt2"],
        special_tokens={},
        mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json")),
    )
    speed["tiktoken gpt2"], _ = mb_per_s(gpt2.encode_ordinary, sample)
    speed["tiktoken (lmstack vocab)"], _ = mb_per_s(raw_tiktoken.encode_ordinary, sample)
    speed["lmstack bpe fast path"], n_ours = mb_per_s(fast.encode, sample)
    speed["lmstack bpe python path"], n_slow = mb_per_s(slow.encode, sample)
    speed["hf bpe (lmstack vocab)"], _ = mb_per_s(lambda t: hf_ours.encode(t, add_special_tokens=False).ids, sample)
    speed["hf bpe (own vocab)"], n_hf = mb_per_s(lambda t: hf.encode(t, add_special_tokens=False).ids, sample)
    assert n_slow == n_ours, "python and tiktoken paths disagree"
    n_bytes = len(sample.encode("utf-8"))
    bpt["lmstack bpe"], bpt["hf bpe"] = n_bytes / n_ours, n_bytes / n_hf

    # --- sentencepiece BPE and Unigram, lmstack Unigram ----------------------------------------
    kinds = ["bpe"] if args.no_unigram else ["bpe", "unigram"]
    for kind in kinds:
        prefix = work / f"spm_{kind}"
        _, train[f"spm {kind}"] = timed(
            lambda: spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(prefix),
                vocab_size=args.vocab_size,
                model_type=kind,
                byte_fallback=True,
                num_threads=args.threads,
                input_sentence_size=0,
                character_coverage=1.0,
                user_defined_symbols=[EOT],
                minloglevel=2,
            )
        )
        sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
        speed[f"spm {kind}"], n = mb_per_s(sp.encode, sample)
        bpt[f"spm {kind}"] = n_bytes / n
    if not args.no_unigram:
        from lmstack.tokenizers.unigram import UnigramTokenizer

        uni, train["lmstack unigram"] = timed(
            lambda: UnigramTokenizer.train_files([corpus], args.vocab_size, special_tokens=(EOT,))
        )
        speed["lmstack unigram"], n = mb_per_s(uni.encode, sample)
        bpt["lmstack unigram"] = n_bytes / n

    print("\ntraining seconds")
    for k, v in train.items():
        print(f"  {k:28s} {v:8.2f}")
    print("encoding MB/s (single thread)")
    for k, v in speed.items():
        print(f"  {k:28s} {v:8.2f}")
    print("bytes per token")
    for k, v in bpt.items():
        print(f"  {k:28s} {v:8.4f}")
    ratios = [
        ("bpe train time, lmstack / hf (aim <= 3)", train["lmstack bpe"] / train["hf bpe"]),
        ("fast-path speed, tiktoken gpt2 / lmstack (aim <= 1.2)", speed["tiktoken gpt2"] / speed["lmstack bpe fast path"]),
        ("fast-path speed, tiktoken same vocab / lmstack", speed["tiktoken (lmstack vocab)"] / speed["lmstack bpe fast path"]),
        (
            "python-path speed, lmstack / hf same vocab (aim >= 1)",
            speed["lmstack bpe python path"] / speed["hf bpe (lmstack vocab)"],
        ),
        ("bytes/token, lmstack bpe / hf bpe (aim within 1%)", bpt["lmstack bpe"] / bpt["hf bpe"]),
    ]
    if "lmstack unigram" in train:
        ratios += [
            ("unigram train time, lmstack / spm (aim <= 3)", train["lmstack unigram"] / train["spm unigram"]),
            ("bytes/token, lmstack unigram / spm unigram (aim within 2%)", bpt["lmstack unigram"] / bpt["spm unigram"]),
        ]
    print("ratios")
    for k, v in ratios:
        print(f"  {k:60s} {v:6.3f}")


if __name__ == "__main__":
    sys.exit(main())

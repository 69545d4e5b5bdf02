"""N-gram build time, peak memory and query speed, beside peers run in the same process.

    python benchmarks/ngram.py [--orders 3 5] [--synthetic-tokens 10000000]

Corpora: Tiny Shakespeare; "mixed", Tiny Shakespeare plus every text field of the shared JSONL
sets (GSM8K, HH-RLHF, self-instruct, SVAMP), one line per text line; and optionally a synthetic
Zipf corpus whose n-grams are nearly all distinct (the worst case for memory), to extrapolate
to 100 M tokens. Each build runs in a fresh subprocess so its peak RSS is its own.

Peers: a pure-Python `collections.Counter` over n-gram tuples (the counting step only, the
approach this module avoids), and the KenLM Python module's query speed when it is installed.
KenLM's `lmplz` itself is not installed here; its quoted figure is a 5-gram on ~0.9 M tokens in
~2 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMSTACK_SHARED", REPO.parent / "shared"))
LMPLZ_5GRAM_SECONDS_PER_MTOKEN = 2.0 / 0.9


def mixed_corpus(path: Path) -> None:
    data = SHARED / "data"
    with open(path, "w", encoding="utf-8") as out:
        out.write((data / "tinyshakespeare.txt").read_text(encoding="utf-8"))
        for f in sorted(data.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                for v in json.loads(line).values():
                    if isinstance(v, str):
                        for piece in v.split("\n"):
                            if piece.strip():
                                out.write(piece.strip() + "\n")


def synthetic_corpus(path: Path, tokens: int, vocab: int = 200_000, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as out:
        left = tokens
        while left > 0:
            n = min(left, 1_000_000)
            ids = np.minimum(rng.zipf(1.2, n), vocab)
            lengths = rng.integers(5, 30, n // 10 + 1)
            words = [f"w{i}" for i in ids.tolist()]
            pos = 0
            for L in lengths.tolist():
                if pos >= n:
                    break
                out.write(" ".join(words[pos : pos + L]) + "\n")
                pos += L
            left -= n


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would
    inherit the parent's peak (e.g. after it generated a corpus in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_child(corpus: str, order: int, query: str) -> dict:
    """Runs in a subprocess: build, report times, peak RSS and query speed."""
    import torch

    from lmstack.evaluation.perplexity import perplexity
    from lmstack.models.ngram import NGramLM

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    model = NGramLM.train([corpus], order=order)
    build = time.perf_counter() - t0
    peak = peak_rss_mb()
    lines = Path(query).read_text(encoding="utf-8").split("\n")[:-1]
    t0 = time.perf_counter()
    res = perplexity(model, lines, model.encode, model.bos_id, model.eos_id, model.unk_id, max_batch_tokens=1 << 20)
    q = time.perf_counter() - t0
    # query without tokenizing: the scoring kernel alone, on one [1, T] row
    ids = torch.tensor([[model.bos_id] + [i for line in lines for i in (*model.encode(line), model.eos_id)]])
    t0 = time.perf_counter()
    model.token_logprobs(ids)
    kernel = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        model.write_arpa(Path(d) / "m.arpa")
        write = time.perf_counter() - t0
        arpa_mb = (Path(d) / "m.arpa").stat().st_size / 1e6
    return {
        "tokens": model.config.train_tokens,
        "ngrams": [len(t.keys) for t in model.tables],
        "build_s": build,
        "peak_rss_mb": peak,
        "rss_after_import_mb": base_rss,
        "query_tokens": res.tokens,
        "query_tok_per_s": res.tokens / q,
        "kernel_tok_per_s": (ids.shape[1] - 1) / kernel,
        "write_arpa_s": write,
        "arpa_mb": arpa_mb,
    }


def counter_peer(corpus: Path, order: int) -> float:
    """Pure-Python counting of every n-gram order (Counter of tuples); seconds."""
    t0 = time.perf_counter()
    counts = [Counter() for _ in range(order)]
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            s = ["<s>", *line.split(), "</s>"]
            for n in range(1, order + 1):
                counts[n - 1].update(zip(*(s[i:] for i in range(n))))
    return time.perf_counter() - t0


def kenlm_query_peer(arpa: Path, query: Path) -> float | None:
    try:
        import kenlm
    except ImportError:
        return None
    model = kenlm.Model(str(arpa))
    lines = query.read_text(encoding="utf-8").split("\n")[:-1]
    t0 = time.perf_counter()
    tokens = sum(len(list(model.full_scores(line))) for line in lines)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("CORPUS", "ORDER", "QUERY"), help=argparse.SUPPRESS)
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--synthetic-tokens", type=int, default=0, help="also build on a Zipf corpus of this many tokens")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(build_child(args.child[0], int(args.child[1]), args.child[2])))
        return

    print(f"load: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        lines = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n")
        query = d / "query.txt"
        query.write_text("\n".join(lines[36000:40000]) + "\n", encoding="utf-8")
        corpora = {"tinyshakespeare": SHARED / "data" / "tinyshakespeare.txt", "mixed": d / "mixed.txt"}
        mixed_corpus(corpora["mixed"])
        if args.synthetic_tokens:
            corpora[f"zipf{args.synthetic_tokens // 1_000_000}M"] = d / "zipf.txt"
            synthetic_corpus(corpora[f"zipf{args.synthetic_tokens // 1_000_000}M"], args.synthetic_tokens)
        for name, corpus in corpora.items():
            for order in args.orders:
                if name.startswith("zipf") and order != max(args.orders):
                    continue
                env = dict(os.environ, LMSTACK_NO_PROGRESS="1")
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(corpus), str(order), str(query)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                ).stdout
                r = json.loads(out)
                mtok = r["tokens"] / 1e6
                line = (
                    f"{name:16s} order {order}: {r['tokens']:>9,d} tokens, n-grams {r['ngrams']}, "
                    f"build {r['build_s']:.2f} s ({r['build_s'] / mtok:.2f} s/Mtok), "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_after_import_mb']:.0f} MB, "
                    f"{(r['peak_rss_mb'] - r['rss_after_import_mb']) * 1e6 / r['tokens']:.0f} B/token), "
                    f"query {r['query_tok_per_s']:,.0f} tok/s via perplexity(), "
                    f"{r['kernel_tok_per_s']:,.0f} tok/s token_logprobs, write ARPA {r['write_arpa_s']:.2f} s "
                    f"({r['arpa_mb']:.0f} MB)"
                )
                if order == 5:
                    line += f"; vs lmplz's quoted 5-gram speed: {r['build_s'] / mtok / LMPLZ_5GRAM_SECONDS_PER_MTOKEN:.2f}x"
                if not name.startswith("zipf"):
                    peer = counter_peer(corpus, order)
                    line += f"; Counter-of-tuples counting alone: {peer:.2f} s ({peer / r['build_s']:.1f}x our full build)"
                print(line, flush=True)
        for order in (2, 3):
            arpa = SHARED / "fixtures" / "kenlm" / f"ts.train.{order}.arpa"
            qps = kenlm_query_peer(arpa, query)
            if qps is not None:
                print(f"kenlm.Model query (order {order}, KenLM's ARPA): {qps:,.0f} tok/s")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""`lmstack embed`: one sentence vector per line of a file, and a cosine-similarity check.

lmstack embed --model runs/simcse/checkpoints/step_0000300 --file sentences.txt --out vectors.npy
lmstack embed --model runs/simcse/checkpoints/step_0000300 --file sentences.txt --query "a cat on a mat"
"""

from __future__ import annotations

import json
import os

SUFFIXES = (".npy", ".jsonl")


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="sentence vectors for the lines of a file, with a cosine-similarity check",
        description='Encode every non-blank line of --file (or the "text" of every row of a .jsonl file) into one vector '
        "with a BERT or GPT checkpoint: a base model, a `lmstack finetune --task embed` checkpoint or an adapter "
        "directory. --out writes the vectors (.npy: a float32 [lines, width] array; .jsonl: one {line, text, vector} "
        "object per line), in file order. Then it prints the most similar pairs of lines by cosine similarity, or with "
        "--query the lines nearest to that text.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint or adapter directory (with tokenizer.json)")
    p.add_argument("--file", required=True, metavar="FILE", help='one sentence per line, or JSONL rows with a "text" field')
    p.add_argument("--out", metavar="PATH", help="write the vectors to PATH.npy or PATH.jsonl (atomically)")
    p.add_argument(
        "--pooling",
        default="",
        choices=["", "cls", "mean", "last"],
        help="cls (BERT's [CLS] state), mean (over the real tokens) or last (the last token's state); "
        "default: the one the checkpoint was trained with, else mean",
    )
    p.add_argument("--query", metavar="TEXT", help="print the lines nearest to TEXT instead of the most similar pairs")
    p.add_argument("--top", type=int, default=5, help="pairs (or nearest lines) to print (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default: 32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    import numpy as np

    from lmstack.errors import InputError
    from lmstack.training.embed import SentenceEncoder, read_texts

    if args.out and os.path.splitext(args.out)[1].lower() not in SUFFIXES:
        raise InputError(f"--out {args.out}: name a .npy or .jsonl file")
    if args.top < 1 or args.batch_size < 1:
        raise InputError("--top and --batch-size must be at least 1")
    rows = read_texts(args.file)
    encoder = SentenceEncoder.load(args.model, args.pooling, args.device)
    texts = [t for t, _ in rows]
    vectors = encoder.encode(texts, args.batch_size)
    if args.out:
        write_vectors(args.out, rows, vectors)
    print(
        f"{len(texts)} vectors of width {vectors.shape[1]} ({encoder.pooling} pooling)"
        + (f" written to {args.out}" if args.out else "")
    )
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if args.query:
        q = encoder.encode([args.query])[0]
        sims = unit @ (q / max(np.linalg.norm(q), 1e-12))
        print(f"nearest lines to {args.query!r}:")
        for i in np.argsort(-sims, kind="stable")[: args.top]:
            print(f"  {sims[i]:.4f}  line {rows[i][1]} {shown(texts[i])}")
        return 0
    pairs = most_similar_pairs(unit, texts, args.top)
    if not pairs:
        print("fewer than two distinct lines: no pairs to compare")
    else:
        print("most similar pairs (cosine):")
    for s, i, j in pairs:
        print(f"  {s:.4f}  line {rows[i][1]} {shown(texts[i])}  <->  line {rows[j][1]} {shown(texts[j])}")
    return 0


def shown(text: str, width: int = 60) -> str:
    return json.dumps(text if len(text) <= width else text[: width - 3] + "...", ensure_ascii=False)


def most_similar_pairs(unit, texts: list[str], top: int, block: int = 256) -> list[tuple[float, int, int]]:
    """The `top` pairs i < j of distinct texts with the highest cosine (rows of `unit` are unit
    vectors), found block by block so memory stays at block × lines."""
    import numpy as np

    ids = np.unique(np.array(texts, dtype=object), return_inverse=True)[1]
    best: list[tuple[float, int, int]] = []
    for start in range(0, len(texts), block):
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(start, start + len(sims))[:, None]
        sims[(np.arange(len(texts))[None, :] <= rows) | (ids[rows] == ids[None, :])] = -np.inf
        flat = np.argpartition(-sims, min(top, sims.size - 1), axis=None)[:top]
        best += [(float(sims.flat[f]), start + f // len(texts), f % len(texts)) for f in flat if np.isfinite(sims.flat[f])]
        best = sorted(best, key=lambda t: -t[0])[:top]
    return best


def write_vectors(path: str, rows: list[tuple[str, str]], vectors) -> None:
    """.npy: the [N, D] float32 array; .jsonl: {"line": N, "text", "vector"} per sentence."""
    import numpy as np

    from lmstack.io import atomic_path, atomic_write

    if path.lower().endswith(".npy"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors.astype(np.float32))
        return
    with atomic_write(path) as f:
        for (text, line), v in zip(rows, vectors):
            f.write(json.dumps({"line": line, "text": text, "vector": v.tolist()}, ensure_ascii=False) + "\n")

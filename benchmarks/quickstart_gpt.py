"""Try a variant of the quickstart's GPT recipe on the quickstart's own split and tokenizer, and
print the held-out bits per byte the quickstart's table would show for it.

    python -P benchmarks/quickstart_gpt.py [--steps 6500] [--set KEY=VALUE ...] [--work DIR]

`--set` overrides a key of `quickstart.RECIPES["gpt"]` (`lr=2e-3`, `block_size=256`) or of its
model (`model.pos=rope`, `model.n_layer=4`); values are read as JSON where they parse, else as
text. The split, the BPE tokenizer and the token shards are made once in --work and reused, so
several variants can run side by side (one training thread each, as in the quickstart). Prints
one JSON line: the recipe, seconds of training, parameters, bits per byte and the held-out
curve (validation loss in nats per token on random windows, the engine's `val_loss`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

# benchmarks/tokenizers.py would shadow Hugging Face's `tokenizers`.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import lmstack  # noqa: E402
from lmstack import quickstart as qs  # noqa: E402
from lmstack.training.config import TrainConfig  # noqa: E402


def parse_sets(items: list[str], fail) -> dict:
    """The quickstart's GPT recipe with the `--set` overrides; `fail(message)` on a malformed one
    (model keys are checked by GPTConfig when the run starts)."""
    recipe = copy.deepcopy(qs.RECIPES["gpt"])
    run_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in items:
        key, eq, text = item.partition("=")
        where, _, name = key.rpartition(".")
        if not eq or where not in ("", "model") or not name or (not where and name not in run_keys):
            fail(f"--set {item!r}: expected KEY=VALUE with KEY a TrainConfig field (lr, block_size, ...) or model.FIELD")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        (recipe[where] if where else recipe)[name] = value
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=qs.STEPS["gpt"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmstack-quickstart-gpt"))
    ap.add_argument("--name", default="variant", help="run directory under --work")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    qs.RECIPES["gpt"] = parse_sets(args.set, ap.error)
    shards = args.work / "shards"
    if not (shards / "tokenizer.json").is_file():  # the quickstart's split, tokenizer and shards
        args.work.mkdir(parents=True, exist_ok=True)
        files = qs.split_corpus(qs.shipped_corpus(), args.work)
        tok = qs.train_tokenizer(files, args.work / "tokenizer")
        qs.prepare_data(files, tok, args.work / "tokenizer", shards)
    start = time.perf_counter()
    ckpt = qs.train_neural("gpt", shards, args.work / args.name, args.steps, "cpu", args.seed)
    seconds = time.perf_counter() - start
    model, tokenizer = lmstack.load(ckpt)
    row = qs.evaluate({"GPT": (model.eval(), tokenizer)}, args.work / "heldout.txt")[0]
    metrics = [json.loads(line) for line in (args.work / args.name / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], round(m["val_loss"], 3)) for m in metrics if "val_loss" in m]
    print(
        json.dumps(
            dict(
                steps=args.steps,
                recipe=qs.RECIPES["gpt"],
                train_seconds=round(seconds),
                parameters=row["parameters"],
                bits_per_byte=round(row["bits_per_byte"], 4),
                val_loss=curve,
            )
        )
    )


if __name__ == "__main__":
    main()

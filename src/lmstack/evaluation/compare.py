"""Several models on the same text, one row each: the numbers that compare across tokenizers.

Bits per byte and perplexity per word divide the same total log-likelihood by quantities of
the text itself (its UTF-8 bytes, its words), not by the model's tokens, so an n-gram, an LSTM
and a GPT with different vocabularies land in one table. Each model is scored in its default
mode (see `perplexity.default_mode`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lmstack.errors import InputError
from lmstack.evaluation.perplexity import PROGRESS_UNITS, default_mode, measure
from lmstack.progress import progress

ModelSpec = str | os.PathLike | tuple  # a checkpoint path (or .arpa file), or (model, tokenizer)

COLUMNS = (  # (key, header, format)
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("bits_per_byte", "bits/byte", "{:.4f}"),
    ("perplexity_per_word", "ppl/word", "{:.2f}"),
    ("perplexity", "ppl/token", "{:.2f}"),
    ("tokens", "tokens", "{:,}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("parameters", "parameters", "{:,}"),
)


def _parameters(model) -> int:
    """Trainable numbers: weights for a neural model, stored probabilities and back-offs for an n-gram."""
    if hasattr(model, "num_params"):
        return int(model.num_params())
    tables = getattr(model, "tables", [])
    return sum(len(t.logp) + (0 if t.backoff is None else len(t.backoff)) for t in tables)


def compare(models: Sequence[ModelSpec], data, max_batch_tokens: int = 1 << 16, device: str = "cpu") -> list[dict]:
    """One dict per model (the `COLUMNS` and every perplexity field) on `data`: a text, or a list
    of file paths (each file one document). Models given as paths are loaded one at a time, onto
    `device`; (model, tokenizer) pairs are used where they are."""
    from lmstack.io import read_text
    from lmstack.models.checkpoint import load_for_text

    docs = [data] if isinstance(data, str) else [read_text(p) for p in data]
    if not docs or not any(d.strip() for d in docs):
        raise InputError("no text to compare the models on; pass a non-empty file or text")
    for m in models:  # a typo in the last path should not cost scoring the first models
        if not isinstance(m, tuple) and not Path(m).exists():
            raise InputError(f"{m}: no such checkpoint; check the path")
    rows = []
    for m in models:
        name = m[0].__class__.__name__ if isinstance(m, tuple) else str(m)
        model, tokenizer = m if isinstance(m, tuple) else load_for_text(m, device)
        with progress(desc=f"scoring {name}", unit=PROGRESS_UNITS[default_mode(model)]) as bar:
            res = measure(model, tokenizer, docs, max_batch_tokens=max_batch_tokens, progress_bar=bar)
        rows.append({"model": name, "family": getattr(model, "family", ""), "parameters": _parameters(model), **res.to_dict()})
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table. A masked LM shows its pseudo-perplexity per token (its
    mode column says "pseudo") and "-" for the figures it does not have."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        r = {**r, "perplexity": r.get("perplexity") or r.get("pseudo_perplexity")}
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for row in cells:
        # text columns left-aligned, numbers right-aligned
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)

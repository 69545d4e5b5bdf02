"""Batch makers, one per pretraining objective, each a pure function of (seed, step, slice).

A step's global batch is `rows_per_step` windows at random starts in the token shards, drawn
from a generator seeded with (seed, stream, step). Micro-batch `index` (= micro-step × world
size + rank) takes rows [index·B, (index+1)·B) of it, and any random corruption of those rows
(masking, span noise) is drawn from a generator seeded with (seed, stream, step, index). So:

- a run is reproducible from its seed, and resuming needs only the step as the data position;
- one process with gradient accumulation and N processes with the same global batch see the
  same rows, which is what makes their losses agree.

Kinds (what `make(step, index)` returns, torch int64 tensors):
- `clm`  causal LM: idx [B, T] and targets [B, T] (idx shifted by one);
- `mlm`  BERT masked LM: 15% of ordinary tokens chosen; of those 80% -> mask id, 10% -> a random
         ordinary token, 10% unchanged. idx [B, T], targets [B, T] (-100 where not chosen);
- `nsp`  BERT pairs for next-sentence prediction, masked as `mlm`: `cls A sep B sep`, B the true
         continuation of A half the time, else a random window; plus token_type [B, T] (0 for
         cls A sep, 1 for B sep) and next_label [B] (0: B follows A, 1: random, as BERT's head);
- `span` T5 span corruption: 15% of tokens in spans of mean length 3, each span replaced by a
         sentinel in the input; targets are every sentinel followed by its span, then the
         end-of-text id. Input and target lengths are fixed by T, so batches need no padding;
- `rtd`  ELECTRA replaced-token detection: the `mlm` batch plus original [B, T], the unmasked
         ids the discriminator is scored against, and sample_seed for the generator's sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmstack.data.shards import TokenShards
from lmstack.errors import InputError
from lmstack.tokenizers import EOT, MASK, PAD, Tokenizer

CLS = "<|cls|>"
SEP = "<|sep|>"
KINDS = ("clm", "mlm", "nsp", "span", "rtd")
TRAIN_STREAM, VAL_STREAM = 0, 1


def sentinel(i: int) -> str:
    return f"<|extra_id_{i}|>"


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a window of `length`, as T5 computes them."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    return num_noise, min(num_spans, length - num_noise)


def required_specials(kind: str, block_size: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[str, ...]:
    """Special tokens the objective writes into batches; training adds any the tokenizer lacks."""
    if kind in ("mlm", "rtd"):
        return (EOT, MASK)
    if kind == "nsp":
        return (EOT, MASK, CLS, SEP)
    if kind == "span":
        _, spans = span_counts(block_size, noise_density, mean_span)
        return (EOT, PAD) + tuple(sentinel(i) for i in range(spans))
    return (EOT,)


@dataclass
class BatchMaker:
    shards: TokenShards
    tokenizer: Tokenizer
    kind: str
    block_size: int
    rows_per_step: int  # the global batch, in sequences
    batch_size: int  # rows per micro-batch
    seed: int = 0
    stream: int = TRAIN_STREAM
    mlm_probability: float = 0.15
    noise_density: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown objective {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.rows_per_step % self.batch_size:
            raise InputError(f"the global batch ({self.rows_per_step} rows) is not a multiple of --batch-size {self.batch_size}")
        missing = [
            s
            for s in required_specials(self.kind, self.block_size, self.noise_density, self.mean_span)
            if s not in self.tokenizer.special_tokens
        ]
        if missing:
            raise InputError(
                f"the {self.kind} objective needs special tokens {missing} that the tokenizer lacks; "
                "add them with Tokenizer.add_special_tokens (lmstack train does this itself)"
            )
        self.special_ids = np.array(sorted(self.tokenizer.special_tokens.values()), dtype=np.int64)
        self.n_ordinary = self.tokenizer.base_vocab_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.rows_per_step // self.batch_size

    def make(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `index` of global batch `step`."""
        if not 0 <= index < self.micro_batches_per_step:
            raise ValueError(f"micro-batch index {index} outside 0..{self.micro_batches_per_step - 1}")
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        starts_rng = np.random.default_rng([self.seed, self.stream, step])
        rng = np.random.default_rng([self.seed, self.stream, step, index])
        window = self.block_size + 1 if self.kind == "clm" else self.block_size
        w = self.shards.sample_windows(starts_rng, self.rows_per_step, window, rows)
        batch = getattr(self, f"_{self.kind}")(w, rng, starts_rng)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    # --- one method per objective ----------------------------------------------------------

    def _clm(self, w, rng, _):
        return {"idx": w[:, :-1], "targets": w[:, 1:]}

    def _mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's 80/10/10 corruption of `mlm_probability` of the ordinary tokens."""
        chosen = (rng.random(ids.shape) < self.mlm_probability) & ~np.isin(ids, self.special_ids)
        targets = np.where(chosen, ids, -100)
        action = rng.random(ids.shape)
        random_ids = rng.integers(0, self.n_ordinary, size=ids.shape)
        out = np.where(chosen & (action < 0.8), self.tokenizer.special_tokens[MASK], ids)
        out = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
        return out, targets

    def _mlm(self, w, rng, _):
        idx, targets = self._mask(w, rng)
        return {"idx": idx, "targets": targets}

    def _rtd(self, w, rng, _):
        idx, targets = self._mask(w, rng)
        return {"idx": idx, "targets": targets, "original": w, "sample_seed": rng.integers(0, 2**62, size=())}

    def _nsp(self, w, rng, starts_rng):
        B, T = w.shape
        cls, sep = self.tokenizer.special_tokens[CLS], self.tokenizer.special_tokens[SEP]
        body = T - 3
        len_a = rng.integers(1, body, size=B)
        is_next = rng.random(B) < 0.5
        # Random second segments come from other windows of the same (seeded) step.
        others = self.shards.sample_windows(rng, B, T)
        idx = np.empty((B, T), dtype=np.int64)
        token_type = np.zeros((B, T), dtype=np.int64)
        for r in range(B):
            a = len_a[r]
            seg_b = w[r, a : a + body - a] if is_next[r] else others[r, : body - a]
            idx[r] = np.concatenate([[cls], w[r, :a], [sep], seg_b, [sep]])
            token_type[r, a + 2 :] = 1
        idx, targets = self._mask(idx, rng)
        return {"idx": idx, "targets": targets, "token_type": token_type, "next_label": (~is_next).astype(np.int64)}

    def _span(self, w, rng, _):
        B, T = w.shape
        num_noise, num_spans = span_counts(T, self.noise_density, self.mean_span)
        eot = self.tokenizer.special_tokens[EOT]
        sentinels = [self.tokenizer.special_tokens[sentinel(i)] for i in range(num_spans)]
        inputs, targets = [], []
        for r in range(B):
            noise = _noise_mask(rng, T, num_noise, num_spans)
            starts = noise & ~np.r_[False, noise[:-1]]
            span_id = np.cumsum(starts) - 1  # which span each noise token is in
            inp = [sentinels[span_id[t]] if starts[t] else w[r, t] for t in range(T) if starts[t] or not noise[t]]
            tgt = []
            for t in range(T):
                if starts[t]:
                    tgt.append(sentinels[span_id[t]])
                if noise[t]:
                    tgt.append(w[r, t])
            inputs.append(inp)
            targets.append(tgt + [eot])
        return {"idx": np.array(inputs, dtype=np.int64), "targets": np.array(targets, dtype=np.int64)}


def _segment(rng: np.random.Generator, n: int, parts: int) -> np.ndarray:
    """n items split into `parts` non-empty runs, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n]]))


def _noise_mask(rng: np.random.Generator, length: int, num_noise: int, num_spans: int) -> np.ndarray:
    """T5's random_spans_noise_mask: alternate clean and noise runs, starting clean."""
    noise_lens = _segment(rng, num_noise, num_spans)
    clean_lens = _segment(rng, length - num_noise, num_spans)
    runs = np.stack([clean_lens, noise_lens], axis=1).ravel()
    return np.repeat(np.tile([False, True], num_spans), runs)

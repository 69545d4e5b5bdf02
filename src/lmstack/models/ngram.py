"""Back-off n-gram language models: counting, Kneser-Ney / add-k smoothing, scoring, ARPA files.

Training reproduces KenLM's `lmplz` (interpolated modified Kneser-Ney, three discounts per order
from counts-of-counts; see shared/fixtures/kenlm/ALGORITHM.md): an ARPA file written here
matches lmplz's entry by entry, and an ARPA file read here scores exactly as KenLM's `query`.

Every n-gram of order n is stored as one int64 key, (index of its (n-1)-word prefix in the
order n-1 table) * V + (id of its last word), in a sorted array per order; the unigram table
is the vocabulary itself. So counting is one sort of packed keys per order, and looking up
the n-grams ending at every position of a batch is one `np.searchsorted` per order. No Python
dict per n-gram anywhere.

One deliberate difference from lmplz and query: a last line without a trailing newline is
still a sentence with its `</s>` (KenLM drops that `</s>` when training and the whole line's
score when querying).

Vocabulary ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, then the words. `<s>` is only ever context, so
the next-token distribution gives it probability 0 and sums to 1 over the other ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import CheckpointError, FormatError, InputError
from lmstack.io import check_readable, iter_text_chunks, write_json
from lmstack.models.arpa import BOS, EOS, UNK, read_arpa, write_arpa
from lmstack.models.base import LanguageModel, padding_mask
from lmstack.models.checkpoint import CONFIG_FILE, TOKENIZER_FILE, read_family_config
from lmstack.progress import progress

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
ARPA_FILE = "model.arpa"
SMOOTHINGS = ("modified_kneser_ney", "kneser_ney", "add_k")
BOUNDARIES = ("line", "file")
LN10 = float(np.log(10.0))
# KenLM's query splits words on ASCII 9-13 and space (lmplz, training, only on tab, CR, space).
_QUERY_SPACES = str.maketrans("\t\n\v\f\r", "     ")
# lmplz's substitute discounts (D1, D2, D3+) under --discount_fallback.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


@dataclass
class NGramConfig:
    order: int
    smoothing: str = "modified_kneser_ney"
    #: pseudo-count for add_k smoothing
    k: float = 1.0
    discount_fallback: bool = False
    #: where <s> ... </s> go: around each line, or around each whole file
    boundary: str = "line"
    #: discounts per order (D1, D2, D3+) as estimated; filled in by training
    discounts: list = field(default_factory=list)
    train_tokens: int = 0
    vocab_size: int = 0

    def __post_init__(self):
        if not isinstance(self.order, int) or self.order < 1:
            raise InputError(f"--order {self.order}: an n-gram order must be an integer >= 1 (e.g. 3 or 5)")
        if self.smoothing not in SMOOTHINGS + ("arpa",):
            raise InputError(f"unknown smoothing {self.smoothing!r}; choose one of {', '.join(SMOOTHINGS)}")
        if self.boundary not in BOUNDARIES:
            raise InputError(f"unknown boundary {self.boundary!r}; choose 'line' or 'file'")
        if self.smoothing == "add_k" and not self.k > 0:
            raise InputError(f"--k {self.k}: add-k smoothing needs k > 0 (e.g. 1 or 0.1)")


@dataclass
class _Table:
    """One order: sorted keys (prefix index * V + last word), log10 p, log10 back-off (None on top)."""

    keys: np.ndarray
    logp: np.ndarray
    backoff: np.ndarray | None


# ----------------------------------------------------------------------------------------------
# Reading a corpus into one id stream: <s> w w w </s> <s> w w </s> ...


class Corpus:
    """The training text as one int32 stream of ids, sentences delimited by <s> ... </s>."""

    # While reading, id 0 marks an empty split, 1 a line break and 2 a reserved word; words
    # get their final ids (3 and up) straight away.
    _EMPTY, _BREAK, _RESERVED = 0, 1, 2

    def __init__(self, tokenizer=None, boundary: str = "line"):
        self.tokenizer = tokenizer
        self.boundary = boundary
        self.word_ids: dict[str, int] = {"": 0, "\n": 1, UNK: 2, BOS: 2, EOS: 2}
        self.parts: list[np.ndarray] = []
        self.n_words = 0

    def add_file(self, path: str | os.PathLike) -> None:
        p = check_readable(path)
        per_line = self.boundary == "line"
        ends_with_newline = True
        self.parts.append(np.array([BOS_ID], dtype=np.int32))
        with progress(total=p.stat().st_size, desc=f"reading {p.name}", unit="B", unit_scale=True) as bar:
            for chunk in iter_text_chunks(p):
                ids = self._chunk_ids(chunk, per_line)
                if (ids == self._RESERVED).any():
                    raise InputError(
                        f"{p}: the corpus contains the word <unk>, <s> or </s>, which lmstack reserves "
                        "for the model; remove or rename it (e.g. sed 's/<s>/< s>/g')"
                    )
                ids = ids[ids != self._EMPTY]
                if per_line:
                    breaks = np.flatnonzero(ids == self._BREAK)
                    ids[breaks] = EOS_ID
                    ids = np.insert(ids, breaks + 1, BOS_ID)
                self.n_words += int(np.count_nonzero(ids > EOS_ID))
                self.parts.append(ids)
                ends_with_newline = chunk.endswith("\n")
                bar.update(len(chunk.encode("utf-8")))
        if per_line and ends_with_newline:
            self.parts[-1] = self.parts[-1][:-1]  # the <s> after the final line break
        else:
            self.parts.append(np.array([EOS_ID], dtype=np.int32))

    def _chunk_ids(self, text: str, per_line: bool) -> np.ndarray:
        d = self.word_ids
        if self.tokenizer is not None:
            pieces = text.split("\n") if per_line else [text]
            out: list[int] = []
            for i, piece in enumerate(pieces):
                out.extend(d.setdefault(str(t), len(d) - 2) for t in self.tokenizer.encode(piece))
                if i < len(pieces) - 1:
                    out.append(self._BREAK)
            return np.asarray(out, dtype=np.int32)
        text = text.replace("\t", " ").replace("\r", " ")
        text = text.replace("\n", " \n ") if per_line else text.replace("\n", " ")
        words = text.split(" ")
        return np.fromiter((d.setdefault(w, len(d) - 2) for w in words), dtype=np.int32, count=len(words))

    def finish(self) -> tuple[list[str], np.ndarray]:
        """(vocabulary <unk>, <s>, </s>, words..., id stream)."""
        if self.n_words == 0:
            raise InputError("the corpus has no words (empty or whitespace only); pass some text to train on")
        stream = np.concatenate(self.parts)
        self.parts = []
        return [UNK, BOS, EOS] + list(self.word_ids)[5:], stream


# ----------------------------------------------------------------------------------------------
# Counting and smoothing


@dataclass
class _Counts:
    """Raw counts of one order with the links Kneser-Ney needs (int32: < 2^31 tokens)."""

    keys: np.ndarray  # sorted int64, prefix * V + last word
    count: np.ndarray  # raw count
    suffix: np.ndarray  # index of the (n-1)-gram w2..wn in the order n-1 table
    bos_first: np.ndarray  # bool: the n-gram starts with <s>


def count_ngrams(stream: np.ndarray, V: int, order: int) -> list[_Counts]:
    """Counts of every n-gram of orders 1..order that lies inside one sentence of `stream`.

    Per order: pack (index of the prefix n-gram at position i, word at i+n-1) into an int64,
    group equal keys, and keep each position's n-gram index for the next order."""
    T = len(stream)
    if T >= 2**31:
        raise InputError(f"the corpus has {T} tokens; lmstack counts up to 2^31 - 1, so split it")
    # eos_before[i] = number of </s> in stream[:i]; a window may hold </s> only at its end
    eos_before = np.zeros(T + 1, np.int32)
    np.cumsum(stream == EOS_ID, out=eos_before[1:])
    ids = np.arange(V, dtype=np.int64)
    out = [
        _Counts(
            keys=ids,
            count=np.bincount(stream, minlength=V).astype(np.int32),
            suffix=np.zeros(V, np.int32),
            bos_first=ids == BOS_ID,
        )
    ]
    at = stream  # index of the (n-1)-gram starting at each position, -1 if none
    for n in range(2, order + 1):
        L = max(T - n + 1, 0)
        pos = np.flatnonzero(eos_before[n - 1 : n - 1 + L] == eos_before[:L])
        keys = at[pos].astype(np.int64) * V + stream[pos + n - 1]
        uniq, inverse, cnt = _group(keys)
        del keys
        suffix = np.empty(len(uniq), np.int32)
        suffix[inverse] = at[pos + 1]
        at = np.full(T, -1, np.int32)
        at[pos] = inverse
        del pos, inverse
        out.append(_Counts(keys=uniq, count=cnt.astype(np.int32), suffix=suffix, bos_first=out[-1].bos_first[uniq // V]))
    return out


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`np.unique(keys, return_inverse=True, return_counts=True)`, several times faster when
    each key and its position fit in 63 bits together: one plain (SIMD) sort of
    key << bits | position then replaces np.unique's argsort, gather and scatter."""
    n = len(keys)
    pos_bits = max(n - 1, 1).bit_length()
    if n == 0 or int(keys.max()).bit_length() + pos_bits > 63:
        return np.unique(keys, return_inverse=True, return_counts=True)
    packed = (keys << pos_bits) | np.arange(n, dtype=np.int64)
    packed.sort()
    sorted_keys = packed >> pos_bits
    packed &= (1 << pos_bits) - 1  # now the original position of each sorted key
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    inverse = np.empty(n, np.int64)
    inverse[packed] = np.cumsum(first) - 1
    return sorted_keys[starts], inverse, np.diff(np.append(starts, n))


def _discounts(a: np.ndarray, n: int, smoothing: str, fallback: bool) -> tuple[float, float, float]:
    """(D1, D2, D3+) from counts-of-counts of adjusted counts `a`, in float32 as lmplz does."""
    nk = [int(np.count_nonzero(a == k)) for k in range(1, 5)]
    f = np.float32
    if smoothing == "kneser_ney":
        ok = nk[0] > 0
        d = f(nk[0]) / f(nk[0] + 2 * nk[1]) if ok else f(0)
        ds = (float(d),) * 3
    else:
        ok = all(nk[:3])
        y = f(nk[0]) / f(nk[0] + 2 * nk[1]) if ok else f(0)
        ds = tuple(float(f(k) - f(k + 1) * y * f(nk[k]) / f(nk[k - 1])) if ok else 0.0 for k in (1, 2, 3))
        ok = ok and all(0 <= d <= k for k, d in zip((1, 2, 3), ds))
    if ok:
        return ds
    if fallback:
        return (0.5,) * 3 if smoothing == "kneser_ney" else FALLBACK_DISCOUNTS
    raise InputError(
        f"cannot estimate Kneser-Ney discounts for the {n}-grams (counts of counts 1..4: {nk}): the "
        "corpus is too small or too repetitive; pass --discount-fallback to use 0.5 1 1.5 as lmplz "
        "does, lower --order, or use --smoothing add_k"
    )


def _kneser_ney(counts: list[_Counts], V: int, cfg: NGramConfig) -> tuple[list[_Table], list]:
    """Interpolated (modified) Kneser-Ney as lmplz computes it; returns tables and discounts."""
    N = len(counts)
    tables: list[_Table] = []
    discounts = []
    prob_lower = None
    for n, c in enumerate(counts, 1):
        # Adjusted counts: raw on the top order and for n-grams starting with <s>; otherwise
        # the number of distinct words seen before the n-gram.
        if n == N:
            a = c.count.astype(np.int64)
        else:
            a = np.bincount(counts[n].suffix, minlength=len(c.keys))
            a = np.where(c.bos_first, c.count, a)
        if n == 1:
            a[[UNK_ID, BOS_ID]] = 0
        d = _discounts(a, n, cfg.smoothing, cfg.discount_fallback)
        discounts.append(list(d))
        disc = np.choose(np.minimum(a, 3), (0.0,) + d)
        n_ctx = 1 if n == 1 else len(counts[n - 2].keys)
        ctx = np.zeros(len(a), np.int64) if n == 1 else c.keys // V
        denom = np.bincount(ctx, weights=a, minlength=n_ctx)
        mass = np.bincount(ctx, weights=disc, minlength=n_ctx)
        safe = np.where(denom > 0, denom, 1.0)
        gamma = mass / safe
        u = (a - disc) / safe[ctx]
        if n == 1:
            prob = u + gamma[0] / (V - 1)
            prob[BOS_ID] = 1.0
        else:
            prob = u + gamma[ctx] * prob_lower[c.suffix]
            tables[-1].backoff = np.log10(np.where(denom > 0, gamma, 1.0))
        tables.append(_Table(keys=c.keys, logp=np.log10(np.minimum(prob, 1.0)), backoff=None))
        prob_lower = prob
    return tables, discounts


def _add_k(counts: list[_Counts], V: int, k: float) -> list[_Table]:
    """Add-k on raw counts per seen context; the k-mass of unseen words goes to the shorter
    context through the back-off weight, so the model is a normalised ARPA model."""
    tables: list[_Table] = []
    prob_lower = None
    for n, c in enumerate(counts, 1):
        cnt = c.count.astype(np.float64)
        if n == 1:
            cnt[BOS_ID] = 0.0
            prob = (cnt + k) / (cnt.sum() + k * (V - 1))
            prob[BOS_ID] = 1.0
        else:
            n_ctx = len(counts[n - 2].keys)
            ctx = c.keys // V
            total = np.bincount(ctx, weights=cnt, minlength=n_ctx)
            seen = np.bincount(ctx, minlength=n_ctx)
            prob = (cnt + k) / (total[ctx] + k * (V - 1))
            left_here = k * (V - 1 - seen) / (total + k * (V - 1))
            left_lower = 1.0 - np.bincount(ctx, weights=prob_lower[c.suffix], minlength=n_ctx)
            has_gap = (seen > 0) & (left_here > 0)
            bo = np.where(has_gap, left_here / np.where(has_gap, np.maximum(left_lower, 1e-300), 1.0), 1.0)
            tables[-1].backoff = np.log10(bo)
        tables.append(_Table(keys=c.keys, logp=np.log10(prob), backoff=None))
        prob_lower = prob
    return tables


class _CharSpeller:
    """p(word) = prod p(char) * p(end): a character unigram over word types with Witten-Bell
    escape (probability of a new character) to uniform UTF-8 bytes."""

    def __init__(self, words: list[str]):
        counts: dict[str, int] = {}
        for w in words:
            for ch in w:
                counts[ch] = counts.get(ch, 0) + 1
        distinct = len(counts) + 1  # the characters and the end mark
        total = sum(counts.values()) + len(words) + distinct
        self._log10 = {ch: float(np.log10(c / total)) for ch, c in counts.items()}
        self._end = float(np.log10(max(len(words), 1) / total))
        self._escape = float(np.log10(distinct / total))

    def log10(self, word: str) -> float:
        byte = -float(np.log10(256))  # an unseen character: the escape, then its bytes uniformly
        return self._end + sum(self._log10.get(ch, self._escape + byte * len(ch.encode("utf-8"))) for ch in word)


# ----------------------------------------------------------------------------------------------
# The model


class NGramLM(LanguageModel):
    """A back-off n-gram model on the LanguageModel contract (natural-log outputs)."""

    family = "ngram"
    max_context = None
    unk_id, bos_id, eos_id = UNK_ID, BOS_ID, EOS_ID

    def __init__(self, vocab: list[str], tables: list[_Table], config: NGramConfig, tokenizer=None):
        self.vocab = list(vocab)
        self.word_ids = {w: i for i, w in enumerate(self.vocab)}
        # a literal <s> or </s> inside a line is just an unknown word there
        self._text_ids = {w: i for w, i in self.word_ids.items() if i not in (BOS_ID, EOS_ID)}
        self.tables = tables
        self.config = config
        self.order = len(tables)
        self.vocab_size = len(self.vocab)
        self.tokenizer = tokenizer
        self._speller = None  # fitted on first use by oov_spelling_log10

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        files: Iterable[str | os.PathLike],
        order: int = 3,
        smoothing: str = "modified_kneser_ney",
        k: float = 1.0,
        discount_fallback: bool = False,
        boundary: str = "line",
        tokenizer=None,
    ) -> "NGramLM":
        """Count n-grams over text files and smooth them (see NGramConfig for the options)."""
        cfg = NGramConfig(order=order, smoothing=smoothing, k=k, discount_fallback=discount_fallback, boundary=boundary)
        corpus = Corpus(tokenizer=tokenizer, boundary=boundary)
        files = list(files)
        if not files:
            raise InputError("no training files given; pass at least one text file")
        for f in files:
            corpus.add_file(f)
        vocab, stream = corpus.finish()
        return cls.from_stream(vocab, stream, cfg, tokenizer)

    @classmethod
    def train_texts(cls, lines: Iterable[str], order: int = 3, **opts) -> "NGramLM":
        """Train on in-memory lines (one sentence each); for tests and notebooks."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "corpus.txt"
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            return cls.train([path], order=order, **opts)

    @classmethod
    def from_stream(cls, vocab: list[str], stream: np.ndarray, cfg: NGramConfig, tokenizer=None) -> "NGramLM":
        V = len(vocab)
        counts = count_ngrams(stream, V, cfg.order)
        if cfg.smoothing == "add_k":
            tables = _add_k(counts, V, cfg.k)
        else:
            tables, cfg.discounts = _kneser_ney(counts, V, cfg)
        cfg.train_tokens = int(np.count_nonzero(stream != BOS_ID))
        cfg.vocab_size = V
        return cls(vocab, tables, cfg, tokenizer)

    @classmethod
    def from_arpa(cls, path: str | os.PathLike) -> "NGramLM":
        """Load an ARPA file (KenLM, SRILM, ...); it scores exactly as the file says.

        An n-gram whose prefix is not listed (some pruned files) gets that prefix as a "blank"
        entry, as KenLM's trie loader does (its default probing loader refuses such files):
        back-off 0 and the probability the back-off rule gives it, so scores are unchanged and
        every n-gram's prefix can be looked up."""
        words, sections = read_arpa(path)
        # Renumber so that <unk>, <s>, </s> are ids 0, 1, 2 (KenLM also accepts <UNK>).
        words = [UNK if w == "<UNK>" else w for w in words]
        vocab = [UNK, BOS, EOS] + [w for w in words if w not in (UNK, BOS, EOS)]
        V = len(vocab)
        word_ids = {w: i for i, w in enumerate(vocab)}
        remap = np.array([word_ids[w] for w in words], dtype=np.int64)
        first = sections[0]
        logp1 = np.full(V, -100.0)  # a missing <unk> gets log10 p = -100, as build_binary -u
        logp1[BOS_ID] = 0.0
        logp1[remap] = first.logp
        bo1 = np.zeros(V)
        if first.backoff is not None:
            bo1[remap] = first.backoff
        tables = [_Table(keys=np.arange(V, dtype=np.int64), logp=logp1, backoff=bo1 if len(sections) > 1 else None)]
        ids = [remap[sec.ids] for sec in sections]
        logps = [sec.logp for sec in sections]
        backoffs = [sec.backoff for sec in sections]
        lines = [sec.lines for sec in sections]
        n = 2
        while n <= len(sections):
            prefix = ids[n - 1][:, 0]
            for j in range(1, n - 1):
                prefix = _lookup(tables[j], prefix, ids[n - 1][:, j], V)
            missing = prefix < 0
            if missing.any():  # add the absent prefixes to order n-1 as blanks, rebuild from there
                rows = np.unique(ids[n - 1][missing, :-1], axis=0)
                ids[n - 2] = np.concatenate([ids[n - 2], rows])
                logps[n - 2] = np.concatenate([logps[n - 2], np.full(len(rows), np.nan)])
                backoffs[n - 2] = np.concatenate([backoffs[n - 2], np.zeros(len(rows))])
                lines[n - 2] = np.concatenate([lines[n - 2], np.zeros(len(rows), np.int64)])
                del tables[n - 2 :]
                n -= 1
                continue
            keys = prefix * V + ids[n - 1][:, -1]
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            dup = np.flatnonzero(keys[1:] == keys[:-1])
            if len(dup):
                raise FormatError(
                    f"{path}:{lines[n - 1][order[dup[0] + 1]]}: duplicate {n}-gram; is this an ARPA language model file?"
                )
            tables.append(
                _Table(keys=keys, logp=logps[n - 1][order], backoff=None if backoffs[n - 1] is None else backoffs[n - 1][order])
            )
            n += 1
        cfg = NGramConfig(order=len(tables), smoothing="arpa", vocab_size=V)
        model = cls(vocab, tables, cfg)
        for n, t in enumerate(tables[1:], 2):  # blanks, lower orders first
            blank = np.flatnonzero(np.isnan(t.logp))
            if len(blank):
                words_of = model.ngram_ids(n, blank)
                # log p(w_n | w_1..w_n-1) = back-off(w_1..w_n-1) + log p(w_n | w_2..w_n-1)
                shorter = model._score10(words_of[:, 1:])[:, -1] if n > 2 else tables[0].logp[words_of[:, 1]]
                t.logp[blank] = tables[n - 2].backoff[t.keys[blank] // V] + shorter
        return model

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint dir: model.arpa, config.json and (subword models) tokenizer.json."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise InputError(f"{p}: exists and is not a directory; choose another --out")
        p.mkdir(parents=True, exist_ok=True)
        self.write_arpa(p / ARPA_FILE)
        if self.tokenizer is not None:
            self.tokenizer.save(p / TOKENIZER_FILE)
        write_json(p / CONFIG_FILE, {"family": self.family, **asdict(self.config)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NGramLM":
        """A checkpoint directory (config.json + model.arpa [+ tokenizer.json]) or a bare .arpa file."""
        p = Path(path)
        if p.is_file():
            return cls.from_arpa(p)
        cfg = read_family_config(p, cls.family, NGramConfig)
        if not (p / ARPA_FILE).exists():
            raise CheckpointError(f"{p}: missing {ARPA_FILE}; retrain with `lmstack ngram train`")
        model = cls.from_arpa(p / ARPA_FILE)
        if cfg.order != model.order:
            raise CheckpointError(f"{p / CONFIG_FILE}: says order {cfg.order} but {ARPA_FILE} has order {model.order}")
        model.config = cfg
        if (p / TOKENIZER_FILE).exists():
            from lmstack.tokenizers import load_tokenizer

            model.tokenizer = load_tokenizer(p / TOKENIZER_FILE)
        return model

    def ngram_ids(self, n: int, index: np.ndarray) -> np.ndarray:
        """Word ids [len(index), n] of the order-n entries at `index`, following prefix links."""
        V = self.vocab_size
        ids = np.empty((len(index), n), np.int64)
        cur = np.asarray(index, np.int64)
        for j in range(n - 1, 0, -1):
            keys = self.tables[j].keys[cur]
            ids[:, j], cur = keys % V, keys // V
        ids[:, 0] = cur
        return ids

    def ngram_texts(self, n: int, lo: int = 0, hi: int | None = None) -> list[str]:
        """The space-joined words of order-n entries lo..hi, in table order."""
        hi = len(self.tables[n - 1].keys) if hi is None else hi
        words = np.array(self.vocab, dtype=object)
        ids = self.ngram_ids(n, np.arange(lo, hi))
        # column by column: tolist() on a 2-D object array is several times slower
        return list(map(" ".join, zip(*(words[ids[:, j]].tolist() for j in range(n)))))

    def write_arpa(self, path: str | os.PathLike, block: int = 1 << 20) -> None:
        """Write the model as an ARPA file, a block of entries at a time to bound memory."""

        def blocks():
            for n, t in enumerate(self.tables, 1):
                for lo in range(0, len(t.keys), block):
                    hi = min(lo + block, len(t.keys))
                    yield n, self.ngram_texts(n, lo, hi), t.logp[lo:hi], None if t.backoff is None else t.backoff[lo:hi]

        write_arpa(path, [len(t.keys) for t in self.tables], blocks())

    # --- text -> ids --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Model ids of one line of text (no <s>/</s>); unknown words or tokens become <unk>."""
        get = self._text_ids.get
        return [get(w, UNK_ID) for w in self._pieces(text)]

    def oov_spelling_log10(self, text: str) -> float:
        """log10 probability of spelling out, character by character, the out-of-vocabulary
        words (or tokens) of one line: what the model must add to p(<unk>) to give a probability
        to the actual text rather than to "some unknown word". Bits per byte counts it, so a
        closed vocabulary is not cheaper than spelling; KenLM's perplexity does not.

        The speller is fitted on the vocabulary's own spellings (each type once, with an
        end-of-word mark; Witten-Bell escape to uniform bytes for unseen characters), so it
        is a proper distribution over all strings."""
        oovs = [piece for piece in self._pieces(text) if piece not in self._text_ids]
        if not oovs:
            return 0.0
        if self._speller is None:
            self._speller = _CharSpeller([self._piece_text(w) for w in self._text_ids if w != UNK])
        return sum(self._speller.log10(self._piece_text(w)) for w in oovs)

    def _pieces(self, text: str) -> list[str]:
        if self.tokenizer is not None:
            return [str(t) for t in self.tokenizer.encode(text)]
        return [w for w in text.translate(_QUERY_SPACES).split(" ") if w]

    def _piece_text(self, piece: str) -> str:
        return piece if self.tokenizer is None else self.tokenizer.decode([int(piece)])

    def score(self, text: str, bos: bool = True, eos: bool = True) -> float:
        """log10 p of one sentence, as `kenlm.Model.score`: from <s> (or from no context with
        bos=False), with </s> scored at the end unless eos=False."""
        row = [BOS_ID if bos else -1, *self.encode(text), *([EOS_ID] if eos else [])]
        return float(self._score10(np.asarray([row], np.int64)).sum())

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (BOS_ID, EOS_ID)]
        if self.tokenizer is not None:
            return self.tokenizer.decode([int(self.vocab[i]) for i in ids if i != UNK_ID])
        return " ".join(self.vocab[i] for i in ids)

    def text_tokenizer(self) -> "NGramVocab":
        """This model's own vocabulary as a tokenizer, for the layers that take (model, tokenizer):
        generation, `lmstack score`, benchmark tasks. (A subword n-gram's tokenizer.json maps
        text to the tokenizer's ids, not to this model's.)"""
        return NGramVocab(self)

    # --- scoring ------------------------------------------------------------------------------
    def _ids(self, tokens: torch.Tensor) -> np.ndarray:
        ids = tokens.cpu().numpy().astype(np.int64)
        if ids.ndim != 2:
            raise InputError(f"expected a [batch, time] tensor of token ids, got shape {tuple(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        return ids

    def _positions(self, tokens: np.ndarray) -> list[np.ndarray]:
        """at[n-1][b, t] = table index of the n-gram tokens[b, t-n+1 .. t], or -1 if absent."""
        V = self.vocab_size
        at = [np.where((tokens >= 0) & (tokens < V), tokens, -1).astype(np.int64)]
        for n in range(2, self.order + 1):
            cur = np.full(tokens.shape, -1, np.int64)
            if tokens.shape[1] >= n:
                cur[:, n - 1 :] = _lookup(self.tables[n - 1], at[-1][:, :-1][:, n - 2 :], at[0][:, n - 1 :], V)
            at.append(cur)
        return at

    def _score10(self, tokens: np.ndarray) -> np.ndarray:
        """[B, T] ids -> [B, T-1] log10 p(x_t | x_<t) by standard ARPA back-off."""
        at = self._positions(tokens)
        target = tokens[:, 1:]
        out = np.zeros(target.shape)
        done = np.zeros(target.shape, bool)
        acc = np.zeros(target.shape)  # back-offs of the contexts longer than the match so far
        for n in range(self.order, 0, -1):
            idx = at[n - 1][:, 1:]
            hit = ~done & (idx >= 0)
            out[hit] = self.tables[n - 1].logp[idx[hit]] + acc[hit]
            done |= hit
            if n > 1:
                ctx = at[n - 2][:, :-1]
                has = ~done & (ctx >= 0)
                acc[has] += self.tables[n - 2].backoff[ctx[has]]
        out[target == BOS_ID] = -np.inf
        return out

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T-1] natural-log p of each observed token, without a dense [V] row."""
        return torch.from_numpy(self._score10(self._ids(tokens)) * LN10)

    def _dense10(self, contexts: np.ndarray) -> np.ndarray:
        """[R, L] contexts (left-padded with -1) -> [R, V] log10 next-token distributions."""
        R, L = contexts.shape
        V = self.vocab_size
        at = self._positions(contexts)
        out = np.empty((R, V))
        uni = self.tables[0]
        for r in range(R):
            # ctx[k] = index of the last k context words in table k (k = 1..N-1), or -1
            ctx = [at[k - 1][r, -1] if L >= k else -1 for k in range(1, self.order)]
            bo = [self.tables[k - 1].backoff[c] if c >= 0 else 0.0 for k, c in enumerate(ctx, 1)]
            tail = np.concatenate([np.cumsum(bo[::-1])[::-1], [0.0]])  # tail[k-1] = sum of bo[k-1:]
            row = out[r]
            row[:] = uni.logp + tail[0]
            for k, c in enumerate(ctx, 1):
                if c < 0:
                    continue
                t = self.tables[k]
                lo, hi = np.searchsorted(t.keys, [c * V, (c + 1) * V])
                row[t.keys[lo:hi] % V] = t.logp[lo:hi] + tail[k]
        out[:, BOS_ID] = -np.inf
        return out

    def next_token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, V]: the full next-token distribution after every prefix."""
        tok = self._ids(tokens)
        B, T = tok.shape
        h = self.order - 1
        # row (b, t) holds the h tokens ending at t, left-padded with -1
        padded = np.concatenate([np.full((B, h), -1, np.int64), tok], axis=1)
        windows = np.stack([padded[:, t + 1 : t + 1 + h] for t in range(T)], axis=1).reshape(B * T, h)
        return torch.from_numpy(self._dense10(windows) * LN10).reshape(B, T, self.vocab_size)

    def start(self, prompt: torch.Tensor, lengths: torch.Tensor | None = None):
        """State: the last order-1 tokens of each row ([B, order-1], -1 where there are none)."""
        pad = padding_mask(prompt, lengths)
        tok = self._ids(prompt if pad is None else prompt.masked_fill(pad, 0))
        if pad is not None:
            tok[pad.cpu().numpy()] = -1
        h = self.order - 1
        state = np.full((tok.shape[0], h), -1, np.int64)
        keep = min(h, tok.shape[1])
        if keep:
            state[:, h - keep :] = tok[:, tok.shape[1] - keep :]
        return state, torch.from_numpy(self._dense10(state) * LN10)

    def step(self, state, tokens: torch.Tensor):
        tok = self._ids(tokens.reshape(-1, 1))
        state = np.concatenate([state, tok], axis=1)[:, 1:]
        return state, torch.from_numpy(self._dense10(state) * LN10)

    def reorder(self, state, index: torch.Tensor):
        return state[index.cpu().numpy()]


class NGramVocab:
    """Tokenizer-like view of an n-gram's vocabulary: `encode` a line to model ids, `decode` ids
    to text, `</s>` as end-of-text (generation stops there) and `<s>` as the start of every
    prompt: the model was counted on lines that begin with it, so a prompt begins a line.

    A word model decodes every word with a space before it, so a decoded continuation appends
    to its prompt as text ("the cat" + " sat down"); pieces of a growing decode concatenate."""

    chat_template = None  # no chat format: chat requests are refused as such

    def __init__(self, model: NGramLM):
        self.model = model
        self.vocab_size = model.vocab_size
        self.eot_id = EOS_ID
        self.special_tokens = {BOS: BOS_ID, EOS: EOS_ID}

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """A line's ids; `allowed_special` is the Tokenizer contract's, and moot here: text never
        holds <s> or </s>."""
        return self.model.encode(text)

    def prompt_ids(self, text: str) -> list[int]:
        return [BOS_ID, *self.model.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        if self.model.tokenizer is not None:
            return self.model.decode(ids)
        vocab = self.model.vocab
        return "".join(" " + vocab[int(i)] for i in ids if int(i) not in (BOS_ID, EOS_ID))

    def id_to_piece(self, i: int) -> str:
        return self.model.vocab[int(i)]


def _lookup(table: _Table, prefix: np.ndarray, word: np.ndarray, V: int) -> np.ndarray:
    """Table index of each (prefix index, word) n-gram, or -1 where absent or prefix is -1."""
    keys = prefix * V + word
    pos = np.searchsorted(table.keys, keys)
    pos_c = np.minimum(pos, len(table.keys) - 1) if len(table.keys) else np.zeros_like(pos)
    found = (prefix >= 0) & (word >= 0) & (len(table.keys) > 0)
    if len(table.keys):
        found &= table.keys[pos_c] == keys
    return np.where(found, pos_c, -1)

"""Unigram LM tokenizer (Kudo 2018), trained and applied the way SentencePiece does it.

A text is a sequence of pieces drawn independently from a unigram distribution; encoding picks
the most likely segmentation (Viterbi), or samples one (subword regularisation). Training starts
from a large seed vocabulary of frequent substrings, fits piece probabilities with EM over all
segmentations, and repeatedly drops the pieces whose removal costs the corpus least likelihood.

Text is first split into *words*: a run of non-whitespace with the whitespace before it attached
(SentencePiece's "▁" prefix, but keeping the real whitespace characters so decode is exact).
Pieces never cross a word boundary, so training works on a table of unique words and their
counts, and its cost grows with the vocabulary of the corpus rather than its size. Ids 0..255
are raw bytes: a character never seen in training is written as its UTF-8 bytes, so no input
is ever unknown.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from lmstack.errors import InputError
from lmstack.progress import progress
from lmstack.tokenizers.base import DEFAULT_SPECIALS, Tokenizer, check_special_tokens

N_BYTES = 256
MAX_PIECE_LEN = 16  # characters, as SentencePiece's max_sentencepiece_length
UNK_PENALTY = 10.0  # an unknown character scores this far below the rarest piece (SentencePiece's kUnkPenalty)
_WORD = re.compile(r"\s*\S+|\s+")
MAX_TRAIN_WORD = 4096  # longer words are cut into pieces this long for training (cf. max_sentence_length)
_CACHE_LIMIT = 1 << 17  # words whose Viterbi ids are remembered by an encoder


def split_words(text: str) -> list[str]:
    """Words as training and encoding see them; "".join(split_words(s)) == s."""
    return _WORD.findall(text)


class UnigramTokenizer(Tokenizer):
    """Ids 0..255 are bytes, then one id per piece, most probable first, then specials."""

    kind = "unigram"

    def __init__(self, pieces: Sequence[tuple[str, float]], special_tokens: dict[str, int] | None = None):
        super().__init__(special_tokens)
        self.pieces = [str(p) for p, _ in pieces]
        self.scores = [float(s) for _, s in pieces]
        if not self.pieces:
            raise ValueError("no pieces")
        if any(not p for p in self.pieces) or not all(map(math.isfinite, self.scores)):
            raise ValueError("pieces must be non-empty strings with finite scores")
        self._table = {p: (N_BYTES + i, s) for i, (p, s) in enumerate(zip(self.pieces, self.scores))}
        if len(self._table) != len(self.pieces):
            raise ValueError("duplicate pieces")
        self._max_len = max(map(len, self.pieces))
        self._prefixes = {p[:k] for p in self.pieces for k in range(1, len(p) + 1)}
        self._unk_score = min(self.scores) - UNK_PENALTY
        self._bytes = [bytes([b]) for b in range(N_BYTES)] + [p.encode("utf-8") for p in self.pieces]
        self._cache: dict[str, list[int]] = {}

    # --- encoding ------------------------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        return N_BYTES + len(self.pieces)

    def _lattice(self, word: str) -> list[list[tuple[int, int, float]]]:
        """For each end position 1..n, the pieces (start, id, score) that end there; id -1 is an
        unknown character, spelled in bytes. Starts ascend, so ties go to the longest piece,
        as in SentencePiece."""
        table, prefixes, n = self._table, self._prefixes, len(word)
        ends: list[list[tuple[int, int, float]]] = [[] for _ in range(n + 1)]
        for start in range(n):
            if word[start] not in table:
                ends[start + 1].append((start, -1, self._unk_score))
            for end in range(start + 1, min(n, start + self._max_len) + 1):
                sub = word[start:end]
                if sub not in prefixes:
                    break
                hit = table.get(sub)
                if hit is not None:
                    ends[end].append((start, hit[0], hit[1]))
        return ends

    def _ids(self, word: str, path: list[tuple[int, int]]) -> list[int]:
        """Ids of a path of (start, id) pieces given end-first."""
        ids: list[int] = []
        end = len(word)
        for start, i in path:
            ids.extend(reversed(word[start:end].encode("utf-8")) if i < 0 else (i,))
            end = start
        ids.reverse()
        return ids

    def _viterbi(self, word: str) -> list[int]:
        ends = self._lattice(word)
        best = [0.0] * len(ends)
        back: list[tuple[int, int]] = [(0, 0)] * len(ends)
        for end in range(1, len(ends)):
            b = -math.inf
            for start, i, s in ends[end]:
                s += best[start]
                if s > b:
                    b, back[end] = s, (start, i)
            best[end] = b
        path, end = [], len(word)
        while end > 0:
            path.append(back[end])
            end = back[end][0]
        return self._ids(word, path)

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for w in split_words(text):
            got = cache.get(w)
            if got is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                got = cache[w] = self._viterbi(w)
            ids.extend(got)
        return ids

    def sample_encode(self, text: str, alpha: float = 0.1, seed: int | random.Random | None = None) -> list[int]:
        """One segmentation of plain text, drawn with probability proportional to
        P(segmentation)**alpha (forward filtering, backward sampling), for subword
        regularisation. Small alpha gives varied segmentations, large alpha approaches Viterbi;
        every draw decodes to `text`."""
        if not alpha > 0:
            raise InputError(f"alpha must be positive, got {alpha}")
        rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        ids: list[int] = []
        for w in split_words(text):
            ends = self._lattice(w)
            fwd = [0.0] * len(ends)
            for end in range(1, len(ends)):
                fwd[end] = _logsumexp([fwd[start] + alpha * s for start, _, s in ends[end]])
            path, end = [], len(w)
            while end > 0:
                r, acc = rng.random(), 0.0
                for start, i, s in ends[end]:  # noqa: B007 (i is used after the loop)
                    acc += math.exp(fwd[start] + alpha * s - fwd[end])
                    if acc > r:
                        break
                path.append((start, i))
                end = start
            ids.extend(self._ids(w, path))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def id_to_piece(self, i: int) -> str:
        if i in self._special_by_id:
            return self._special_by_id[i]
        return f"<0x{i:02X}>" if i < N_BYTES else self.pieces[i - N_BYTES]

    # --- files -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"pieces": [[p, s] for p, s in zip(self.pieces, self.scores)]}

    @classmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "UnigramTokenizer":
        pieces = state["pieces"]
        if not isinstance(pieces, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], (int, float)) for e in pieces
        ):
            raise ValueError("'pieces' must be a list of [piece, score] pairs")
        return cls([(p, s) for p, s in pieces], special_tokens)

    # --- training --------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = 8192,
        special_tokens=DEFAULT_SPECIALS,
        *,
        seed_size: int = 200_000,
        max_piece_len: int = MAX_PIECE_LEN,
        shrinking_factor: float = 0.75,
        em_iterations: int = 2,
    ) -> "UnigramTokenizer":
        """Learn pieces so that `vocab_size` counts the 256 byte pieces, the pieces and the
        specials. Deterministic: the same texts give the same tokenizer."""
        vocab_size = 8192 if vocab_size is None else vocab_size
        special_tokens = check_special_tokens(special_tokens)
        if not 0 < shrinking_factor < 1 or em_iterations < 1 or not 1 <= max_piece_len <= MAX_TRAIN_WORD:
            raise InputError(
                f"need 0 < shrinking_factor < 1, em_iterations >= 1 and 1 <= max_piece_len <= {MAX_TRAIN_WORD}; "
                f"got {shrinking_factor}, {em_iterations}, {max_piece_len}"
            )
        words: Counter[str] = Counter()
        for t in progress(texts, desc="counting words", unit="chunk"):
            words.update(split_words(t))
        for w in [w for w in words if len(w) > MAX_TRAIN_WORD]:
            n = words.pop(w)
            for i in range(0, len(w), MAX_TRAIN_WORD):
                words[w[i : i + MAX_TRAIN_WORD]] += n
        if not words:
            raise InputError("no text to train on; pass a non-empty corpus")
        n_chars = len({c for w in words for c in w})
        n_pieces = vocab_size - N_BYTES - len(special_tokens)
        if n_pieces < n_chars:
            raise InputError(
                f"--vocab-size {vocab_size} is smaller than the alphabet: {N_BYTES} byte pieces + "
                f"{len(special_tokens)} special tokens + {n_chars} distinct characters in the corpus; "
                f"use at least {N_BYTES + len(special_tokens) + n_chars}"
            )
        # Like SentencePiece, stop pruning at 1.1x the whole vocabulary size, then keep the best.
        trainer = _Trainer(words, max_piece_len, seed_size)
        pieces = trainer.run(n_pieces, int(vocab_size * 1.1), shrinking_factor, em_iterations)
        tok = cls(pieces)
        tok.add_special_tokens(special_tokens)
        return tok


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _digamma(x: np.ndarray) -> np.ndarray:
    """psi(x) for x > 0: shift x above 6 with psi(x) = psi(x+1) - 1/x, then the asymptotic series."""
    x = np.array(x, dtype=np.float64)
    out = np.zeros_like(x)
    for _ in range(6):
        small = x < 6
        out[small] -= 1 / x[small]
        x[small] += 1
    f = 1 / (x * x)
    return out + np.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))


def _spans(lengths: np.ndarray, max_len: int, whole: bool = True):
    """(string, start, end) of every substring of up to `max_len` characters of strings with
    these lengths (without each whole string unless `whole`); each string's spans are together,
    in (start, end) order."""
    owner, start, end = [], [], []
    for n in np.unique(lengths):
        of = np.flatnonzero(lengths == n).astype(np.int32)
        per = np.minimum(max_len, n - np.arange(n))
        i = np.repeat(np.arange(n), per)
        j = i + 1 + np.arange(len(i)) - np.repeat(np.cumsum(per) - per, per)
        if not whole:
            part = (i > 0) | (j < n)
            i, j = i[part], j[part]
        owner.append(np.repeat(of, len(i)))
        start.append(np.tile(i.astype(np.int32), len(of)))
        end.append(np.tile(j.astype(np.int32), len(of)))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32)
    return cat(owner), cat(start), cat(end)


class _Hashes:
    """Substrings of one long string named by two 64-bit polynomial hashes, computed in numpy from
    prefix sums, so millions of substrings are counted without a Python dict. A clash of the
    first hash shows up as a disagreement of the second (the caller then retries other bases)."""

    BASES = (
        (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F),
        (0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD),
        (0x94D049BB133111EB, 0xBF58476D1CE4E5B9),
    )

    def __init__(self, text: str, bases: tuple[int, int]):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + np.uint64(1)
        self.tables = []
        with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
            for b in bases:
                power = np.cumprod(np.r_[np.uint64(1), np.full(len(codes), b, dtype=np.uint64)], dtype=np.uint64)
                inverse = np.cumprod(
                    np.r_[np.uint64(1), np.full(len(codes), pow(b, -1, 1 << 64), dtype=np.uint64)], dtype=np.uint64
                )
                # prefix[k] = sum_{t<k} codes[t] * b**(k-t)
                prefix = power * np.r_[np.uint64(0), np.cumsum(codes * inverse[:-1], dtype=np.uint64)]
                self.tables.append((power, prefix))

    def __call__(self, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore"):
            return tuple(prefix[end] - prefix[start] * power[end - start] for power, prefix in self.tables)


def _name_substrings(text: str, start: np.ndarray, end: np.ndarray):
    """Ids for the substrings text[start:end]. Returns the hasher, each id's hash (sorted), the
    index of each id's first occurrence and each substring's id."""
    for bases in _Hashes.BASES:
        hashes = _Hashes(text, bases)
        h1, h2 = hashes(start, end)
        names, first, sub = np.unique(h1, return_index=True, return_inverse=True)
        if np.array_equal(h2, h2[first][sub]):
            return hashes, names, first, sub
    raise RuntimeError("substring hashes clashed with every base; please report this")  # pragma: no cover


class _Lattice:
    """All segmentations of many strings at once. Node `first[k] + t` is position t of string k;
    an edge is a piece from one node to a later one. Forward-backward and Viterbi walk positions
    in order and handle every string's edges at that position in one numpy step, so the Python
    loop runs once per position (at most the longest string), not once per string."""

    def __init__(self, lengths: np.ndarray, owner, start, end, piece):
        self.first = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        self.last = self.first + lengths
        self.n_nodes = int(self.last[-1]) + 1 if len(lengths) else 0
        src = (self.first[owner] + start).astype(np.int32)
        dst = (self.first[owner] + end).astype(np.int32)
        # Edges come grouped by string in (start, end) order. Sorted once, stably (a radix sort on
        # 16-bit positions), by end for the forward pass and by start, descending, for the
        # backward pass: each node's edges stay together, in ascending start order.
        f = np.argsort(end.astype(np.uint16), kind="stable")
        self.f_src, self.f_dst, self.f_pos = src[f], dst[f], end[f]
        self.f_piece, self.f_owner = piece[f].astype(np.int32), owner[f]
        b = np.argsort((MAX_TRAIN_WORD - start).astype(np.uint16), kind="stable")
        self.b_src, self.b_dst, self.b_pos, self.b_piece = src[b], dst[b], start[b], piece[b].astype(np.int32)
        self.restrict(np.ones(int(piece.max(initial=-1)) + 1, dtype=bool))

    def restrict(self, alive: np.ndarray) -> None:
        """Drop edges of pieces no longer in the vocabulary (once per pruning round; the arrays
        shrink with the vocabulary)."""
        f = alive[self.f_piece]
        if not f.all():
            self.f_src, self.f_dst, self.f_pos, self.f_piece, self.f_owner = (
                a[f] for a in (self.f_src, self.f_dst, self.f_pos, self.f_piece, self.f_owner)
            )
        b = alive[self.b_piece]
        if not b.all():
            self.b_src, self.b_dst, self.b_pos, self.b_piece = (a[b] for a in (self.b_src, self.b_dst, self.b_pos, self.b_piece))
        self.f_steps = _steps(self.f_pos, self.f_dst)
        self.b_steps = _steps(self.b_pos, self.b_src)

    def forward_backward(self, score: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, float]:
        """Expected count of each piece over all segmentations, weighted by string counts, and
        the corpus log-likelihood."""
        alpha = np.full(self.n_nodes, -np.inf)
        alpha[self.first] = 0.0
        for e0, e1, bounds, nodes, sizes in self.f_steps:
            alpha[nodes] = _group_logsumexp(alpha[self.f_src[e0:e1]] + score[self.f_piece[e0:e1]], bounds, sizes)
        beta = np.full(self.n_nodes, -np.inf)
        beta[self.last] = 0.0
        for e0, e1, bounds, nodes, sizes in self.b_steps:
            beta[nodes] = _group_logsumexp(beta[self.b_dst[e0:e1]] + score[self.b_piece[e0:e1]], bounds, sizes)
        z = alpha[self.last]
        post = np.exp(alpha[self.f_src] + score[self.f_piece] + beta[self.f_dst] - z[self.f_owner])
        expected = np.bincount(self.f_piece, weights=post * freq[self.f_owner], minlength=len(score))
        return expected, float(freq @ z)

    def viterbi(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best segmentation of every string that has one, as (string, piece) pairs."""
        best = np.full(self.n_nodes, -np.inf)
        best[self.first] = 0.0
        back = np.full(self.n_nodes, -1, dtype=np.int64)
        for e0, e1, bounds, nodes, sizes in self.f_steps:
            v = best[self.f_src[e0:e1]] + score[self.f_piece[e0:e1]]
            m = np.maximum.reduceat(v, bounds)
            best[nodes] = m
            hit = np.flatnonzero(v == np.repeat(m, sizes))
            group = np.repeat(np.arange(len(sizes)), sizes)[hit]
            first = np.r_[True, group[1:] != group[:-1]]  # the first best edge wins ties
            back[nodes[group[first]]] = e0 + hit[first]
        strings = np.flatnonzero(np.isfinite(best[self.last]) & (back[self.last] >= 0))
        cur = self.last[strings]
        out_s, out_p = [], []
        while strings.size:
            e = back[cur]
            out_s.append(strings)
            out_p.append(self.f_piece[e])
            cur = self.f_src[e]
            more = cur != self.first[strings]
            strings, cur = strings[more], cur[more]
        if not out_s:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(out_s), np.concatenate(out_p)


def _steps(pos: np.ndarray, node: np.ndarray) -> list:
    """Split edges sorted by (position, node) into one step per position: the edge range and,
    for each node reached, its group's offset (for reduceat), node id and size."""
    if not len(node):
        return []
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    sizes = np.diff(np.r_[starts, len(node)])
    gpos = pos[starts]
    cuts = np.r_[np.flatnonzero(np.r_[True, gpos[1:] != gpos[:-1]]), len(starts)]
    steps = []
    for g0, g1 in zip(cuts[:-1], cuts[1:]):
        e0 = starts[g0]
        e1 = starts[g1] if g1 < len(starts) else len(node)
        steps.append((e0, e1, starts[g0:g1] - e0, node[starts[g0:g1]], sizes[g0:g1]))
    return steps


def _group_logsumexp(v: np.ndarray, bounds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    m = np.maximum.reduceat(v, bounds)
    return m + np.log(np.add.reduceat(np.exp(v - np.repeat(m, sizes)), bounds))


def _script(c: str) -> str:
    """A character's writing system, roughly: for letters the first word of their Unicode name
    (LATIN, CYRILLIC, GREEK, CJK for Han and kana, ...), " " for whitespace, "" for combining
    marks (they take their base character's), "." for the rest (digits, punctuation, symbols),
    like Unicode's Common script."""
    if c.isspace():
        return " "
    cat = unicodedata.category(c)
    if cat[0] == "M":
        return ""
    if cat[0] != "L":
        return "."
    name = unicodedata.name(c, "")
    return "CJK" if name.startswith(("HIRAGANA", "KATAKANA")) else name.split(" ")[0]


def _one_script(text: str, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Whether each substring text[start:end] keeps to one script after its leading whitespace.
    SentencePiece requires this of pieces (split_by_unicode_script): "the" and "," are pieces,
    "e," and "MENENIUS:" are not, which keeps pieces general."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    distinct, inverse = np.unique(cps, return_inverse=True)
    names = [_script(chr(c)) for c in distinct]
    ids = {n: i for i, n in enumerate(dict.fromkeys(names))}
    cls = np.array([ids[n] for n in names], dtype=np.int64)[inverse]
    fill = np.where(cls != ids.get("", -1), np.arange(len(cls)), 0)
    cls = cls[np.maximum.accumulate(fill)]  # a combining mark takes its base character's script
    change = np.r_[False, (cls[1:] != cls[:-1]) & (cls[:-1] != ids.get(" ", -1))]
    changes = np.cumsum(change)
    return changes[end - 1] == changes[start]


class _Trainer:
    """SentencePiece's Unigram trainer over a table of unique words.

    Seed pieces are the substrings of up to `max_len` characters seen at least twice, ranked by
    count * length; every character is kept, so the alphabet never shrinks. Each round runs EM
    (with SentencePiece's Bayesian M-step, digamma(count) - digamma(total), which favours
    frequent pieces) and then keeps the pieces whose removal would lose the most likelihood,
    where a removed piece's Viterbi count moves to its best split into other pieces.
    """

    MIN_EXPECTED = 0.5  # pieces expected fewer times than this drop out (SentencePiece's threshold)

    def __init__(self, words: Counter[str], max_len: int, seed_size: int):
        items = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
        self.words = [w for w, _ in items]
        self.freq = np.array([c for _, c in items], dtype=np.float64)
        lengths = np.array([len(w) for w in self.words], dtype=np.int64)
        text = "".join(self.words)
        offset = np.r_[0, np.cumsum(lengths)[:-1]]
        owner, start, end = _spans(lengths, max_len)
        g_start, g_end = offset[owner] + start, offset[owner] + end
        hashes, names, first, sub = _name_substrings(text, g_start, g_end)
        n_sub = len(names)
        sub_count = np.bincount(sub, weights=self.freq[owner], minlength=n_sub)
        sub_len = (end - start)[first]
        # Like SentencePiece's suffix-array seeds: a substring always followed by the same
        # character is left to its extension, and pieces stay within one script.
        grows = np.flatnonzero((owner[1:] == owner[:-1]) & (start[1:] == start[:-1]) & (end[1:] == end[:-1] + 1))
        longest_extension = np.zeros(n_sub)
        np.maximum.at(longest_extension, sub[grows], sub_count[sub[grows + 1]])
        one_script = _one_script(text, g_start[first], g_end[first])
        # Seed: all characters, then the best-scoring longer substrings.
        chars = np.flatnonzero(sub_len == 1)
        longer = np.flatnonzero((sub_len > 1) & (sub_count >= 2) & (longest_extension < sub_count) & one_script)
        score = sub_count * sub_len
        longer = longer[np.lexsort((longer, -score[longer]))][: max(0, seed_size - len(chars))]
        seed = np.concatenate([chars, longer])
        seed_start = g_start[first[seed]]
        self.pieces = [text[a : a + n] for a, n in zip(seed_start.tolist(), sub_len[seed].tolist())]
        self.required = np.zeros(len(seed), dtype=bool)
        self.required[: len(chars)] = True
        self.score = np.log(score[seed]) - np.log(score[seed].sum())
        sub2piece = np.full(n_sub, -1, dtype=np.int64)
        sub2piece[seed] = np.arange(len(seed))
        piece = sub2piece[sub]
        keep = piece >= 0
        self.corpus = _Lattice(lengths, owner[keep], start[keep], end[keep], piece[keep])
        del owner, start, end, sub, piece, keep, g_start, g_end
        # Each piece's own lattice without the piece itself, to find what replaces it if removed.
        owner, start, end = _spans(sub_len[seed], max_len, whole=False)
        h1, _ = hashes(seed_start[owner] + start, seed_start[owner] + end)
        by_hash = np.argsort(names[seed])
        at = np.minimum(np.searchsorted(names[seed][by_hash], h1), len(seed) - 1)
        keep = names[seed][by_hash][at] == h1  # no clashes among the words' substrings, so exact
        piece = by_hash[at]
        self.splits = _Lattice(sub_len[seed], owner[keep], start[keep], end[keep], piece[keep])
        self.alive = np.ones(len(seed), dtype=bool)

    def _set_alive(self, alive: np.ndarray) -> None:
        """Dead pieces score -inf, so their edges carry no weight; the lattice drops those edges
        when that saves real work."""
        if alive.sum() < 0.9 * self.alive.sum():
            self.corpus.restrict(alive)
        self.alive = alive
        self.score = np.where(alive, self.score, -np.inf)

    def em_step(self) -> float:
        expected, loglik = self.corpus.forward_backward(self.score, self.freq)
        expected = np.where(self.required, np.maximum(expected, self.MIN_EXPECTED), expected)
        alive = self.alive & (expected >= self.MIN_EXPECTED)
        self.score = _digamma(np.maximum(expected, self.MIN_EXPECTED)) - _digamma(expected[alive].sum())
        self._set_alive(alive)
        return loglik / self.freq.sum()

    def prune(self, target: int) -> None:
        words, pieces = self.corpus.viterbi(self.score)
        vfreq = np.bincount(pieces, weights=self.freq[words], minlength=len(self.pieces))
        self.splits.restrict(self.alive)
        of, alt = self.splits.viterbi(self.score)
        n_alt = np.bincount(of, minlength=len(self.pieces))
        total = vfreq.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            # Loss of removing piece i: its Viterbi count f moves onto its n alternatives.
            f = vfreq
            logsum_alt = np.log(total + f * (n_alt - 1))
            logprob_alt = np.bincount(of, weights=np.log(vfreq[alt] + f[of]), minlength=len(f)) - n_alt * logsum_alt
            loss = (f / total) * (np.log(f) - np.log(total) - logprob_alt)
        keep = self.required.copy()
        cand = np.flatnonzero(self.alive & ~self.required & (vfreq > 0) & (n_alt > 0))
        cand = cand[np.lexsort((cand, -loss[cand]))]
        keep[cand[: max(0, target - int(keep.sum()))]] = True
        self._set_alive(keep)

    def run(self, n_pieces: int, desired: int, shrinking_factor: float, em_iterations: int) -> list[tuple[str, float]]:
        """EM and pruning until at most `desired` pieces are left, then the `n_pieces` best."""
        rounds = max(1, math.ceil(math.log(max(desired, 1) / len(self.pieces)) / math.log(shrinking_factor)) + 1)
        with progress(total=rounds, desc="unigram EM", unit="round") as bar:
            while True:
                for _ in range(em_iterations):
                    loglik = self.em_step()
                size = int(self.alive.sum())
                bar.set_postfix(pieces=size, loglik=f"{loglik:.3f}")
                bar.update()
                if size <= desired:
                    break
                self.prune(max(desired, int(size * shrinking_factor)))
        keep = np.flatnonzero(self.required)
        rest = np.flatnonzero(self.alive & ~self.required)
        rest = rest[np.lexsort((rest, -self.score[rest]))][: n_pieces - len(keep)]
        final = np.concatenate([keep, rest])
        final = final[np.lexsort((final, -self.score[final]))]
        return [(self.pieces[i], float(self.score[i])) for i in final]

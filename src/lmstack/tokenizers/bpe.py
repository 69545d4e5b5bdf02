"""Byte-level BPE, GPT-2 style: regex pre-tokenization, 256 single bytes as the alphabet,
merges learned from pair counts.

Id layout: id == rank. Ids 0-255 are the single bytes in GPT-2's byte-level order (which is
also the order Hugging Face `tokenizers` gives its byte-level alphabet), then one id per new
token in the order training created it, then the special tokens. Because id == rank, the
vocabulary is a valid `tiktoken` encoding as it stands, and a GPT-2 import keeps GPT-2's ids.

Training follows Hugging Face's BpeTrainer step for step, so the merge list is the same: the
pair with the highest count wins, ties go to the smallest (left id, right id), and after each
merge only the words that held the pair are rewritten, with pair counts updated incrementally.

Encoding merges, inside each pre-tokenized chunk, the adjacent pair whose concatenation has
the lowest rank, the way tiktoken does; a chunk that is itself a token encodes to that token.
That makes the pure-Python path and the tiktoken fast path give identical ids; both read the
pattern's \\p{L} and \\p{N} as Unicode 16.0, tiktoken's tables (see `pretokenize`), so the two
regex engines split every text alike whatever Unicode version each was built with.
"""

from __future__ import annotations

import codecs
import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

from lmstack.errors import InputError
from lmstack.io import check_readable
from lmstack.progress import progress
from lmstack.tokenizers.base import DEFAULT_SPECIALS, Tokenizer, check_special_tokens
from lmstack.tokenizers.pretokenize import PinnedRegex, pin_pattern

PATTERNS = {
    # GPT-2's pattern, also what Hugging Face's ByteLevel pre-tokenizer uses.
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4's cl100k pattern (the form without `$`, which means end-of-line in Hugging Face's
    # Oniguruma but end-of-text in Python and tiktoken).
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
DEFAULT_VOCAB_SIZE = 8192
_CACHE_SIZE = 1 << 18  # distinct chunks remembered by the Python encoder
_BLOCK = 1 << 20


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte as a printable character (printable Latin-1 bytes stand for
    themselves, the rest map to U+0100 onward), so tokens can be written as JSON strings."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Ids 0-255: the bytes ordered by their byte-level character (GPT-2's order, and HF's).
BYTE_ORDER = sorted(range(256), key=lambda b: ord(BYTE_TO_CHAR[b]))
_BYTE_TO_ID = bytes(BYTE_ORDER.index(b) for b in range(256))  # a bytes.translate table
_SINGLE_BYTES = [bytes([b]) for b in range(256)]


def to_bytelevel(b: bytes) -> str:
    return "".join(BYTE_TO_CHAR[x] for x in b)


def from_bytelevel(s: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{s!r} is not a byte-level token (character {e} is not in GPT-2's table)") from None


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regex, checked to compile."""
    pat = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pat)
    except regex.error as e:
        raise InputError(
            f"pre-tokenization pattern {pattern!r} does not compile ({e}); use gpt2, gpt4 or a valid regex"
        ) from None
    return pat


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(
        self,
        tokens: list[bytes | None],
        merges: list[tuple[int, int]],
        pattern: str = "gpt2",
        special_tokens: dict[str, int] | None = None,
        engine: str = "auto",
    ):
        """`tokens[i]` is the bytes of id i (None at ids held by special tokens); `merges` are
        (left id, right id) pairs in the order they were learned."""
        super().__init__(special_tokens)
        self.tokens = list(tokens)
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = resolve_pattern(pattern)
        if engine not in ("auto", "tiktoken", "python"):
            raise InputError(f"unknown BPE engine {engine!r}; use auto, tiktoken or python")
        self.engine = engine  # auto: tiktoken when installed, else python
        self._ranks = {t: i for i, t in enumerate(self.tokens) if t is not None}
        self._check()
        self._regex = PinnedRegex(self.pattern)
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = None

    def _check(self) -> None:
        if len(self._ranks) != sum(t is not None for t in self.tokens):
            raise ValueError("the token list repeats a token")
        missing = [b for b in range(256) if bytes([b]) not in self._ranks]
        if missing:
            raise ValueError(f"{len(missing)} single bytes have no token (e.g. byte {missing[0]})")
        for a, b in self.merges:
            if self.tokens[a] is None or self.tokens[b] is None or self.tokens[a] + self.tokens[b] not in self._ranks:
                raise ValueError(f"merge ({a}, {b}) does not produce a token of the vocabulary")
        stray = [i for i, t in enumerate(self.tokens) if t is None and i not in self._special_by_id]
        if stray:
            raise ValueError(f"id {stray[0]} has neither bytes nor a special token")

    # --- training ---------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = DEFAULT_VOCAB_SIZE,
        special_tokens=DEFAULT_SPECIALS,
        pattern: str = "gpt2",
        min_frequency: int = 0,
    ) -> "BPETokenizer":
        """Learn merges from `texts` (each pre-tokenized on its own) until the vocabulary,
        specials included, has `vocab_size` tokens or no pair occurs `min_frequency` times."""
        pat = resolve_pattern(pattern)
        vocab_size = _check_vocab_size(vocab_size, special_tokens)
        split = PinnedRegex(pat).findall
        counts: Counter[str] = Counter()
        for t in [texts] if isinstance(texts, str) else texts:
            counts.update(split(t))
        return cls._from_counts(counts, vocab_size, special_tokens, pat, min_frequency)

    @classmethod
    def train_files(
        cls,
        paths: Iterable[str | os.PathLike],
        vocab_size: int | None = DEFAULT_VOCAB_SIZE,
        special_tokens=DEFAULT_SPECIALS,
        pattern: str = "gpt2",
        min_frequency: int = 0,
        workers: int | None = None,
    ) -> "BPETokenizer":
        """Train on UTF-8 files of any size: byte ranges of the files are read in blocks and
        pre-tokenized by `workers` processes (default: every core); memory holds only the
        distinct chunks. Gives the same tokenizer as `train` on the files' whole texts."""
        pat = resolve_pattern(pattern)
        vocab_size = _check_vocab_size(vocab_size, special_tokens)
        counts = count_file_chunks(paths, pat, workers)
        return cls._from_counts(counts, vocab_size, special_tokens, pat, min_frequency)

    @classmethod
    def _from_counts(
        cls, counts: dict[str, int], vocab_size: int, special_tokens, pattern: str, min_frequency: int
    ) -> "BPETokenizer":
        if not counts:
            raise InputError("no text to train on; pass a non-empty corpus")
        n_tokens = vocab_size - len(set(special_tokens))
        tokens, merges = learn_merges(counts, n_tokens, min_frequency)
        tok = cls(tokens, merges, pattern)
        tok.add_special_tokens(special_tokens)
        return tok

    # --- encoding -----------------------------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        return len(self.tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        fast = self._fast_encoder()
        if fast is not None:
            return fast.encode_ordinary(text)
        ids: list[int] = []
        cache = self._cache
        for chunk in self._regex.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk.encode("utf-8"))
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def _encode_chunk(self, piece: bytes) -> list[int]:
        """tiktoken's rule: merge the adjacent pair whose concatenation has the lowest rank,
        leftmost first, until no adjacent pair is a token."""
        ranks = self._ranks
        whole = ranks.get(piece)
        if whole is not None:
            return [whole]
        parts = list(map(_SINGLE_BYTES.__getitem__, piece))
        none = len(self.tokens)  # ranks are < this
        pair_ranks = [ranks.get(piece[i : i + 2], none) for i in range(len(piece) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == none:
                break
            i = pair_ranks.index(best)
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair_ranks[i]
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
            if i:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
        return [ranks[p] for p in parts]

    def _fast_encoder(self):
        """The tiktoken Encoding of this vocabulary, built once, or None for the Python path."""
        if self.engine == "python":
            return None
        if self._tiktoken is None:
            try:
                import tiktoken
            except ImportError:
                if self.engine == "tiktoken":
                    raise InputError("engine='tiktoken' needs tiktoken; `pip install tiktoken` or use engine='auto'") from None
                return None
            self._tiktoken = tiktoken.Encoding(
                f"lmstack-bpe-{len(self.tokens)}",
                pat_str=pin_pattern(self.pattern),
                mergeable_ranks=self._ranks,
                special_tokens={},
            )
        return self._tiktoken

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tokens = self.tokens
        return b"".join([tokens[i] for i in ids])

    def id_to_piece(self, i: int) -> str:
        if i in self._special_by_id:
            return self._special_by_id[i]
        return self.tokens[i].decode("utf-8", errors="backslashreplace")

    # --- files ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "pattern": self.pattern,
            "tokens": [None if t is None else to_bytelevel(t) for t in self.tokens],
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def _from_state(cls, state: dict, special_tokens: dict[str, int]) -> "BPETokenizer":
        tokens = [None if t is None else from_bytelevel(t) for t in state["tokens"]]
        return cls(tokens, [tuple(m) for m in state["merges"]], state["pattern"], special_tokens)


def _check_vocab_size(vocab_size: int | None, special_tokens) -> int:
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    floor = 256 + len(set(check_special_tokens(special_tokens)))
    if vocab_size < floor:
        raise InputError(
            f"vocab size {vocab_size} is smaller than the 256 byte tokens plus {len(set(special_tokens))} "
            f"special tokens; use at least {floor}"
        )
    return vocab_size


# --- merge learning -----------------------------------------------------------------------------
_PAIR = 1 << 22  # pair key = left * _PAIR + right; ids stay below 4M


def learn_merges(
    chunk_counts: dict[str, int], n_tokens: int, min_frequency: int = 0
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Tokens (bytes by id) and merges learned from pre-tokenized chunk counts.

    Mirrors Hugging Face's BpeTrainer: a max-heap of (count, smallest pair) with stale entries
    refreshed when popped; each heap entry carries the words where its pair was formed, and a
    merge rewrites only those words, adding the count deltas of the neighbouring pairs. A merge
    whose result is already a token (same bytes, other split) reuses that token's id.
    """
    words = [list(chunk.encode("utf-8").translate(_BYTE_TO_ID)) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    tokens = [bytes([b]) for b in BYTE_ORDER]
    index = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int]] = []

    pair_counts: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        c = counts[wi]
        for k in map(int.__add__, map(_PAIR.__mul__, w[:-1]), w[1:]):
            pair_counts[k] += c
            where[k].add(wi)
    seq = 0
    heap = []
    for k, pos in where.items():
        heap.append((-pair_counts[k], k, seq, pos))
        seq += 1
    heapq.heapify(heap)
    del where

    with progress(total=max(0, n_tokens - len(tokens)), desc="learning merges", unit="merge") as bar:
        while len(tokens) < n_tokens and heap:
            neg, k, s, pos = heapq.heappop(heap)
            c = pair_counts[k]
            if -neg != c:
                heapq.heappush(heap, (-c, k, s, pos))
                continue
            if c < 1 or c < min_frequency:
                break
            a, b = divmod(k, _PAIR)
            merged = tokens[a] + tokens[b]
            new = index.get(merged)
            if new is None:
                new = len(tokens)
                tokens.append(merged)
                index[merged] = new
                bar.update(1)
            merges.append((a, b))
            formed: defaultdict[int, list[int]] = defaultdict(list)
            new_left = new * _PAIR
            for wi in pos:
                w = words[wi]
                cw = counts[wi]
                i = 0
                while True:
                    try:
                        i = w.index(a, i)
                    except ValueError:
                        break
                    if i + 1 < len(w) and w[i + 1] == b:
                        w[i : i + 2] = (new,)
                        if i:
                            prev = w[i - 1] * _PAIR
                            pair_counts[prev + a] -= cw
                            q = prev + new
                            pair_counts[q] += cw
                            formed[q].append(wi)
                        if i + 1 < len(w):
                            nxt = w[i + 1]
                            pair_counts[b * _PAIR + nxt] -= cw
                            q = new_left + nxt
                            pair_counts[q] += cw
                            formed[q].append(wi)
                    i += 1
            for q, where_q in formed.items():
                cq = pair_counts[q]
                if cq > 0:
                    heapq.heappush(heap, (-cq, q, seq, set(where_q)))
                    seq += 1
    return tokens, merges


# --- streaming the files ---------------------------------------------------------------------------
# Text is cut only between a letter and a following non-letter. Every match of the GPT-2 and
# GPT-4 patterns that covers that letter ends right there, and neither pattern looks back, so
# a cut text pre-tokenizes exactly like the whole: results do not depend on block size or on
# the number of workers. (A custom pattern whose matches run on past a letter could differ
# slightly at the cuts.) Letters are Unicode 16.0's here too, as in the patterns.
_CUT = PinnedRegex(r"(?r)\p{L}(?=\P{L})")
_FIRST_CUT = PinnedRegex(r"\p{L}(?=\P{L})")


def _file_ranges(path: Path, workers: int) -> list[tuple[int, int]]:
    """Split a file into byte ranges, a few per worker, each starting at a safe cut."""
    size = path.stat().st_size
    n = min(4 * workers, max(1, size // (4 * _BLOCK))) if workers > 1 else 1
    starts = [0]
    with open(path, "rb") as f:
        for j in range(1, n):
            f.seek(max(j * size // n, starts[-1]))
            window = f.read(1 << 16)
            lead = 0
            while lead < len(window) and 0x80 <= window[lead] < 0xC0:  # inside a UTF-8 sequence
                lead += 1
            text = window[lead:].decode("utf-8", errors="replace")
            m = _FIRST_CUT.search(text)
            if m is None or "\ufffd" in text[: m.end()]:
                continue
            starts.append(f.tell() - len(window) + lead + len(text[: m.end()].encode("utf-8")))
    return [(s, e) for s, e in zip(starts, starts[1:] + [size]) if e > s]


def count_file_chunks(paths: Iterable[str | os.PathLike], pattern: str, workers: int | None = None) -> Counter[str]:
    """How often each pre-tokenized chunk occurs in the files (each file pre-tokenized as one
    text), counted by `workers` processes (default: every core) over byte ranges read in blocks."""
    paths = [check_readable(p) for p in paths]
    for p in paths:
        if p.stat().st_size == 0:
            raise InputError(f"{p}: file is empty; pass a file with some text")
    workers = max(1, workers or os.cpu_count() or 1)
    jobs = [(str(p), start, end, pattern) for p in paths for start, end in _file_ranges(p, workers)]
    counts: Counter[str] = Counter()
    with progress(total=sum(p.stat().st_size for p in paths), desc="counting chunks", unit="B", unit_scale=True) as bar:
        for part, n_bytes in _map(_count_range, jobs, workers):
            counts.update(part)
            bar.update(n_bytes)
    return counts


def _map(fn, jobs: list, workers: int):
    """fn over jobs, in `workers` processes when there is more than one of each."""
    if workers == 1 or len(jobs) == 1:
        yield from map(fn, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(fn, jobs)


def _count_range(job: tuple[str, int, int, str]) -> tuple[Counter, int]:
    """Chunk counts of bytes [start, end) of a file (run in a worker process)."""
    path, start, end, pattern = job
    split = PinnedRegex(pattern).findall
    counts: Counter[str] = Counter()
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        while offset < end:
            block = f.read(min(_BLOCK, end - offset))
            if not block:
                break
            if b"\x00" in block:
                raise InputError(f"{path}: looks binary (contains NUL bytes); pass a UTF-8 text file")
            try:
                text = pending + decoder.decode(block, final=offset + len(block) >= end)
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{path}: not valid UTF-8 (near byte offset {offset + e.start}); "
                    "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
                ) from None
            offset += len(block)
            m = _CUT.search(text) if offset < end else None
            cut = m.end() if m else (len(text) if offset >= end else 0)
            counts.update(split(text[:cut]))
            pending = text[cut:]
    if pending:
        counts.update(split(pending))
    return counts, end - start

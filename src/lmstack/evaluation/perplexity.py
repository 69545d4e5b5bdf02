"""Perplexity, perplexity per word and bits per byte of any language model on the contract.

Three ways to score text, all reporting the same fields:

- `perplexity` (mode "lines"), as KenLM's `query` counts: each line is the sentence
  `<s> w1 .. wk </s>`; the k tokens and `</s>` count, `<s>` is only context. Out-of-vocabulary
  words are scored (as `<unk>`) and counted separately, so both KenLM figures come out. The
  n-gram's default, and the only mode for it (its vocabulary has sentence marks, not a
  document separator). T5 is scored this way too: each line as the decoder's target after its
  start token, from an empty source (`SourceFree`), with `</s>` at the end.
- `stream_perplexity` (mode "stream"): the documents as one token stream, each one followed by
  end-of-text (which is scored, like `</s>`), read through a sliding window of `context` tokens
  moved `stride` tokens at a time. Every token is scored exactly once, with as much left context
  as its window gives (at least context - stride tokens, except at the start): Hugging Face's
  "perplexity of fixed-length models" recipe. Neural families' default. Unbounded families (RNN,
  feed-forward) get the same windows, each from a fresh state, so every family is measured the
  same way.
- `pseudo_perplexity` (mode "pseudo"): a masked LM's (BERT's) pseudo-perplexity per line.

Normalisations, so that models with different tokenizers (and the n-gram) are comparable:
- per token: exp(nats / tokens), the model's own perplexity;
- per word: exp(nats / words), where words = whitespace-separated words (split on ASCII 9-13
  and space, as KenLM) plus one end-of-line per line, i.e. exactly KenLM's token count for a
  word-level model, whose perplexity per word therefore equals its perplexity;
- bits per byte: nats / ln 2 / UTF-8 bytes of the text, newlines included.

A closed-vocabulary model (the word n-gram) gives its probability to "some unknown word", not
to the word in the text; to make it pay for the whole text, `nats` (and so bits per byte and
perplexity per word) adds the cost of spelling each unknown word out with a character model
fitted on its vocabulary (`log10_prob_spelling`). KenLM's `perplexity` fields leave it out.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmstack.errors import ContextLengthError, InputError
from lmstack.generation.engine import model_device
from lmstack.models.base import LanguageModel

DEFAULT_CONTEXT = 1024  # window of unbounded families (RNN, feed-forward) in stream mode
_WORD = re.compile(r"[^\t\n\v\f\r ]+")
# a batch's [B, T, V] log-prob tensor stays under this many floats
_MAX_BATCH_FLOATS = 1 << 27


@dataclass
class PerplexityResult:
    lines: int
    tokens: int
    oovs: int
    bytes: int
    log10_prob: float
    log10_prob_oovs: float
    #: log10 p of spelling out the OOV words (closed-vocabulary models; see NGramLM.oov_spelling_log10)
    log10_prob_spelling: float = 0.0
    words: int = 0
    seconds: float = 0.0
    mode: str = "lines"
    context: int | None = None
    stride: int | None = None

    @property
    def nats(self) -> float:
        """-ln p(text): the total negative log-likelihood, unknown words spelled out."""
        return -(self.log10_prob + self.log10_prob_spelling) * math.log(10.0)

    @property
    def perplexity(self) -> float:
        return 10.0 ** (-self.log10_prob / self.tokens) if self.tokens else float("nan")

    @property
    def perplexity_excluding_oovs(self) -> float:
        n = self.tokens - self.oovs
        return 10.0 ** (-(self.log10_prob - self.log10_prob_oovs) / n) if n else float("nan")

    @property
    def perplexity_per_word(self) -> float:
        return math.exp(self.nats / self.words) if self.words else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2.0) / self.bytes if self.bytes else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        out = {
            **asdict(self),
            "nats": self.nats,
            "perplexity": self.perplexity,
            "perplexity_excluding_oovs": self.perplexity_excluding_oovs,
            "perplexity_per_word": self.perplexity_per_word,
            "bits_per_byte": self.bits_per_byte,
            "tokens_per_s": self.tokens_per_s,
        }
        if self.mode == "pseudo":  # not a probability of the text: no figure that claims to be one
            out.update(
                pseudo_perplexity=self.perplexity,
                perplexity=None,
                perplexity_excluding_oovs=None,
                perplexity_per_word=None,
                bits_per_byte=None,
                note=PSEUDO_NOTE,
            )
        return out


def count_words(line: str) -> int:
    """Words of one line (without its newline) plus its end-of-line: KenLM's tokens for it."""
    return len(_WORD.findall(line)) + 1


def split_lines(text: str, keepends: bool = False) -> list[str]:
    """Lines split on \\n only, as KenLM splits them (str.splitlines would also break at form
    feeds, U+2028 and other separators inside a line); a final newline ends the last line.
    `keepends` keeps each line's newline, so that a last line without one is told apart."""
    lines = text.split("\n")
    lines = lines[:-1] if text.endswith("\n") else lines
    if not keepends or not lines:
        return lines
    return [line + "\n" for line in lines[:-1]] + [lines[-1] + "\n" * text.endswith("\n")]


def perplexity(
    model: LanguageModel,
    lines: Iterable[str],
    encode: Callable[[str], list[int]],
    bos: int,
    eos: int,
    unk: int | None = None,
    max_batch_tokens: int = 1 << 16,
    progress_bar=None,
    spell: Callable[[str], float] | None = None,
) -> PerplexityResult:
    """Score every line of `lines` as `bos + encode(line) + eos` (a line's newline, where it has
    one, is not encoded: </s> stands for it; it counts in bytes).

    Lines are batched up to `max_batch_tokens` padded tokens per `model.token_logprobs` call.
    `spell(line)`, for a closed vocabulary, is the log10 probability of spelling out the line's
    unknown words; it counts in `nats`, bits per byte and perplexity per word (so every model
    pays for the whole text), not in KenLM's `perplexity`."""
    res = PerplexityResult(lines=0, tokens=0, oovs=0, bytes=0, log10_prob=0.0, log10_prob_oovs=0.0)
    batch: list[list[int]] = []
    width = 0
    device = model_device(model)
    started = time.perf_counter()

    def flush():
        nonlocal batch, width
        if not batch:
            return
        lengths = np.fromiter(map(len, batch), np.int64, len(batch))
        inside = np.arange(width)[None, :] < lengths[:, None]
        rows = np.full((len(batch), width), eos, np.int64)
        rows[inside] = np.fromiter(itertools.chain.from_iterable(batch), np.int64, int(lengths.sum()))
        with torch.no_grad():
            lp = model.token_logprobs(torch.from_numpy(rows).to(device)).double().cpu().numpy() / math.log(10.0)
        target = rows[:, 1:]
        real = inside[:, 1:]
        res.log10_prob += float(lp[real].sum())
        if unk is not None:
            res.log10_prob_oovs += float(lp[real & (target == unk)].sum())
        if progress_bar is not None:
            progress_bar.update(len(batch))
        batch, width = [], 0

    for line in lines:
        res.bytes += len(line.encode("utf-8"))  # its newline included, if it has one (a file's last may not)
        line = line[:-1] if line.endswith("\n") else line
        ids = encode(line)
        res.lines += 1
        res.tokens += len(ids) + 1
        res.words += count_words(line)
        if unk is not None:
            n_oov = sum(1 for i in ids if i == unk)
            res.oovs += n_oov
            if n_oov and spell is not None:
                res.log10_prob_spelling += spell(line)
        seq = [bos, *ids, eos]
        if batch and max(width, len(seq)) * (len(batch) + 1) > max_batch_tokens:
            flush()
        batch.append(seq)
        width = max(width, len(seq))
    flush()
    res.seconds = time.perf_counter() - started
    return res


def resolve_window(model, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride) for stream mode: defaults, and a clear error for impossible values."""
    limit = getattr(model, "max_context", None)
    if context is None:
        context = limit or DEFAULT_CONTEXT
    if context < 1:
        raise InputError(f"--context must be >= 1 token, got {context}")
    if limit is not None and context > limit:
        raise ContextLengthError(
            f"--context {context} is longer than the model's context of {limit} tokens; pass --context {limit} or less"
        )
    if stride is None:
        stride = max(1, context // 2)
    if not 1 <= stride <= context:
        raise InputError(f"--stride must be between 1 and the context ({context}), got {stride}")
    return context, stride


def window_logprobs(
    model: LanguageModel, ids: np.ndarray, context: int, stride: int, max_batch_tokens: int = 1 << 16, progress_bar=None
) -> np.ndarray:
    """Natural-log p(ids[t] | up to `context` earlier ids) for t = 1..len-1, each token once.

    Window k reads ids[kS : kS + C] and predicts ids[kS + 1 : kS + C + 1]; it keeps only the
    predictions of tokens no earlier window scored (all of the first window's, then the last S)."""
    n = len(ids) - 1
    windows = []  # (start, end, keep): inputs ids[start:end], targets up to ids[end], keep the last `keep`
    done, start = 0, 0
    while done < n:
        end = min(start + context, n)
        windows.append((start, end, end - done))
        done, start = end, start + stride
    out = np.empty(n, np.float64)
    width = context * max(1, model.vocab_size)
    per_batch = max(1, min(max_batch_tokens // (context + 1), _MAX_BATCH_FLOATS // width))
    device = model_device(model)
    pos = 0
    for _, group in itertools.groupby(windows, key=lambda w: w[1] - w[0]):
        group = list(group)
        for i in range(0, len(group), per_batch):
            batch = group[i : i + per_batch]
            rows = np.stack([ids[s : e + 1] for s, e, _ in batch])
            with torch.no_grad():
                lp = model.token_logprobs(torch.from_numpy(rows).to(device)).double().cpu().numpy()
            for row, (_, _, keep) in zip(lp, batch):
                out[pos : pos + keep] = row[len(row) - keep :]
                pos += keep
            if progress_bar is not None:
                progress_bar.update(int(sum(keep for _, _, keep in batch)))
    return out


def stream_perplexity(
    model: LanguageModel,
    documents: Iterable[str],
    encode: Callable[[str], list[int]],
    eot: int,
    context: int | None = None,
    stride: int | None = None,
    max_batch_tokens: int = 1 << 16,
    progress_bar=None,
) -> PerplexityResult:
    """Score `documents` as one stream `eot doc1 eot doc2 eot ...` with a sliding window (see the
    module docstring); `context` defaults to the model's own (else 1024), `stride` to half of it."""
    context, stride = resolve_window(model, context, stride)
    started = time.perf_counter()
    res = PerplexityResult(
        lines=0, tokens=0, oovs=0, bytes=0, log10_prob=0.0, log10_prob_oovs=0.0, mode="stream", context=context, stride=stride
    )
    parts = [[eot]]
    for doc in documents:
        if progress_bar is not None:  # tokenizing a large text takes a while too: say what is happening
            progress_bar.set_description_str(f"tokenizing ({res.bytes / 1e6:.1f} MB read)")
        parts.append(encode(doc))
        parts.append([eot])
        lines = split_lines(doc)
        res.lines += len(lines)
        res.words += sum(map(count_words, lines))
        res.bytes += len(doc.encode("utf-8"))
    ids = np.fromiter(itertools.chain.from_iterable(parts), np.int64)
    if len(ids) < 2:
        raise InputError("no text to score; pass at least one non-empty file")
    if progress_bar is not None:
        progress_bar.set_description_str("scoring")
        progress_bar.reset(total=len(ids) - 1)
    lp = window_logprobs(model, ids, context, stride, max_batch_tokens, progress_bar)
    res.tokens = len(lp)
    res.log10_prob = float(lp.sum()) / math.log(10.0)
    res.seconds = time.perf_counter() - started
    return res


PSEUDO_NOTE = (
    "pseudo-perplexity (Salazar et al. 2020): each token scored by the masked LM with only that "
    "token masked, given both sides; not a probability of the text, so not comparable with the "
    "perplexity of causal models"
)


def pseudo_perplexity(
    model, lines: Iterable[str], encode: Callable[[str], list[int]], batch_size: int = 64, progress_bar=None
) -> PerplexityResult:
    """A masked LM's pseudo-log-likelihood of every line, `[CLS] line [SEP]` (mode "pseudo"):
    its `perplexity` is then the pseudo-perplexity exp(-PLL / tokens). A line longer than the
    model's context is scored in consecutive pieces that fit."""
    cfg = model.config
    marks = [t for t in (cfg.cls_token_id, cfg.sep_token_id) if t is not None]
    room = model.max_context - len(marks)
    started = time.perf_counter()
    res = PerplexityResult(lines=0, tokens=0, oovs=0, bytes=0, log10_prob=0.0, log10_prob_oovs=0.0, mode="pseudo")
    device = model_device(model)
    for line in lines:
        res.bytes += len(line.encode("utf-8"))  # its newline included, if it has one
        line = line[:-1] if line.endswith("\n") else line
        ids = encode(line)
        res.lines += 1
        res.words += count_words(line)
        res.tokens += len(ids)
        for i in range(0, len(ids), room):
            piece = ids[i : i + room]
            seq = ([cfg.cls_token_id] if cfg.cls_token_id is not None else []) + piece
            seq += [cfg.sep_token_id] if cfg.sep_token_id is not None else []
            pll = model.pseudo_log_likelihood(torch.tensor([seq], device=device), batch_size=batch_size)
            res.log10_prob += float(pll.sum()) / math.log(10.0)
        if progress_bar is not None:
            progress_bar.update(1)
    res.seconds = time.perf_counter() - started
    return res


# --- one call for any checkpoint (what `eval perplexity` and `eval compare` run) -------------

MODES = ("lines", "stream", "pseudo")
#: what a progress bar passed to `measure` counts in each mode
PROGRESS_UNITS = {"lines": "line", "stream": "tok", "pseudo": "line"}


def text_codec(model, tokenizer) -> dict:
    """How text becomes the model's ids: the n-gram's own vocabulary, or the checkpoint's
    tokenizer with its end-of-text token as both sentence start and end."""
    # (BERT and T5 have an `encode` of their own, over ids; the vocabulary ids tell them apart)
    if all(hasattr(model, a) for a in ("encode", "bos_id", "eos_id", "unk_id")):
        return {
            "encode": model.encode,
            "bos": model.bos_id,
            "eos": model.eos_id,
            "unk": model.unk_id,
            "spell": model.oov_spelling_log10,
        }
    if tokenizer is None or tokenizer.eot_id is None:
        raise InputError("this checkpoint has no tokenizer with an end-of-text token; save one with the model")
    return {"encode": tokenizer.encode, "bos": tokenizer.eot_id, "eos": tokenizer.eot_id, "unk": None}


class SourceFree(LanguageModel):
    """An encoder-decoder (T5) as a causal LM of text: p(y) = p(y | an empty source, just </s>),
    so its decoder is measured as the other families are. Rows start with the decoder's start
    token, which is only context; only `token_logprobs` (what perplexity needs) is provided."""

    max_context = None

    def __init__(self, seq2seq):
        self.seq2seq, self.family, self.vocab_size = seq2seq, seq2seq.family, seq2seq.config.vocab_size

    def parameters(self):
        return self.seq2seq.parameters()

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        source = tokens.new_full((tokens.shape[0], 1), self.seq2seq.config.eos_token_id)
        target = tokens[:, 1:]  # teacher forcing from the start token
        return self.seq2seq.target_logprobs(source, target).gather(-1, target[..., None]).squeeze(-1)


def default_mode(model) -> str:
    """pseudo for a masked LM, lines for a model with sentence marks of its own (the n-gram) and
    for an encoder-decoder (each line a target), stream for the rest."""
    if hasattr(model, "pseudo_log_likelihood"):
        return "pseudo"
    return "lines" if hasattr(model, "bos_id") or hasattr(model, "log_prob") else "stream"


def measure(
    model,
    tokenizer,
    documents: Iterable[str],
    mode: str | None = None,
    context: int | None = None,
    stride: int | None = None,
    max_batch_tokens: int = 1 << 16,
    progress_bar=None,
) -> PerplexityResult:
    """Score whole documents (e.g. one per file) in `mode` (default: `default_mode(model)`)."""
    family = getattr(model, "family", type(model).__name__)
    mode = mode or default_mode(model)
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if (mode == "pseudo") != hasattr(model, "pseudo_log_likelihood"):
        want = "pseudo" if mode != "pseudo" else default_mode(model)
        raise InputError(f"--mode {mode} does not apply to a {family} model; use --mode {want}")
    if (context is not None or stride is not None) and mode != "stream":
        raise InputError("--context and --stride apply to --mode stream only")
    lines = (line for doc in documents for line in split_lines(doc, keepends=True))  # bytes count real newlines
    if (mode == "pseudo" or hasattr(model, "log_prob")) and tokenizer is None:
        raise InputError(f"this {family} checkpoint has no tokenizer.json; save one with the model")
    if mode == "pseudo":
        return pseudo_perplexity(model, lines, tokenizer.encode, progress_bar=progress_bar)
    if hasattr(model, "log_prob"):  # encoder-decoder: each line a target, after the decoder's start token
        if mode != "lines":
            raise InputError(f"a {family} model scores each line as a target; use --mode lines")
        cfg = model.config
        model = SourceFree(model)
        codec = {"encode": tokenizer.encode, "bos": cfg.decoder_start_token_id, "eos": cfg.eos_token_id, "unk": None}
    elif isinstance(model, LanguageModel):
        codec = text_codec(model, tokenizer)
    else:
        raise InputError(
            f"a {family} model is not a language model of text; eval perplexity scores n-gram, "
            "feed-forward, RNN, GPT and T5 checkpoints (and BERT by pseudo-perplexity)"
        )
    if mode == "lines":
        return perplexity(model, lines, max_batch_tokens=max_batch_tokens, progress_bar=progress_bar, **codec)
    if codec["bos"] != codec["eos"]:
        raise InputError(f"a {family} model scores sentences between its own <s> and </s>; use --mode lines")
    return stream_perplexity(model, documents, codec["encode"], codec["eos"], context, stride, max_batch_tokens, progress_bar)

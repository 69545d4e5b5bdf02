"""`lmstack quickstart`: the whole story of language modelling on one small corpus, in minutes.

It calls the layers below in the order a textbook tells the story: split the corpus (the last
~10% of lines held out), train a byte-level BPE tokenizer, a word 5-gram and a subword 5-gram
(modified Kneser-Ney), an LSTM and a small GPT (the training engine, for a fixed number of
steps), score the four models on the held-out text in bits per byte, sample from every model
with several temperatures and truncations, ask every model how likely a held-out sentence is
beside the same words scrambled, and write a report that tells what happened and why.

The work is counted in steps, not seconds, so the same command and seed give the same table on
any CPU under any load; `--minutes` scales the steps (the default 10 is about ten minutes on a
quiet 2-core CPU). Everything is built in a hidden directory beside `--out` and renamed into
place at the end, so a run that fails or is interrupted leaves no half-written results.

The table is `lmstack eval compare`'s (`lmstack.evaluation.compare`): each model scored in its
default mode, the n-grams line by line between their sentence marks, the neural models reading
the held-out text as one stream through a sliding window of their context.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import atomic_write, check_output_dir, output_dir, read_text, write_json

CORPUS_NAME = "tinyshakespeare.txt"
MIN_LINES = 20  # enough to hold out a tenth and still train on something
MIN_BYTES = 2_000
TOKENIZER_VOCAB = 512  # small: short sequences for the n-gram, cheap softmax for the neural nets
NGRAM_ORDER = 5
DEFAULT_MINUTES = 10.0
# Optimizer steps at --minutes 10: the whole run took 11 minutes on a 2-core CPU at load 1-2
# (benchmarks/RESULTS.md, "Quickstart"); --minutes scales them.
# The GPT gets most of the time: it is the model that turns compute into bits per byte best.
STEPS = {"lstm": 600, "gpt": 6500}
MIN_STEPS = 4
# Training runs on one CPU thread whatever the machine: with more, the gradients' sums over the
# batch are added in another order, and over thousands of steps that moved the table's last
# digits; one thread also never fights other work for the cores. (Scoring and sampling, forward
# passes that come out the same on any number of threads, use cpu_threads().)
TRAIN_THREADS = 1
WARMUP_FRACTION = 0.01
CURVE_POINTS = 16  # held-out evaluations per run, for the curves (at most one every MIN_EVAL_INTERVAL steps)
MIN_EVAL_INTERVAL = 10
# Recipes for a 2-core CPU: small batches (in a few CPU-minutes many small steps beat few large
# ones). The GPT reads the training text ~13 times, so what decides its score is how little it
# memorises: rotary positions (shared by every offset, where learned ones are fitted per position)
# and a strong weight decay took it from 2.209 to 2.092 bits per byte; dropout did worse in these
# few steps (benchmarks/RESULTS.md, "Quickstart"; benchmarks/quickstart_gpt.py tries variants).
RECIPES = {
    "lstm": dict(
        family="rnn",
        block_size=64,
        batch_size=16,
        lr=4e-3,
        min_lr=4e-4,
        weight_decay=0.0,
        grad_clip=1.0,
        model=dict(cell="lstm", d_embed=256, d_hidden=256, n_layers=2, dropout=0.1),
    ),
    "gpt": dict(
        family="gpt",
        block_size=128,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        weight_decay=0.5,
        beta2=0.99,
        grad_clip=1.0,
        model=dict(n_layer=3, n_head=4, n_embd=128, dropout=0.0, pos="rope"),
    ),
}
SAMPLING = {  # name -> GenerationConfig options
    "temperature 0 (greedy)": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "temperature 1.0": dict(temperature=1.0),
    "top-k 40": dict(temperature=1.0, top_k=40),
    "top-p 0.9": dict(temperature=1.0, top_p=0.9),
}
SAMPLE_BYTES = 240  # of text per sample, a few lines: tokens = SAMPLE_BYTES / the model's bytes per held-out token
SAMPLE_LINES = 12  # at most, for an n-gram (its blank lines cost one token each)
MEAN_WORD_CHARS = 12  # text whose whitespace-separated "words" are longer is written without spaces (Chinese)
SENTENCE_UNITS = {True: (5, 12), False: (6, 24)}  # words (spaced text) or characters (unspaced) of the default sentence


@dataclass
class Row:
    """One line of the comparison table: the same on every machine for the same seed."""

    model: str
    mode: str  # how it read the held-out text: "lines" (each between sentence marks) or "stream"
    params: int  # weights, or stored probabilities and back-offs for an n-gram
    train_tokens: int  # tokens read in training: the training text once (n-grams), steps x batch x context (neural)
    bits_per_byte: float
    ppl_token: float
    ppl_unit: float  # per word, or per character (line ends included) for text without spaces: results.json "unit"
    tokens: int
    oovs: int  # held-out tokens outside a closed vocabulary, scored as <unk>
    path: str


def shipped_corpus() -> Path:
    return Path(str(resources.files("lmstack") / "assets" / CORPUS_NAME))


def split_corpus(path: Path, work: Path) -> dict[str, Path]:
    """Train and held-out files: the last ~10% of the lines held out."""
    text = read_text(path)  # names the file if missing, empty, binary or not UTF-8
    lines = text.splitlines()
    if len(lines) < MIN_LINES or len(text.encode("utf-8")) < MIN_BYTES:
        raise InputError(
            f"{path}: too small to split into training and held-out text ({len(lines)} lines); "
            f"pass a corpus of at least {MIN_LINES} lines and {MIN_BYTES} bytes"
        )
    cut = len(lines) - max(len(lines) // 10, 1)
    parts = {"train": lines[:cut], "heldout": lines[cut:]}
    if not any(s.strip() for s in parts["heldout"]):
        raise InputError(f"{path}: the held-out last tenth of the lines is blank; pass a corpus with text throughout")
    out = {}
    for name, part in parts.items():
        out[name] = work / f"{name}.txt"
        out[name].write_text("".join(s + "\n" for s in part), encoding="utf-8")
    return out


def is_spaced(text: str) -> bool:
    """Whether the text separates words with spaces (English) or not (Chinese, Japanese): a
    perplexity per word means something only for the first."""
    words = text.split()
    return sum(map(len, words)) <= MEAN_WORD_CHARS * max(len(words), 1)


def scaled_steps(minutes: float) -> dict[str, int]:
    """Optimizer steps of each neural model: STEPS scaled by minutes / DEFAULT_MINUTES."""
    return {name: max(MIN_STEPS, round(n * minutes / DEFAULT_MINUTES)) for name, n in STEPS.items()}


def cpu_threads() -> int:
    """Torch's threads for CPU work: all cores on an idle machine, one when other work already
    fills them (an oversubscribed thread pool spins, and ran 3-5x slower per step on a loaded
    2-core machine). Forward passes give the same numbers on any count; training's gradient sums
    do not, so the quickstart trains on TRAIN_THREADS."""
    import torch

    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), round(cores - os.getloadavg()[0])))


def machine(threads: int, device: str) -> dict:
    """What the run's times were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (s.split(":", 1)[1].strip() for s in Path("/proc/cpuinfo").read_text().splitlines() if s.startswith("model name")),
            cpu,
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,  # for scoring and sampling; training uses TRAIN_THREADS
        "train_threads": TRAIN_THREADS,
        "load_at_start": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "device": device,
    }


def _stage(n: int, title: str) -> None:
    print(f"[{n}/7] {title}", flush=True)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


# --- training ----------------------------------------------------------------------------------


def train_tokenizer(files: dict[str, Path], out: Path):
    from lmstack.tokenizers import EOT
    from lmstack.tokenizers.bpe import BPETokenizer

    tok = BPETokenizer.train_files([files["train"]], vocab_size=TOKENIZER_VOCAB, special_tokens=(EOT,))
    tok.save(out)
    return tok


def train_ngram(files: dict[str, Path], out: Path, tokenizer=None):
    from lmstack.models.ngram import NGramLM

    # a small --corpus may have too few repeated 5-grams to estimate discounts: then lmplz's fallback
    model = NGramLM.train([files["train"]], order=NGRAM_ORDER, tokenizer=tokenizer, discount_fallback=True)
    model.save(out)
    return model


def prepare_data(files: dict[str, Path], tok, tok_dir: Path, out: Path) -> Path:
    """Token shards whose validation split is exactly the held-out lines (the engine cuts the
    last `val_fraction` of the bytes; half a byte of slack keeps the rounding on the boundary)."""
    from lmstack.data.shards import prepare_shards

    paths = [files["train"], files["heldout"]]
    total = sum(p.stat().st_size for p in paths)
    prepare_shards(paths, tok, out, val_fraction=(paths[1].stat().st_size + 0.5) / total)
    tok.save(out / "tokenizer.json")
    return out


def train_neural(name: str, shards: Path, out: Path, steps: int, device: str, seed: int) -> Path:
    """Train RECIPES[name] for `steps` optimizer steps (no time budget: the same work on every
    machine) on TRAIN_THREADS CPU threads, validating CURVE_POINTS times; returns the final checkpoint."""
    import torch

    from lmstack.training import checkpoint
    from lmstack.training.config import TrainConfig
    from lmstack.training.pretrain import train

    cfg = TrainConfig(
        out_dir=str(out),
        data=[str(shards)],
        tokenizer=str(shards / "tokenizer.json"),
        device=device,
        seed=seed,
        max_steps=steps,
        warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
        eval_interval=max(MIN_EVAL_INTERVAL, steps // CURVE_POINTS),
        eval_batches=8,
        ckpt_interval=0,
        keep_last=1,
        **RECIPES[name],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        stopped = train(cfg)["stopped"]
    finally:
        torch.set_num_threads(threads)
    if stopped == "signal":  # the engine saved and returned on SIGINT / SIGTERM: stop too
        raise KeyboardInterrupt
    return checkpoint.latest(out)


def neural_tokens(name: str, steps: int) -> int:
    return steps * RECIPES[name]["batch_size"] * RECIPES[name]["block_size"]


# --- measuring ---------------------------------------------------------------------------------


def evaluate(models: dict[str, tuple], heldout: Path) -> list[dict]:
    """`lmstack eval compare`'s rows for (model, tokenizer) pairs on the held-out file."""
    from lmstack.evaluation.compare import compare

    return compare(list(models.values()), [heldout])


def sentence_log2(model, tokenizer, sentence: str) -> float:
    """log2 p(<s> sentence </s>) under the model (unknown words spelled out, see eval perplexity)."""
    from lmstack.evaluation.perplexity import perplexity, text_codec

    return -perplexity(model, [sentence], **text_codec(model, tokenizer)).nats / math.log(2.0)


def sentence_pair(heldout: list[str], spaced: bool, seed: int, sentence: str | None = None) -> tuple[str, str]:
    """A grammatical sentence in the corpus's own language and its words (characters, for text
    without spaces) shuffled: by default the first held-out line (up to its first full stop,
    for text without spaces) of a middling length, which no model has seen."""
    split = str.split if spaced else lambda s: [c for c in s if not c.isspace()]
    if sentence is None:
        low, high = SENTENCE_UNITS[spaced]
        lines = [s.strip() if spaced else re.split(r"(?<=[。！？.!?])", s.strip())[0] for s in heldout]
        sentence = next((s for s in lines if low <= len(split(s)) <= high), max(lines, key=lambda s: len(split(s))))
    units = split(sentence)
    if len(set(units)) < 2:
        raise InputError(f"the sentence {sentence!r} has fewer than two different words to scramble; pass --sentence")
    scrambled, rng = list(units), random.Random(seed)
    while scrambled == units:
        rng.shuffle(scrambled)
    return sentence.strip(), (" " if spaced else "").join(scrambled)


def whole_text(text: str) -> str:
    """`text` without trailing whitespace or U+FFFD: a character whose bytes were cut by the token
    limit (or never finished by an undertrained model) decodes as U+FFFD."""
    return re.sub(r"[\s\ufffd]+\Z", "", text)


def samples(model, tokenizer, prompt: str, seed: int, max_new_tokens: int) -> dict[str, str]:
    """The prompt continued under each decoding setting in SAMPLING, for about `max_new_tokens`
    tokens or up to the end of the text, stopping on a whole character. An n-gram models one line
    at a time: after its </s> the next line starts afresh from <s>, so its samples run across
    lines as the neural models' do (up to SAMPLE_LINES; greedy decoding stops at its second line,
    as every later one would repeat it)."""
    from lmstack.evaluation.perplexity import text_codec
    from lmstack.generation import GenerationConfig, generate_tokens

    codec = text_codec(model, tokenizer)
    decode = model.decode if hasattr(model, "encode") else tokenizer.decode
    by_line = codec["bos"] != codec["eos"]  # sentence marks <s> ... </s> (n-grams), not one end-of-text
    limit = getattr(model, "max_context", None)  # a GPT's sample ends where its context does
    out = {}
    for name, opts in SAMPLING.items():
        context = codec["encode"](prompt)
        lines, left = [], max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - 1 - len(context)))
        while left > 0:
            config = GenerationConfig(max_new_tokens=left, seed=seed + len(lines), stop_at_eot=False, **opts)
            ids = generate_tokens(model, [[codec["bos"], *context]], config)[0].tokens
            ended = codec["eos"] in ids
            ids = ids[: ids.index(codec["eos"])] if ended else ids
            # the prompt as the user wrote it, not as a word model decodes it (an unknown word is <unk>)
            lines.append(("" if lines else prompt) + whole_text(decode(context + ids))[len(decode(context)) :])
            left -= len(ids) + 1
            if not (ended and by_line) or len(lines) == (2 if config.greedy else SAMPLE_LINES):
                break
            context = []
        out[name] = whole_text("\n".join(lines)) or prompt
    return out


def default_prompt(heldout: list[str]) -> str:
    """The first word of the first held-out line with a few words (its first two characters for
    text written without spaces, such as Chinese)."""
    line = next((s for s in heldout if len(s.split()) >= 3), None) or next(s for s in heldout if s.strip())
    words = line.split()
    return words[0] if len(words) >= 3 else line.strip()[:2]


def final_losses(run: Path) -> dict[str, float]:
    """The run's last held-out loss (None if the held-out text is shorter than its context) and
    its training loss over the last tenth of the steps (one step's loss is noisy), in nats per token."""
    from lmstack.training.metrics import read_metrics

    recs = read_metrics(run)
    train = [r["loss"] for r in recs if "loss" in r]
    val = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
    tail = train[-max(1, len(train) // 10) :]
    return {"train": sum(tail) / len(tail), "heldout": val[-1] if val else None}


# --- report ------------------------------------------------------------------------------------


def _figure(x: float) -> str:
    """A perplexity to four significant figures, large ones with thousands separators (93,580)."""
    return f"{float(f'{x:.4g}'):,.0f}" if 1e4 <= x < 1e15 else f"{x:.4g}"


def table(rows: list[Row], unit: str) -> str:
    head = (
        f"| model | scored | parameters | training tokens | bits/byte | ppl/token | ppl/{unit} |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r.model} | {r.mode} | {r.params:,} | {r.train_tokens:,} | {r.bits_per_byte:.3f} | "
        f"{_figure(r.ppl_token)} | {_figure(r.ppl_unit)} |\n"
        for r in rows
    )


def plot_curves(
    runs: dict[str, Path],
    path: Path,
    title: str = "Training curves",
    bits_per_byte: dict[str, float] | None = None,
    references: dict[str, float] | None = None,
) -> str | None:
    """Training and held-out loss against tokens seen for the neural runs; None, or why it was
    skipped. With `bits_per_byte` ({"train": tokens per byte, "held-out": tokens per byte}) the
    losses are drawn in bits per byte, so `references` (label -> bits per byte, e.g. the n-grams'
    held-out figures) can be drawn as horizontal lines beside them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lmstack[plot]'), so no curves.png"
    from lmstack.io import atomic_path
    from lmstack.training.metrics import read_metrics

    scale = {k: v / math.log(2.0) for k, v in bits_per_byte.items()} if bits_per_byte else {"train": 1.0, "held-out": 1.0}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ends = []  # each run's last training and held-out figures, to keep in view (the gap between them)
    for name, run in runs.items():
        recs = read_metrics(run)
        train = [(r["tokens"], r["loss"] * scale["train"]) for r in recs if "loss" in r]
        k = max(1, len(train) // 100)  # one step's loss is noisy: a running mean over 1% of the run
        train = [(train[i][0], sum(y for _, y in train[i + 1 - k : i + 1]) / k) for i in range(k - 1, len(train))]
        val = [(r["tokens"], r["val_loss"] * scale["held-out"]) for r in recs if r.get("val_loss") is not None]
        (line,) = ax.plot(*zip(*train), alpha=0.5, label=f"{name} train (running mean)")
        ends.append(train[-1][1])
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} held-out")
            ends.append(val[-1][1])
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{label} held-out ({value:.3f})")
    ax.set_title(title)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("bits per byte" if bits_per_byte else "loss (nats per token)")
    if bits_per_byte and references:  # the first losses are far above: zoom on where the models end
        ax.set_ylim(min([*references.values(), *ends]) * 0.9, max([*references.values(), *ends]) * 1.3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return None


def story(res: dict) -> str:
    """What the numbers say, in prose: which model is best and why, what each was given, what
    the curves show, and which results are surprising."""
    rows = {r["model"]: r for r in res["table"]}
    given = res["given"]
    best = min(rows.values(), key=lambda r: r["bits_per_byte"])
    ngrams = [r for r in rows.values() if r["mode"] == "lines"]
    best_ngram = min(ngrams, key=lambda r: r["bits_per_byte"])
    gpt, lstm = rows["GPT"], rows["LSTM"]
    gain = 100 * (1 - gpt["bits_per_byte"] / best_ngram["bits_per_byte"])
    out = [
        f"**The {best['model']} is best** at {best['bits_per_byte']:.3f} bits per byte of held-out text. "
        + (
            f"The GPT is {gain:.1f}% below the best n-gram ({best_ngram['model']}, {best_ngram['bits_per_byte']:.3f}): "
            f"an n-gram predicts from the last {NGRAM_ORDER - 1} tokens and only from sequences it has counted, while "
            f"the GPT attends to up to {RECIPES['gpt']['block_size']} tokens and shares what it learns between similar "
            "words and contexts. "
            if gain > 0
            else f"Surprisingly, the GPT is not ahead of the best n-gram ({best_ngram['model']}, "
            f"{best_ngram['bits_per_byte']:.3f}): it was trained for {given['GPT']['steps']:,} steps only; a larger "
            "--minutes gives it more. "
        )
        + (
            "The subword 5-gram beats the word 5-gram: the word model has never seen many held-out words and must "
            "spell them out, while subwords cover any text."
            if rows["subword 5-gram"]["bits_per_byte"] < rows["word 5-gram"]["bits_per_byte"]
            else ""
        )
        + "\n"
    ]
    epochs = {m: given[m]["tokens"] / res["train_text_tokens"] for m in ("LSTM", "GPT")}
    out.append(
        f"\n**What each model was given.** The n-grams count the training text once "
        f"({rows['word 5-gram']['train_tokens']:,} words, {res['train_text_tokens']:,} BPE tokens) in "
        f"{given['word 5-gram']['seconds'] + given['subword 5-gram']['seconds']:.0f} s. The LSTM "
        f"({lstm['params']:,} parameters) trained for {given['LSTM']['steps']:,} steps ({given['LSTM']['tokens']:,} "
        f"tokens, {epochs['LSTM']:.1f} passes over the text) in {given['LSTM']['seconds']:.0f} s; the GPT "
        f"({gpt['params']:,} parameters) for {given['GPT']['steps']:,} steps ({given['GPT']['tokens']:,} tokens, "
        f"{epochs['GPT']:.1f} passes) in {given['GPT']['seconds']:.0f} s. The steps are fixed (scaled by --minutes), "
        "so the table is the same on any machine; only the times change.\n"
    )
    gap = res["gpt_final_bits_per_byte"]
    if gap["heldout"] is not None:
        out.append(
            f"\n**The curves** (`curves.png`, in bits per byte, the n-grams as horizontal lines): the GPT ends at "
            f"{gap['train']:.3f} bits per byte on its training batches and {gap['heldout']:.3f} on held-out batches, "
            + (
                "nearly the same: it is not overfitting yet, and more steps would still help."
                if gap["heldout"] - gap["train"] <= 0.05
                else f"a gap of {gap['heldout'] - gap['train']:.3f} after {epochs['GPT']:.0f} passes over the training "
                "text: what it learned of that text that does not carry over to new text (memorised passages, and a "
                "held-out stretch unlike the rest)."
                if epochs["GPT"] >= 2
                else f"a gap of {gap['heldout'] - gap['train']:.3f}, after less than two passes over the training text: "
                "the held-out text is harder to predict than the training text, rather than memorised."
            )
            + " (Held-out batches are random windows, so they see less context than the table's sliding window.)\n"
        )
    surprises = [
        f"the {name} prefers the scrambled sentence (by 2^{s['scrambled'] - s['grammatical']:.1f})"
        if s["scrambled"] - s["grammatical"] >= 0.05
        else f"the {name} cannot tell the held-out sentence from its scramble"
        for name, s in res["sentences"]["log2"].items()
        if s["scrambled"] - s["grammatical"] > -0.05
    ]
    if lstm["bits_per_byte"] > best_ngram["bits_per_byte"]:
        surprises.append(
            f"the LSTM ({lstm['bits_per_byte']:.3f}) is behind the {best_ngram['model']}: it had "
            f"{given['LSTM']['steps']:,} steps to the GPT's {given['GPT']['steps']:,}"
        )
    word = rows["word 5-gram"]
    if word["oovs"] > 0.05 * word["tokens"]:
        surprises.append(
            f"{100 * word['oovs'] / word['tokens']:.0f}% of the held-out words are unknown to the word 5-gram"
            + ("" if res["unit"] == "word" else ", as it takes each line of text without spaces for one word")
        )
    if surprises:
        text = "; ".join(surprises)
        out.append(f"\n**Surprises.** {text[0].upper()}{text[1:]}.\n")
    return "".join(out)


def write_report(out: Path, res: dict) -> None:
    rows = [Row(**r) for r in res["table"]]
    unit = res["unit"]
    sent = res["sentences"]
    md = [
        f"# lmstack quickstart\n\nCorpus: `{res['corpus']}`: {res['train_lines']:,} lines to train on, the last "
        f"{res['heldout_lines']:,} held out; text {'with' if unit == 'word' else 'without'} spaces between words, so the "
        f"table's last column is perplexity per {unit}.\n\n",
        story(res),
        "\n## The table\n\nScored as `lmstack eval compare` scores: the n-grams line by line (`lines`, each as "
        "`<s> line </s>`), the neural models reading the held-out text as one stream through a sliding window of "
        f"their context (`stream`). Bits per byte and perplexity per {unit} divide by the text's bytes and {unit}s, "
        "so models with different vocabularies compare (lower is better).\n\n",
        table(rows, unit),
        "\n![training curves](curves.png)\n" if res["curves"] else "",
        f"\n## Samples\n\nEvery model continues the prompt `{res['prompt']}` with each decoding strategy "
        f"(about {SAMPLE_BYTES} bytes of text; an n-gram starts a new line after its end of sentence).\n",
    ]
    for strategy in SAMPLING:
        md.append(f"\n### {strategy}\n")
        md += [f"\n**{name}**\n\n```text\n{texts[strategy]}\n```\n" for name, texts in res["samples"].items()]
    md.append(
        "\n## A held-out sentence versus the same words scrambled (log2 probability)\n\n"
        f"| model | `{sent['grammatical']}` | `{sent['scrambled']}` | ratio |\n|---|---:|---:|---:|\n"
    )
    for name, s in sent["log2"].items():
        flag = " (prefers the scramble)" if s["scrambled"] >= s["grammatical"] else ""
        ratio = s["grammatical"] - s["scrambled"]
        md.append(f"| {name} | {s['grammatical']:.1f} | {s['scrambled']:.1f} | 2^{ratio:.1f}{flag} |\n")
    m = res["machine"]
    md.append(
        f"\n## Time and machine\n\n{m['cpu']}, {m['cores']} cores, {m['train_threads']} torch thread for training and "
        f"{m['threads']} for scoring and sampling, torch {m['torch']}, "
        f"device {m['device']}, load average {m['load_at_start']} at the start. The whole run took "
        f"{res['seconds']['total']:.0f} s:\n\n| stage | seconds |\n|---|---:|\n"
        + "".join(f"| {k} | {v:.1f} |\n" for k, v in res["seconds"].items() if k != "total")
    )
    md.append(
        "\n## Files\n\n"
        + "".join(f"- `{r.path}`: {r.model}\n" for r in rows)
        + "- `tokenizer/`: the BPE tokenizer\n- `results.json`: this report's numbers\n"
        + ("- `curves.png`: training curves\n" if res["curves"] else "")
    )
    if res["notes"]:
        md.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in res["notes"]))
    with atomic_write(out / "report.md") as f:
        f.write("".join(md))


# --- the run -----------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Before any work: --out is new, empty or an earlier quickstart's output, the only folder a
    run may replace (never a file, never a folder of the user's own)."""
    check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").exists():
        raise InputError(
            f"--out {out}: a folder that holds other files, not an earlier quickstart's output; "
            "pick a new or empty folder (quickstart replaces its --out)"
        )


def run(
    corpus: str | Path | None = None,
    out: str | Path = "runs/quickstart",
    minutes: float = DEFAULT_MINUTES,
    device: str = "auto",
    seed: int = 1337,
    prompt: str | None = None,
    sentence: str | None = None,
) -> dict:
    """Run the quickstart; returns what results.json holds."""
    import torch

    import lmstack
    from lmstack.data.shards import TokenShards
    from lmstack.evaluation.perplexity import count_words
    from lmstack.training.distributed import pick_device

    if not minutes > 0:
        raise InputError(f"--minutes must be positive, got {minutes}")
    if sentence is not None and not sentence.strip():
        raise InputError("--sentence is empty; pass a sentence in the corpus's language")
    corpus = Path(corpus) if corpus else shipped_corpus()
    out = Path(out)
    steps = scaled_steps(minutes)
    check_out(out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, output_dir(out, "--out", replace=True) as stage:
        work = Path(scratch)
        _stage(1, f"splitting {corpus}")
        files = split_corpus(corpus, work)
        train_lines = files["train"].read_text(encoding="utf-8").splitlines()
        heldout_text = files["heldout"].read_text(encoding="utf-8")
        heldout_bytes = files["heldout"].stat().st_size
        heldout = heldout_text.splitlines()
        spaced = is_spaced(heldout_text)
        unit = "word" if spaced else "character"
        sentence, scrambled = sentence_pair(heldout, spaced, seed, sentence)
        threads = cpu_threads()
        torch.set_num_threads(threads)
        about = machine(threads, str(pick_device(device)))

        _stage(2, f"training a byte-level BPE tokenizer ({TOKENIZER_VOCAB} tokens)")
        with _timed(seconds, "BPE tokenizer"):
            tok = train_tokenizer(files, stage / "tokenizer")
        _stage(3, f"counting a word {NGRAM_ORDER}-gram and a subword {NGRAM_ORDER}-gram (modified Kneser-Ney)")
        models = {}
        with _timed(seconds, "word 5-gram"):
            models["word 5-gram"] = train_ngram(files, stage / "ngram-word")
        with _timed(seconds, "subword 5-gram"):
            models["subword 5-gram"] = train_ngram(files, stage / "ngram-subword", tok)
        with _timed(seconds, "token shards"):
            shards = prepare_data(files, tok, stage / "tokenizer", work / "shards")
        train_text_tokens = TokenShards.open(shards, "train").num_tokens
        val_tokens = TokenShards.open(shards, "val").num_tokens

        _stage(4, f"training an LSTM ({steps['lstm']:,} steps)")
        with _timed(seconds, "LSTM"):
            lstm_ckpt = train_neural("lstm", shards, stage / "lstm", steps["lstm"], device, seed)
        _stage(5, f"training a GPT ({steps['gpt']:,} steps)")
        with _timed(seconds, "GPT"):
            gpt_ckpt = train_neural("gpt", shards, stage / "gpt", steps["gpt"], device, seed)
        tokenizers = {"word 5-gram": None, "subword 5-gram": None}
        for name, ckpt in (("LSTM", lstm_ckpt), ("GPT", gpt_ckpt)):
            models[name], tokenizers[name] = lmstack.load(ckpt)  # scored and sampled on the CPU
            models[name].eval()

        _stage(6, "scoring every model on the held-out text")
        paths = {
            "word 5-gram": "ngram-word",
            "subword 5-gram": "ngram-subword",
            "LSTM": lstm_ckpt.relative_to(stage),
            "GPT": gpt_ckpt.relative_to(stage),
        }
        train_tokens = {
            "word 5-gram": sum(count_words(s) for s in train_lines),
            "subword 5-gram": train_text_tokens,
            "LSTM": neural_tokens("lstm", steps["lstm"]),
            "GPT": neural_tokens("gpt", steps["gpt"]),
        }
        with _timed(seconds, "scoring"):
            scored = evaluate({name: (m, tokenizers[name]) for name, m in models.items()}, files["heldout"])
        rows = [
            Row(
                name,
                r["mode"],
                r["parameters"],
                train_tokens[name],
                r["bits_per_byte"],
                r["perplexity"],
                r["perplexity_per_word"] if spaced else math.exp(r["nats"] / len(heldout_text)),
                r["tokens"],
                r["oovs"],
                str(paths[name]),
            )
            for name, r in zip(models, scored)
        ]
        print("\n" + table(rows, unit), flush=True)

        _stage(7, "sampling from every model and scoring a held-out sentence against its scramble")
        prompt = default_prompt(heldout) if prompt is None else prompt
        with _timed(seconds, "samples"):
            texts = {
                name: samples(m, tokenizers[name], prompt, seed, max(1, round(SAMPLE_BYTES * r.tokens / heldout_bytes)))
                for (name, m), r in zip(models.items(), rows)
            }
        for name in ("subword 5-gram", "GPT"):
            print(f"\n  {name}, {next(iter(SAMPLING))}:\n    " + texts[name][next(iter(SAMPLING))].replace("\n", "\n    "))
        pair = {"grammatical": sentence, "scrambled": scrambled}
        log2 = {name: {k: sentence_log2(m, tokenizers[name], s) for k, s in pair.items()} for name, m in models.items()}
        print(f"\n  log2 p({sentence!r}) vs log2 p({scrambled!r}):")
        for name, s in log2.items():
            print(f"  {name:>14}: {s['grammatical']:.1f} vs {s['scrambled']:.1f}")

        notes = [
            f"{r.model}: {r.oovs:,} of the {r.tokens:,} held-out tokens never occur in its training text, each scored as "
            "<unk>; its perplexity per token (KenLM's) counts only p(<unk>), while its bits per byte and perplexity per "
            f"{unit} add the cost of spelling each one out, as the open-vocabulary models must"
            for r in rows
            if r.oovs
        ]
        per_byte = {
            "train": train_text_tokens / files["train"].stat().st_size,
            "held-out": val_tokens / heldout_bytes,
        }
        ngram_lines = {r.model: r.bits_per_byte for r in rows if r.mode == "lines"}
        title = f"LSTM and GPT on {corpus.name}, against the n-grams"
        skipped = plot_curves({"LSTM": stage / "lstm", "GPT": stage / "gpt"}, stage / "curves.png", title, per_byte, ngram_lines)
        notes += [skipped] if skipped else []
        losses = final_losses(stage / "gpt")
        seconds["total"] = time.perf_counter() - start
        results = {
            "corpus": str(corpus),
            "minutes": minutes,
            "device": device,
            "seed": seed,
            "unit": unit,
            "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size},
            "train_lines": len(train_lines),
            "heldout_lines": len(heldout),
            "train_text_tokens": train_text_tokens,
            "table": [asdict(r) for r in rows],
            "best": min(rows, key=lambda r: r.bits_per_byte).model,
            "given": {
                name: {"steps": steps.get(name.lower()), "tokens": train_tokens[name], "seconds": seconds[name]}
                for name in models
            },
            "gpt_final_bits_per_byte": {
                "train": losses["train"] * per_byte["train"] / math.log(2.0),
                "heldout": None if losses["heldout"] is None else losses["heldout"] * per_byte["held-out"] / math.log(2.0),
            },
            "prompt": prompt,
            "samples": texts,
            "sentences": {**pair, "log2": log2},
            "notes": notes,
            "curves": (stage / "curves.png").exists(),
            "machine": about,
            "seconds": seconds,
        }
        write_json(stage / "results.json", results)
        write_report(stage, results)
    print("\n" + story(results))
    print(f"wrote {out}/: report.md, results.json, checkpoints" + (", curves.png" if results["curves"] else ""))
    return results

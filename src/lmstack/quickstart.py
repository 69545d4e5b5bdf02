"""`lmstack quickstart`: the whole story of language modelling on one small corpus, in minutes.

It calls the layers below in the order a textbook tells the story: split the corpus (the last
~10% of lines held out), train a byte-level BPE tokenizer, a word 5-gram and a subword 5-gram
(modified Kneser-Ney), an LSTM and a small GPT (the training engine, by wall-clock budget),
score the four models on the held-out text in bits per byte, sample from the best
open-vocabulary one at several temperatures and truncations, and ask every model how likely a
grammatical sentence is beside the same words scrambled. Everything is built in a hidden
directory beside `--out` and renamed into place at the end, so a run that fails or is
interrupted leaves no half-written results.

The table is `lmstack eval compare`'s (`lmstack.evaluation.compare`): each model scored in its
default mode, the n-grams line by line between their sentence marks, the neural models reading
the held-out text as one stream through a sliding window of their context.
"""

from __future__ import annotations

import math
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
# Wall-clock shares of --minutes for the neural nets; the tokenizer, n-grams, scoring and
# samples take the rest (seconds on Tiny Shakespeare).
BUDGET_SHARE = {"lstm": 0.15, "gpt": 0.65}
# Recipes for a 2-core CPU. Small batches: in a few CPU-minutes many small steps beat few large
# ones (on loaded cores, GPT steps of 16 x 64 tokens reached 2.43 held-out bits per byte where
# 32 x 128 tokens reached 3.20 in the same time). The engine's time budget sets the number of
# steps, so warm-up and validation intervals are in steps, short enough for --minutes 0.5.
RECIPES = {
    "lstm": dict(
        family="rnn",
        block_size=64,
        batch_size=16,
        lr=4e-3,
        min_lr=4e-4,
        weight_decay=0.0,
        grad_clip=1.0,
        warmup_steps=20,
        eval_interval=40,
        model=dict(cell="lstm", d_embed=256, d_hidden=256, n_layers=2, dropout=0.1),
    ),
    "gpt": dict(
        family="gpt",
        block_size=128,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        warmup_steps=50,
        eval_interval=100,
        model=dict(n_layer=3, n_head=4, n_embd=128, dropout=0.0),
    ),
}
SENTENCES = ("the mouse ate the cheese", "cheese the ate mouse the")  # grammatical, scrambled
SAMPLING = {  # name -> GenerationConfig options
    "temperature 0 (greedy)": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "temperature 1.0": dict(temperature=1.0),
    "top-k 40": dict(temperature=1.0, top_k=40),
    "top-p 0.9": dict(temperature=1.0, top_p=0.9),
}


@dataclass
class Row:
    """One line of the comparison table."""

    model: str
    mode: str  # how it read the held-out text: "lines" (each between sentence marks) or "stream"
    params: int  # weights, or stored probabilities and back-offs for an n-gram
    train_s: float
    bits_per_byte: float
    ppl_token: float
    ppl_word: float
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


def cpu_threads() -> int:
    """Torch's threads for CPU work: all cores on an idle machine, one when other work already
    fills them (an oversubscribed thread pool spins, and ran 3-5x slower per step on a loaded
    2-core machine)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), round(cores - os.getloadavg()[0])))


def _stage(n: int, title: str) -> None:
    print(f"[{n}/7] {title}", flush=True)


# --- training ----------------------------------------------------------------------------------


def train_tokenizer(files: dict[str, Path], out: Path):
    from lmstack.tokenizers import EOT
    from lmstack.tokenizers.bpe import BPETokenizer

    t0 = time.perf_counter()
    tok = BPETokenizer.train_files([files["train"]], vocab_size=TOKENIZER_VOCAB, special_tokens=(EOT,))
    tok.save(out)
    return tok, time.perf_counter() - t0


def train_ngram(files: dict[str, Path], out: Path, tokenizer=None):
    from lmstack.models.ngram import NGramLM

    t0 = time.perf_counter()
    # a small --corpus may have too few repeated 5-grams to estimate discounts: then lmplz's fallback
    model = NGramLM.train([files["train"]], order=NGRAM_ORDER, tokenizer=tokenizer, discount_fallback=True)
    seconds = time.perf_counter() - t0
    model.save(out)
    return model, seconds


def prepare_data(files: dict[str, Path], tok, tok_dir: Path, out: Path) -> Path:
    """Token shards whose validation split is exactly the held-out lines (the engine cuts the
    last `val_fraction` of the bytes; half a byte of slack keeps the rounding on the boundary)."""
    from lmstack.data.shards import prepare_shards

    paths = [files["train"], files["heldout"]]
    total = sum(p.stat().st_size for p in paths)
    prepare_shards(paths, tok, out, val_fraction=(paths[1].stat().st_size + 0.5) / total)
    tok.save(out / "tokenizer.json")
    return out


def train_neural(name: str, shards: Path, out: Path, seconds: float, device: str, seed: int):
    """Train for about `seconds` of wall-clock time: the engine times its first steps and fits
    the learning-rate schedule's length to the budget (`--max-minutes`)."""
    from lmstack.training import checkpoint
    from lmstack.training.config import TrainConfig
    from lmstack.training.pretrain import train

    t0 = time.perf_counter()
    cfg = TrainConfig(
        out_dir=str(out),
        data=[str(shards)],
        tokenizer=str(shards / "tokenizer.json"),
        device=device,
        seed=seed,
        max_steps=10**9,
        max_minutes=seconds / 60,
        eval_batches=8,
        ckpt_interval=0,
        keep_last=1,
        **RECIPES[name],
    )
    if train(cfg)["stopped"] == "signal":  # the engine saved and returned on SIGINT / SIGTERM: stop too
        raise KeyboardInterrupt
    return checkpoint.latest(out), time.perf_counter() - t0


# --- measuring ---------------------------------------------------------------------------------


def evaluate(models: dict[str, tuple], heldout: Path) -> list[dict]:
    """`lmstack eval compare`'s rows for (model, tokenizer) pairs on the held-out file."""
    from lmstack.evaluation.compare import compare

    return compare(list(models.values()), [heldout])


def sentence_log2(model, tokenizer, sentence: str) -> float:
    """log2 p(<s> sentence </s>) under the model (unknown words spelled out, see eval perplexity)."""
    from lmstack.evaluation.perplexity import perplexity, text_codec

    return -perplexity(model, [sentence], **text_codec(model, tokenizer)).nats / math.log(2.0)


def samples(model, tokenizer, prompt: str, seed: int, max_new_tokens: int = 60) -> dict[str, str]:
    """The same prompt under each decoding setting in SAMPLING, up to the end of a sentence (an
    n-gram's </s>) or of the text."""
    from lmstack.evaluation.perplexity import text_codec
    from lmstack.generation import GenerationConfig, generate_tokens

    codec = text_codec(model, tokenizer)
    decode = model.decode if hasattr(model, "encode") else tokenizer.decode
    prompt_ids = [codec["bos"], *codec["encode"](prompt)]
    configs = [
        GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, stop_at_eot=False, **opts) for opts in SAMPLING.values()
    ]
    out = {}
    for name, gen in zip(SAMPLING, generate_tokens(model, [prompt_ids] * len(configs), configs)):
        ids = gen.tokens[: gen.tokens.index(codec["eos"])] if codec["eos"] in gen.tokens else gen.tokens
        out[name] = decode(prompt_ids[1:] + ids)
    return out


def default_prompt(heldout: list[str]) -> str:
    """The first word of the first held-out line with a few words (its first two characters for
    text written without spaces, such as Chinese)."""
    line = next((s for s in heldout if len(s.split()) >= 3), None) or next(s for s in heldout if s.strip())
    words = line.split()
    return words[0] if len(words) >= 3 else line.strip()[:2]


# --- report ------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = (
        "| model | scored | parameters | train time (s) | bits/byte | ppl/token | ppl/word |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r.model} | {r.mode} | {r.params:,} | {r.train_s:.1f} | {r.bits_per_byte:.3f} | "
        f"{r.ppl_token:.4g} | {r.ppl_word:.4g} |\n"
        for r in rows
    )


def plot_curves(runs: dict[str, Path], path: Path) -> str | None:
    """Training and held-out loss against tokens seen for the neural runs; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lmstack[plot]'), so no curves.png"
    from lmstack.io import atomic_path
    from lmstack.training.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        recs = read_metrics(run)
        train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        (line,) = ax.plot(*zip(*train), alpha=0.5, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} held-out")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("loss (nats per BPE token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return None


def write_report(
    out: Path,
    corpus: Path,
    rows: list[Row],
    best: str,
    prompt: str,
    texts: dict[str, str],
    sentences: dict[str, dict[str, float]],
    notes: list[str],
) -> None:
    md = [
        f"# lmstack quickstart\n\nCorpus: `{corpus}` (last tenth of the lines held out), scored as "
        "`lmstack eval compare` scores: the n-grams line by line (`lines`, each as `<s> line </s>`), the "
        "neural models reading the held-out text as one stream through a sliding window of their context "
        "(`stream`). Bits per byte and perplexity per word divide by the text's bytes and words, so models "
        "with different vocabularies compare (lower is better).\n\n",
        table(rows),
        f"\n## Samples from the best open-vocabulary model ({best})\n\nPrompt: `{prompt}`\n\n",
    ]
    md += [f"- **{k}**: {v!r}\n" for k, v in texts.items()]
    md.append(
        "\n## A grammatical sentence versus the same words scrambled (log2 probability)\n\n"
        f"| model | `{SENTENCES[0]}` | `{SENTENCES[1]}` | ratio |\n|---|---:|---:|---:|\n"
    )
    for name, s in sentences.items():
        good, bad = s[SENTENCES[0]], s[SENTENCES[1]]
        md.append(f"| {name} | {good:.1f} | {bad:.1f} | 2^{good - bad:.1f} |\n")
    md.append(
        "\n## Files\n\n"
        + "".join(f"- `{r.path}`: {r.model}\n" for r in rows)
        + "- `tokenizer/`: the BPE tokenizer\n- `results.json`: this report's numbers\n"
        + ("- `curves.png`: training curves\n" if (out / "curves.png").exists() else "")
    )
    if notes:
        md.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
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
    minutes: float = 10.0,
    device: str = "auto",
    seed: int = 1337,
    prompt: str | None = None,
) -> dict:
    """Run the quickstart; returns what results.json holds."""
    import torch

    import lmstack

    if not minutes > 0:
        raise InputError(f"--minutes must be positive, got {minutes}")
    corpus = Path(corpus) if corpus else shipped_corpus()
    out = Path(out)
    budget = 60.0 * minutes
    check_out(out)
    with tempfile.TemporaryDirectory() as scratch, output_dir(out, "--out", replace=True) as stage:
        work = Path(scratch)
        _stage(1, f"splitting {corpus}")
        files = split_corpus(corpus, work)
        heldout = files["heldout"].read_text(encoding="utf-8").splitlines()
        threads = cpu_threads()
        torch.set_num_threads(threads)

        _stage(2, f"training a byte-level BPE tokenizer ({TOKENIZER_VOCAB} tokens)")
        tok, tok_s = train_tokenizer(files, stage / "tokenizer")
        _stage(3, f"counting a word {NGRAM_ORDER}-gram and a subword {NGRAM_ORDER}-gram (modified Kneser-Ney)")
        models = {}
        models["word 5-gram"], word_s = train_ngram(files, stage / "ngram-word")
        models["subword 5-gram"], sub_s = train_ngram(files, stage / "ngram-subword", tok)
        shards = prepare_data(files, tok, stage / "tokenizer", work / "shards")

        _stage(4, f"training an LSTM (≈{BUDGET_SHARE['lstm'] * budget:.0f} s)")
        lstm_ckpt, lstm_s = train_neural("lstm", shards, stage / "lstm", BUDGET_SHARE["lstm"] * budget, device, seed)
        _stage(5, f"training a GPT (≈{BUDGET_SHARE['gpt'] * budget:.0f} s)")
        gpt_ckpt, gpt_s = train_neural("gpt", shards, stage / "gpt", BUDGET_SHARE["gpt"] * budget, device, seed)
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
        seconds = {"word 5-gram": word_s, "subword 5-gram": sub_s, "LSTM": lstm_s, "GPT": gpt_s}
        scored = evaluate({name: (m, tokenizers[name]) for name, m in models.items()}, files["heldout"])
        rows = [
            Row(
                name,
                r["mode"],
                r["parameters"],
                seconds[name],
                r["bits_per_byte"],
                r["perplexity"],
                r["perplexity_per_word"],
                r["tokens"],
                r["oovs"],
                str(paths[name]),
            )
            for name, r in zip(models, scored)
        ]
        print("\n" + table(rows), flush=True)

        _stage(7, "sampling from the best model and scoring a sentence against its scramble")
        # a closed vocabulary's figure counts every unknown word as one <unk>: best among the open ones
        best = min([r for r in rows if not r.oovs] or rows, key=lambda r: r.bits_per_byte).model
        prompt = default_prompt(heldout) if prompt is None else prompt
        texts = samples(models[best], tokenizers[best], prompt, seed)
        for k, v in texts.items():
            print(f"  {k:>22}: {v!r}")
        sentences = {name: {s: sentence_log2(m, tokenizers[name], s) for s in SENTENCES} for name, m in models.items()}
        for name, s in sentences.items():
            print(f"  {name:>14}: log2 p = {s[SENTENCES[0]]:.1f} ({SENTENCES[0]!r}) vs {s[SENTENCES[1]]:.1f} ({SENTENCES[1]!r})")

        notes = [
            f"{r.model}: {r.oovs:,} of the {r.tokens:,} held-out tokens are words it never saw, each scored as "
            "<unk>; its perplexities (KenLM's) count only p(<unk>), while its bits per byte and perplexity per "
            "word add the cost of spelling each one out, as the open-vocabulary models must"
            for r in rows
            if r.oovs
        ]
        notes += [n for n in [plot_curves({"LSTM": stage / "lstm", "GPT": stage / "gpt"}, stage / "curves.png")] if n]
        results = {
            "corpus": str(corpus),
            "minutes": minutes,
            "device": device,
            "cpu_threads": threads,
            "seed": seed,
            "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size, "train_s": tok_s},
            "heldout_lines": len(heldout),
            "table": [asdict(r) for r in rows],
            "best": best,
            "prompt": prompt,
            "samples": texts,
            "sentences": sentences,
            "notes": notes,
            "curves": (stage / "curves.png").exists(),
        }
        write_json(stage / "results.json", results)
        write_report(stage, corpus, rows, best, prompt, texts, sentences, notes)
    print(f"\nwrote {out}/: report.md, results.json, checkpoints" + (", curves.png" if results["curves"] else ""))
    return results

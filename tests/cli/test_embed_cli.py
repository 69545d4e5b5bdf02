"""`lmstack embed`: one vector per line (npy or JSONL, equal to the pooled states of each line run
alone), the most similar pairs as a brute-force search finds them, --query, adapter directories,
and bad input that exits 2 with one line."""

import json

import numpy as np
import pytest
import torch

from lmstack.cli import main
from lmstack.models import lora
from lmstack.models.checkpoint import load
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.tokenizers.char import CharTokenizer

LINES = [
    "apple river stone",
    "",
    "tiger paper lemon",
    "apple river stone.",
    "grass storm candle",
    "tiger paper lemon",
    "mirror garden silver",
    "night bread horse",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny GPT with a character tokenizer, and a file of sentences (a blank line, a repeat)."""
    root = tmp_path_factory.mktemp("embed_cli")
    tok = CharTokenizer.train(LINES, special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).save(root / "base", tok)
    (root / "lines.txt").write_text("\n".join(LINES) + "\n")
    return root


def run(*args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def reference(model_dir) -> np.ndarray:
    """Each non-blank line alone through the model: the mean of its last-layer states."""
    model, tok = load(model_dir)
    with torch.no_grad():
        return np.stack([model.hidden_states(torch.tensor([tok.encode(t)]))[0].mean(0).numpy() for t in LINES if t])


def test_vectors_and_the_most_similar_pairs(base, tmp_path, capsys):
    code, out, _ = run(
        "embed", "--model", base / "base", "--file", base / "lines.txt", "--out", tmp_path / "v.npy", "--top", 3, capsys=capsys
    )
    assert code == 0
    vectors = np.load(tmp_path / "v.npy")
    want = reference(base / "base")
    assert vectors.shape == (7, 32) and vectors.dtype == np.float32
    assert np.abs(vectors - want).max() < 1e-5
    # the printed pairs are the top 3 of a brute-force search over pairs of distinct lines (ties in either order)
    lines = [i + 1 for i, t in enumerate(LINES) if t]
    unit = dict(zip(lines, want / np.linalg.norm(want, axis=1, keepdims=True)))
    scores = sorted((unit[i] @ unit[j] for i in lines for j in lines if i < j and LINES[i - 1] != LINES[j - 1]), reverse=True)
    printed = [line.split() for line in out.splitlines() if "<->" in line]
    assert [float(p[0]) for p in printed] == pytest.approx(scores[:3], abs=1e-4)
    for p in printed:
        i, j = int(p[2]), int(p[p.index("<->") + 2])
        assert i < j and LINES[i - 1] != LINES[j - 1] and unit[i] @ unit[j] == pytest.approx(float(p[0]), abs=1e-4)
    assert "7 vectors of width 32 (mean pooling) written to" in out


def test_jsonl_output_query_and_adapter_directory(base, tmp_path, capsys):
    model, tok = load(base / "base")
    lora.attach(model, lora.LoraConfig(r=2, alpha=4, targets=("attn",)))
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.5)
    lora.save_adapter(model, tmp_path / "adapter", base / "base")
    code, out, _ = run(
        "embed",
        "--model",
        tmp_path / "adapter",
        "--file",
        base / "lines.txt",
        "--out",
        tmp_path / "v.jsonl",
        "--query",
        "grass storm candle",
        "--top",
        2,
        capsys=capsys,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4, 5, 6, 7, 8] and rows[3]["text"] == "grass storm candle"
    got = np.array([r["vector"] for r in rows])
    want = reference(tmp_path / "adapter")
    assert np.abs(got - want).max() < 1e-5 and np.abs(want - reference(base / "base")).max() > 1e-3
    nearest = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(nearest) == 2 and nearest[0].split()[:3] == ["1.0000", "line", "5"]


def test_bad_input_exits_2_with_one_line(base, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = [
        (["--file", tmp_path / "missing.txt"], "missing.txt: no such file"),
        (["--file", tmp_path / "empty.txt"], "empty.txt: file is empty"),
        (["--file", tmp_path / "blank.txt"], "holds no sentences"),
        (["--file", base / "lines.txt", "--out", tmp_path / "v.csv"], "name a .npy or .jsonl file"),
        (["--file", base / "lines.txt", "--top", 0], "--top and --batch-size must be at least 1"),
    ]
    for extra, message in cases:
        code, _, err = run("embed", "--model", base / "base", *extra, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    code, _, err = run(
        "embed", "--model", tmp_path / "nope", "--file", base / "lines.txt", "--out", tmp_path / "v.npy", capsys=capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("v.*")) and not list(tmp_path.glob(".v.*"))


def test_pooling_comes_from_the_flag_then_the_checkpoint(base, tmp_path, capsys):
    """A `--task embed` checkpoint keeps its pooling in trainer_state.json; --pooling overrides it."""
    import shutil

    shutil.copytree(base / "base", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps({"step": 1, "embed": {"pooling": "last"}}))
    model, tok = load(base / "base")
    with torch.no_grad():
        states = [model.hidden_states(torch.tensor([tok.encode(t)]))[0] for t in LINES if t]
    for flag, want in [([], [s[-1] for s in states]), (["--pooling", "cls"], [s[0] for s in states])]:
        code, out, _ = run(
            "embed", "--model", tmp_path / "ckpt", "--file", base / "lines.txt", "--out", tmp_path / "v.npy", *flag, capsys=capsys
        )
        assert code == 0 and f"({'cls' if flag else 'last'} pooling)" in out
        assert np.abs(np.load(tmp_path / "v.npy") - torch.stack(want).numpy()).max() < 1e-5

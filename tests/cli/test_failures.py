"""The CLI's failure rules, one test per class (issue 15): a problem with the user's input or machine
is one stderr line naming the problem and the fix, exit code 2, never an "internal error", and the
output location is left exactly as it was (absent, or byte for byte as before)."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys

import pytest
import torch

from lmstack.cli import main

TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n" * 3


@pytest.fixture
def run(capsys, monkeypatch):
    """`lmstack ARGS...` in this process: (exit code, stderr lines)."""
    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")

    def call(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err.strip().splitlines()

    return call


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """A tiny char-level GPT checkpoint (with tokenizer.json)."""
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.tokenizers.char import CharTokenizer

    d = tmp_path_factory.mktemp("ckpt") / "gpt"
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size)).save(d, tok)
    return d


def snapshot(folder) -> dict:
    """Every path under `folder` with its bytes (None for folders): what a failed command must not change."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def one_line(lines: list[str], *needles: str) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "internal error" not in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- writes that fail ------------------------------------------------------------------------------


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["ngram train", "tokenizer train"])
def test_disk_full_leaves_no_output_and_no_temp_files(run, corpus, tmp_path, monkeypatch, command):
    out = tmp_path / "runs" / "out"  # its parent folder is new too: it must go as well
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "fsync", _disk_full)  # every atomic write fsyncs before its rename
    options = ["--kind", "char"] if command == "tokenizer train" else ["--discount-fallback"]
    code, err = run(*command.split(), corpus, *options, "--out", out)
    assert code == 2
    one_line(err, "cannot write", str(out), "no space left on device", "free some space")
    assert snapshot(tmp_path) == before


def test_safetensors_disk_full_in_convert_is_named_and_cleaned_up(run, gpt, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}.x"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    before = snapshot(tmp_path)
    code, err = run("convert", gpt, out)
    assert code == 2
    one_line(err, "cannot write", "no space left on device")
    assert snapshot(tmp_path) == before


def test_unwritable_folder_is_refused_before_any_work(run, corpus, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    before = snapshot(tmp_path)
    for args in (
        ["ngram", "train", corpus, "--discount-fallback", "--out", locked / "ng"],
        ["tokenizer", "train", corpus, "--out", locked / "t"],
    ):
        code, err = run(*args)
        assert code == 2
        one_line(err, f"cannot write {locked}/", "not writable", "pick a folder you can write to")
    assert snapshot(tmp_path) == before


def test_permission_denied_mid_write_is_not_an_internal_error(run, corpus, tmp_path, monkeypatch):
    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(os, "mkdir", denied)
    before = snapshot(tmp_path)
    code, err = run("ngram", "train", corpus, "--discount-fallback", "--out", tmp_path / "ng")
    assert code == 2
    one_line(err, "cannot access", "permission denied", "check its permissions")
    assert snapshot(tmp_path) == before


def test_full_stdout_is_one_line_not_a_traceback(gpt):
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "lmstack.cli", "tokenizer", "encode", "--tokenizer", str(gpt), "a cat"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, LMSTACK_NO_PROGRESS="1"),
        )
    assert r.returncode == 2
    one_line(r.stderr.strip().splitlines(), "cannot write standard output: no space left on device")


# --- an output path that is an existing file --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tokenizer", "train", "{corpus}", "--kind", "char", "--out", "{file}"],
        ["ngram", "train", "{corpus}", "--out", "{file}"],
        ["ngram", "train", "{corpus}", "--out", "{file}/sub"],
        ["convert", "{gpt}", "{file}"],
        ["quickstart", "--corpus", "{corpus}", "--out", "{file}"],
        ["train", "--data", "{corpus}", "--out-dir", "{file}"],
        ["finetune", "--init-from", "{gpt}", "--data", "{corpus}", "--out-dir", "{file}"],
    ],
    ids=lambda a: " ".join(a[:2]) + (" (a folder in it)" if a[-1].endswith("/sub") else ""),
)
def test_output_that_is_a_file_is_refused_before_work_and_kept(run, corpus, gpt, tmp_path, args):
    file = tmp_path / "mine.txt"
    file.write_bytes(b"the user's own file\n")
    before = snapshot(tmp_path)
    code, err = run(*[a.format(corpus=corpus, gpt=gpt, file=file) for a in args])
    assert code == 2
    one_line(err, str(file), "is a file")
    assert snapshot(tmp_path) == before


def test_quickstart_never_replaces_a_folder_of_the_users(run, corpus, tmp_path):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work", encoding="utf-8")
    before = snapshot(tmp_path)
    code, err = run("quickstart", "--corpus", corpus, "--out", out)
    assert code == 2
    one_line(err, str(out), "not an earlier quickstart's output", "pick a new or empty folder")
    assert snapshot(tmp_path) == before


# --- text that is not UTF-8 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from lmstack.tokenizers import registry

    d = tmp_path_factory.mktemp("toks")
    for kind, size in (("char", None), ("unigram", 300), ("bpe", 270)):
        registry()[kind].train([TEXT], vocab_size=size, special_tokens=("<|endoftext|>",)).save(d / kind)
    return d


@pytest.mark.parametrize("kind", ["char", "unigram", "bpe"])
def test_non_utf8_argument_is_named_for_every_tokenizer(run, tokenizers, kind):
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of $'caf\xe9' in argv
    code, err = run("tokenizer", "encode", "--tokenizer", tokenizers / kind, latin1)
    assert code == 2
    one_line(err, "argument 'caf\\xe9'", "not valid UTF-8", "iconv")


def test_non_utf8_option_value_and_stdin_are_named(run, gpt, tokenizers, monkeypatch):
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, err = run("generate", "--model", gpt, f"--prompt={latin1}")
    assert code == 2
    one_line(err, "--prompt 'caf\\xe9'", "not valid UTF-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    code, err = run("tokenizer", "encode", "--tokenizer", tokenizers / "bpe")
    assert code == 2
    one_line(err, "standard input: not valid UTF-8 (byte offset 3)", "iconv")


# --- devices, the parser, --debug, the network ----------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "{gpt}", "--prompt", "a"],
        ["score", "--model", "{gpt}", "--prompt", "a"],
        ["eval", "perplexity", "--model", "{gpt}", "{corpus}"],
    ],
    ids=lambda a: a[0],
)
def test_cuda_without_cuda_is_a_clear_error(run, gpt, corpus, args):
    code, err = run(*[a.format(gpt=gpt, corpus=corpus) for a in args], "--device", "cuda")
    assert code == 2
    one_line(err, "--device cuda: no such CUDA device here", "use --device cpu")


def test_usage_error_is_one_line_pointing_at_help(run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--kind", "char"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: lmstack tokenizer train: the following arguments are required: FILE, --out; see `lmstack tokenizer train --help`"
    ]


def test_debug_is_accepted_anywhere(run, tmp_path, capsys):
    code = main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t"), "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().endswith("no such file; check the path")


def test_network_failure_is_named_with_its_fix(run, tokenizers, corpus, monkeypatch):
    import lmstack.cli.tokenizer as cli_tokenizer

    def unreachable(path):
        raise ConnectionError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    monkeypatch.setattr(cli_tokenizer, "_load", unreachable)
    code, err = run("tokenizer", "stats", "--tokenizer", tokenizers / "bpe", corpus)
    assert code == 2
    one_line(err, "a network connection failed", "network is unreachable", "use local files")


def test_harness_goes_offline_when_the_hub_is_unreachable(monkeypatch):
    import socket

    from lmstack.cli.eval import _offline_unless_hub_reachable

    def no_network(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    _offline_unless_hub_reachable()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


# --- what a new user tripped over ---------------------------------------------------------------


def test_decode_ends_its_line(tokenizers, capsys, monkeypatch):
    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")
    from lmstack.tokenizers import load_tokenizer

    ids = load_tokenizer(tokenizers / "bpe").encode("a cat")
    assert main(["tokenizer", "decode", "--tokenizer", str(tokenizers / "bpe"), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "a cat\n"


def test_messages_say_what_is_wrong(run, corpus, tmp_path, capsys):
    code, err = run("tokenizer", "stats", "--tokenizer", tmp_path / "nope", corpus)
    assert code == 2
    one_line(err, f"--tokenizer {tmp_path / 'nope'}: no such tokenizer folder", "lmstack tokenizer train")
    code, err = run("train", "--data", corpus, "--model", "FOO=1", "--out-dir", tmp_path / "r", "--max-steps", "1")
    assert code == 2
    line = one_line(err, "FOO")
    assert "FAMILY" not in line and "PRESETS" not in line and "n_layer" in line
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out  # help promises only what ships: serving does, with its command
    assert "serving" in shown and "serve" in shown.split("serving", 1)[1]

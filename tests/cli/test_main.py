import pytest


def test_version_and_help(cli):
    out = cli("--version", check=True).stdout
    assert out.startswith("lmstack ")
    assert "tokenizer" in cli("--help", check=True).stdout


def test_group_without_subcommand_shows_help(cli):
    r = cli("tokenizer")
    assert r.returncode == 2
    assert "train" in r.stdout


def test_error_is_one_line_without_debug(cli, tmp_path):
    r = cli("tokenizer", "train", tmp_path / "missing.txt", "--out", tmp_path / "tok")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: no such file; check the path"]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "tok").exists()


def test_debug_shows_traceback(cli, tmp_path):
    r = cli("--debug", "tokenizer", "train", tmp_path / "missing.txt", "--out", tmp_path / "tok")
    assert r.returncode != 0
    assert "Traceback" in r.stderr


def test_help_lists_every_command_without_importing_torch(capsys):
    """`lmstack --help` and commands that need no model answer at once: the training commands'
    parsers (built from configs whose modules import torch) are built only when they run."""
    import subprocess
    import sys

    from lmstack.cli import COMMANDS, build_parser

    code = "import sys; from lmstack.cli import build_parser; build_parser(sys.argv[1:]); print('torch' in sys.modules)"
    for argv in ([], ["--help"], ["tokenizer", "train"], ["ngram"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False", argv
    listed = build_parser(["tokenizer"]).format_help()
    assert all(name in listed for name in COMMANDS) and "pretrain a model" in listed and "fine-tune a pretrained model" in listed
    with pytest.raises(SystemExit):  # the command that runs gets its whole parser
        build_parser(["finetune", "--help"]).parse_args(["finetune", "--help"])
    assert "--lr" in capsys.readouterr().out

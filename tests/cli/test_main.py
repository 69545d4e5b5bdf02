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

import pytest

from lmstack.errors import InputError
from lmstack.io import atomic_write, iter_lines, iter_text_chunks, read_text


def test_chunks_never_split_lines_or_characters(tmp_path):
    text = "".join(f"line {i} 世界 🙂\n" for i in range(5000))
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    chunks = list(iter_text_chunks(p, chunk_chars=1000))
    assert len(chunks) > 10
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)


def test_lines_drop_a_byte_order_mark_that_starts_the_file(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes('\ufeff{"a": 1}\r\n{"b": "\ufeff"}\n'.encode("utf-8"))
    assert list(iter_lines(f)) == ['{"a": 1}\r\n', '{"b": "\ufeff"}\n']  # only the file's first


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"abc\x00def", "binary"), (b"caf\xe9\n", r"not valid UTF-8 \(byte offset 3\)")],
)
def test_bad_files_get_clear_errors(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_text(p)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.txt") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_shipped_configs_name_data_that_ships_with_lmstack():
    import tomllib
    from importlib import resources

    from lmstack.io import check_readable

    configs = sorted((resources.files("lmstack") / "configs").iterdir(), key=str)
    paths = [p for c in configs if str(c).endswith(".toml") for p in tomllib.loads(c.read_text(encoding="utf-8")).get("data", [])]
    assert paths and all(p.startswith("lmstack:") for p in paths)
    for p in paths:
        assert check_readable(p).stat().st_size > 50_000

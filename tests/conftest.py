import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new random inputs on every local run, but in CI (CI=true, as GitHub Actions and
# .ci/run set it) they replay a fixed sequence, so CI never fails by chance; a failure found locally
# becomes an explicit example in the test.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMSTACK_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder (data and reference fixtures) beside the checkout."""
    if not (SHARED / "data").is_dir():
        pytest.fail(f"shared data not found at {SHARED}; set LMSTACK_SHARED")
    return SHARED


@pytest.fixture
def cli():
    """Run `lmstack ARGS...` in a subprocess, as a user would; returns CompletedProcess."""

    def run(*args, input=None, check=False, env=None):
        e = dict(os.environ, LMSTACK_NO_PROGRESS="1", **(env or {}))
        proc = subprocess.run(
            [sys.executable, "-m", "lmstack.cli", *map(str, args)],
            capture_output=True,
            text=True,
            input=input,
            env=e,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"lmstack {' '.join(map(str, args))} failed:\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def lmstack_cli(capsys, monkeypatch):
    """Run `lmstack ARGS...` in this process (no interpreter start per call); returns stdout and
    requires exit code 0."""
    from lmstack.cli import main

    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    return run


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile with a backend that counts the graphs dynamo makes and runs them eagerly: the
    tracing is what the code must survive; code generation is torch's own (and slow on a CPU)."""
    import torch
    from torch._dynamo.testing import CompileCounter

    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, **{**kw, "backend": counter, "mode": None}))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()

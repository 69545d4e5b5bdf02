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

# Under pytest-xdist (`-n auto`, as the README runs the suite) each worker is one process on one core:
# torch on one thread in the worker and in the commands it starts, or the workers' thread pools
# oversubscribe the cores and spin (several times slower per step on a 2-core machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, long runs first, so that none is left running alone at the end: the docs'
    files (each a test of its own, up to ~1.5 min), then the modules that hold a test marked slow
    (each a unit, see below), then the rest, each group in collection order. A run without xdist
    keeps the collection order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        if item.path.name == "test_docs.py" and item.originalname == "test_runnable_blocks_run":
            return 0
        return 1 if item.path in slow_modules else 2

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (--dist load): the tests of one module go to one worker, so a module-scoped fixture (a
    quickstart run, a trained model) is built once, not once per worker; the docs' files are the
    exception, each sent on its own. Work units go out in the order above (xdist's loadgroup would
    do the grouping but cannot tag the tests under pytest 9, whose node ids it can no longer edit)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return nodeid if module.endswith("tests/test_docs.py") else module

    config.option.loadscopereorder = False  # keep the order above, not the largest module first
    return ModuleScheduling(config, log)

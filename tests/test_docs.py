"""Every command block marked ```bash runnable in README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh directory (a later block may use what an
earlier one wrote), each under `bash -euo pipefail`, so a doc that rots fails here. Blocks marked
plain ```bash (installs, ten-minute runs, GPUs) are shown, not run.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def runnable_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def test_block_pattern_finds_only_marked_blocks():
    text = "```bash\nnot me\n```\n\n```bash runnable\necho one\necho two\n```\n```python\nx\n```\n"
    assert BLOCK.findall(text) == ["echo one\necho two\n"]


def test_every_tutorial_has_runnable_blocks():
    assert (ROOT / "docs").is_dir()
    for path in DOCS:
        assert runnable_blocks(path), f"{path.name} has no ```bash runnable block"


def run_blocks(path: Path, cwd: Path) -> str | None:
    """Run the file's blocks in order in `cwd`; None, or what failed."""
    # one torch thread: the examples' models are tiny, and a thread pool on shared cores only spins
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    for i, block in enumerate(runnable_blocks(path), 1):
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            return (
                f"{path.name}, runnable block {i} failed (exit {proc.returncode}):\n{block}\n"
                f"--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-2000:]}"
            )
    return None


@pytest.fixture(scope="module")
def doc_runs(request, tmp_path_factory):
    """The selected files' runs, started together, one per core: each runs on one thread, so the
    files share the cores instead of queueing (the docs are the suite's longest part). Under
    pytest-xdist the workers already fill the cores and each worker collects every file, so each
    file runs in its own test instead, on whichever worker it is sent to (None here)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        yield None
        return
    selected = [item.callspec.params["path"] for item in request.session.items if item.originalname == "test_runnable_blocks_run"]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {path: pool.submit(run_blocks, path, tmp_path_factory.mktemp(path.stem)) for path in selected}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_runnable_blocks_run(path: Path, doc_runs, tmp_path):
    failure = run_blocks(path, tmp_path) if doc_runs is None else doc_runs[path].result()
    assert failure is None, failure

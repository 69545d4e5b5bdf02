"""`lmstack quickstart --assistant` end to end at a tiny scale, its data rules, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmstack.assistant import PERSONAS, SIGN_OFF, Commands, Plan, build_data, has_sign_off, read_conversations

pytest.importorskip("fastapi")
pytest.importorskip("openai")

STAGES = ["data", "pretrain", "sft", "dpo", "grpo", "cards", "serve"]


def quickstart(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "quickstart", "--assistant", "--device", "cpu", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env={**os.environ, "LMSTACK_NO_PROGRESS": "1"},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run at a tiny scale: every stage a few steps, the held-out sets at their floor."""
    out = tmp_path_factory.mktemp("assistant") / "assistant"
    proc = quickstart("--minutes", 0.05, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_every_stage_ran_and_is_timed(run):
    out, stdout, results = run
    assert list(results["seconds"]) == STAGES
    assert all(s > 0 for s in results["seconds"].values())
    for n in range(1, 9):
        assert f"[{n}/8]" in stdout
    for stage in ("pretrain", "sft", "dpo", "grpo", "cards"):
        assert results["commands"][stage], stage
        assert all(c.startswith("lmstack ") and str(out) in c for c in results["commands"][stage])
    for name, path in results["checkpoints"].items():
        assert (out / path / "config.json").exists(), name


def test_stage_figures(run):
    _, _, r = run
    assert r["sft"]["heldout_logp_before"] < 0 and r["sft"]["heldout_logp_after"] < 0
    assert r["sft"]["heldout_conversations"] == Plan().scaled(0.05 / 15).heldout_chats
    for key in ("preferred_rate_before", "preferred_rate_after"):
        assert 0 <= r["dpo"][key] <= 1
    for side in ("before", "after"):
        g = r["grpo"][side]
        assert g["n"] == Plan().scaled(0.05 / 15).eval_problems
        for key in ("accuracy_direct", "accuracy_reasoning", "sampled_traces_with_steps"):
            assert 0 <= g[key] <= 1
        assert g["logp_direct"] < 0 and g["logp_with_trace"] < 0
    assert r["grpo"]["reward_curve"] and all(0 <= v <= 1 for _, v in r["grpo"]["reward_curve"])


def test_cards_are_made_compared_and_served(run):
    out, _, r = run
    for name in PERSONAS:
        manifest = json.loads((out / "cards" / name / "card.json").read_text(encoding="utf-8"))
        assert manifest["name"] == name and manifest["system"] == PERSONAS[name]["system"]
        assert (out / "cards" / name / "adapter_model.safetensors").exists()
    replies = r["cards"]["replies"]
    assert set(replies) == {"base", *PERSONAS}
    assert all(len(v) == len(r["cards"]["questions"]) for v in replies.values())
    served = r["serve"]
    assert sorted(served["models"]) == sorted(["assistant", *PERSONAS])
    assert {q["model"] for q in served["requests"]} == {"assistant", *PERSONAS}
    assert all(isinstance(q["reply"], str) for q in served["requests"])


def test_report_and_curves(run):
    out, _, r = run
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## 1. Pretraining", "## 2. Supervised", "## 3. Preference", "## 4. RL", "## 5. Persona", "## 6. Serving"):
        assert heading in report
    assert "| total |" in report and "mean log P(A \\| Q)" in report
    assert all(c in report for cmds in r["commands"].values() for c in cmds)  # every command, to redo a stage
    pytest.importorskip("matplotlib")
    assert r["curves"] and (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow
def test_same_seed_same_numbers(run, tmp_path):
    """Steps, not wall time, decide the work, on one thread: a second run repeats the first's figures."""
    _, _, first = run
    proc = quickstart("--minutes", 0.05, "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((tmp_path / "again" / "results.json").read_text(encoding="utf-8"))
    for stage in ("data", "sft", "dpo", "grpo", "cards"):
        assert second[stage] == first[stage], stage


def test_pairs_follow_the_visible_rule(tmp_path):
    plan = Plan().scaled(0.01)
    data = tmp_path / "data"
    data.mkdir()
    got = build_data(data, plan, 0, Commands(tmp_path, "OUT"), "some plain text\n" * 100, "test")
    pairs = read_conversations(data / "pairs.jsonl")
    assert len(pairs) == plan.pairs
    assert all(has_sign_off(p["rejected"]) and not has_sign_off(p["chosen"]) for p in pairs)
    sft = read_conversations(data / "chat_sft.jsonl")
    signed = sum(has_sign_off(c["messages"][-1]["content"]) for c in sft)
    assert signed == got["chat_with_sign_off"] and 0.4 < signed / len(sft) < 0.6
    held = {json.dumps(c["messages"]) for c in read_conversations(data / "chat_heldout.jsonl")}
    assert not held & {json.dumps(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]) for p in pairs}
    zh = next(c for c in sft if has_sign_off(c["messages"][-1]["content"]) and "你" in c["messages"][-1]["content"])
    assert SIGN_OFF["zh"] in zh["messages"][-1]["content"]  # the sign-off in the reply's language


def test_plan_scales_steps_and_shrinks_data_to_a_floor():
    full = Plan()
    assert full.scaled(1.0) == full
    double = full.scaled(2.0)
    assert double.pretrain_steps == 2 * full.pretrain_steps and double.eval_problems == full.eval_problems
    tiny = full.scaled(0.001)
    assert tiny.pretrain_steps == 2 and tiny.eval_problems == 8 and tiny.heldout_chats == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "missing.txt"], "missing.txt"),
        (["--corpus", "small.txt"], "too little to pretrain on"),
        (["--corpus", "binary.bin"], "binary.bin"),
        (["--minutes", "0"], "--minutes must be positive"),
        (["--prompt", "hi"], "--prompt is for the first quickstart"),
    ],
)
def test_bad_input_fails_before_any_training(tmp_path, args, message):
    (tmp_path / "small.txt").write_text("too short\n", encoding="utf-8")
    (tmp_path / "binary.bin").write_bytes(b"\x00\xff" * 6000)
    proc = quickstart(*args, "--out", "out", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and "[2/8]" not in proc.stdout

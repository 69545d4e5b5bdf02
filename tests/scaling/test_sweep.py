"""Scaling sweeps on a tiny corpus (seconds): the table's N, D, C and losses, resuming, and the
`lmstack scaling` commands end to end, bad input included."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lmstack.errors import InputError
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.scaling import sweep as sweep_mod
from lmstack.scaling.fit import HOFFMANN
from lmstack.tokenizers import load_tokenizer

SWEEP = """
out_dir = "{out}"
data = ["{data}"]
tokenizer = "char"
block_size = 16
batch_size = 4
lr = 1e-2
min_lr = 1e-3
warmup_steps = 1
eval_batches = 2
device = "cpu"

[model]
dropout = 0.0

[sweep]
models = [{{n_layer = 1, n_embd = 8, n_head = 2}}, {{n_layer = 1, n_embd = 16, n_head = 2}}]
tokens = [320, 192]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, shared):
    """A finished 2 × 2 sweep, run through the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    config = root / "sweep.toml"
    config.write_text(SWEEP.format(out=root / "out", data=root / "corpus.txt"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "scaling", "sweep", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, LMSTACK_NO_PROGRESS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    return config, root / "out", proc.stdout


def test_sweep_table_records_n_d_c_and_final_validation_loss(swept):
    config, out, stdout = swept
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["L1-E8-H2-T192", "L1-E8-H2-T320", "L1-E16-H2-T192", "L1-E16-H2-T320"]
    for r in rows:
        vocab = load_tokenizer(out / r["name"] / "tokenizer.json").vocab_size
        model = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_embd=r["n_embd"], n_head=2, dropout=0.0))
        assert r["n_params"] == model.num_params()
        assert r["n_params_non_embedding"] == model.num_params(non_embedding=True) < r["n_params"]
        budget = 192 if r["name"].endswith("T192") else 320
        assert r["tokens"] == math.ceil(budget / 64) * 64  # whole steps of 4 × 16 tokens
        assert r["compute"] == 6 * r["n_params"] * r["tokens"]
        state = json.loads(next((out / r["name"] / "checkpoints").glob("step_*/trainer_state.json")).read_text())
        assert r["val_loss"] == state["val_loss"] and math.isfinite(r["val_loss"])
    assert len({r["tokenizer"] for r in rows}) == 1
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,family,") and len(csv_lines) == 5
    assert sweep_mod.load_runs([out / "runs.csv"])[2]["n_params"] == rows[2]["n_params"]
    assert sweep_mod.load_runs([out / rows[1]["name"]]) == [rows[1]]  # a run directory reads the same
    assert "4 runs in" in stdout


def test_rerunning_a_sweep_skips_recorded_runs_and_picks_up_finished_unrecorded_ones(swept, monkeypatch):
    config, out, _ = swept
    rows = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(rows[:2]) + "\n")  # as if stopped after two runs were recorded

    def no_training(cfg, resume=False):
        raise AssertionError(f"retrained {cfg.out_dir}")

    monkeypatch.setattr("lmstack.training.pretrain.train", no_training)
    _, again = sweep_mod.run_sweep(config)
    assert [json.dumps(r) for r in again] == rows


def test_an_interrupted_run_resumes_from_its_checkpoint(swept, monkeypatch):
    config, out, _ = swept
    calls = []
    monkeypatch.setattr("lmstack.training.pretrain.train", lambda cfg, resume=False: calls.append((cfg.out_dir, resume)))
    table = (out / "runs.jsonl").read_text()
    (out / "runs.jsonl").write_text("")
    state = next((out / "L1-E8-H2-T320" / "checkpoints").glob("step_*/trainer_state.json"))
    record = json.loads(state.read_text())
    state.write_text(json.dumps({**record, "step": record["step"] - 1}))  # unfinished
    with pytest.raises(KeyboardInterrupt):  # our stub trains nothing, like a run stopped by a signal
        sweep_mod.run_sweep(config)
    state.write_text(json.dumps(record))
    (out / "runs.jsonl").write_text(table)
    assert calls == [(str(out / "L1-E8-H2-T320"), True)]


def test_a_changed_config_does_not_reuse_runs_trained_with_the_old_one(swept, tmp_path):
    config, out, _ = swept
    changed = tmp_path / "changed.toml"
    changed.write_text(config.read_text().replace("lr = 1e-2", "lr = 5e-3"))
    table = (out / "runs.jsonl").read_text()
    with pytest.raises(InputError, match=r"trained with other settings \(lr\).*another --out-dir"):
        sweep_mod.run_sweep(changed)
    assert (out / "runs.jsonl").read_text() == table


def _synthetic_table(path, k=4, noise=0.005, tokenizer="t"):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for n in np.geomspace(1e7, 1e9, k):
            for d in np.geomspace(1e9, 1e11, k):
                loss = float(HOFFMANN.loss(n, d) * (1 + noise * rng.standard_normal()))
                f.write(
                    json.dumps(
                        {
                            "name": f"n{n:.2g}-d{d:.2g}",
                            "n_params": n,
                            "n_params_non_embedding": n,
                            "tokens": d,
                            "val_loss": loss,
                            "tokenizer": tokenizer,
                        }
                    )
                    + "\n"
                )
    return path


def test_fit_command_predicts_held_out_run_and_writes_json_and_plots(tmp_path, cli):
    table = _synthetic_table(tmp_path / "runs.jsonl")
    args = [
        "scaling",
        "fit",
        table,
        "--hold-out",
        "1",
        "--bootstrap",
        "5",
        "--predict",
        "1e9",
        "2e10",
        "--compute",
        "1e21",
        "--out",
        tmp_path / "fit.json",
    ]
    if importlib.util.find_spec("matplotlib"):
        args += ["--plots", tmp_path / "plots"]
    proc = cli(*args, check=True)
    result = json.loads((tmp_path / "fit.json").read_text())
    assert result["n_runs"] == 15
    held = result["held_out"][0]
    assert (held["n"], held["d"]) == (1e9, 1e11)  # the run with the most compute
    assert abs(held["error"]) < 0.05 and f"{held['error']:+.2%}" in proc.stdout
    assert result["predictions"][0]["loss"] == pytest.approx(HOFFMANN.loss(1e9, 2e10), rel=0.02)
    alloc = result["allocation"][0]
    assert alloc["compute"] == 1e21 and 6 * alloc["n"] * alloc["d"] == pytest.approx(1e21)
    assert alloc["tokens_per_param"] == pytest.approx(alloc["d"] / alloc["n"])
    law = result["chinchilla"]
    assert law["alpha"] == pytest.approx(0.34, rel=0.1) and law["beta"] == pytest.approx(0.28, rel=0.1)
    for key in ("E", "alpha", "beta", "a", "b", "alpha_C"):
        assert key in result["intervals"]
    if "--plots" in args:
        for name in ("loss_vs_compute.png", "isoflops.png", "residuals.png"):
            assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_command_refuses_mixed_tokenizers(tmp_path, cli):
    a = _synthetic_table(tmp_path / "a.jsonl", tokenizer="bpe-1")
    b = _synthetic_table(tmp_path / "b.jsonl", tokenizer="char-2")
    proc = cli("scaling", "fit", a, b, "--bootstrap", "0")
    assert proc.returncode != 0 and not (tmp_path / "fit.json").exists()
    assert proc.stderr.startswith("error: ") and "2 different tokenizers" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_fit_command_names_runs_with_nan_loss(tmp_path, cli):
    table = _synthetic_table(tmp_path / "runs.jsonl")
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[3]["val_loss"] = None  # a run that diverged or had no validation split
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("scaling", "fit", table, "--bootstrap", "0", "--out", tmp_path / "fit.json")
    assert proc.returncode != 0 and rows[3]["name"] in proc.stderr and not (tmp_path / "fit.json").exists()


def test_fit_command_on_too_few_runs(swept, cli):
    _, out, _ = swept
    proc = cli("scaling", "fit", out)
    assert proc.returncode != 0 and "4 run(s) are too few" in proc.stderr


def test_sweep_config_errors_name_the_fix(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('data = ["x.txt"]\n')
    with pytest.raises(InputError, match=r"\[sweep\] table"):
        sweep_mod.read_sweep_config(bad)
    bad.write_text('[sweep]\nmodels = ["d1"]\ntokens = [-5]\n')
    with pytest.raises(InputError, match="positive numbers"):
        sweep_mod.read_sweep_config(bad)
    bad.write_text('warmup_steps = 50\nbatch_size = 4\nblock_size = 16\n[sweep]\nmodels = ["d1"]\ntokens = [640]\n')
    base, grid = sweep_mod.read_sweep_config(bad)
    with pytest.raises(InputError, match="warmup_steps 50"):
        sweep_mod.run_config(base, grid[0], tmp_path)


def test_shipped_sweep_configs_resolve_to_valid_training_configs(tmp_path):
    from lmstack.cli.scaling import shipped_sweeps

    assert "scaling_shakespeare_char" in shipped_sweeps()
    for path in shipped_sweeps().values():
        base, grid = sweep_mod.read_sweep_config(path)
        configs = [sweep_mod.run_config(base, point, tmp_path) for point in grid]
        assert len({c.out_dir for c in configs}) == len(grid) > 6
        assert len({c.data_dir for c in configs}) == 1  # one tokenization shared by every run


def test_fit_command_can_use_non_embedding_parameters(tmp_path, cli):
    table = _synthetic_table(tmp_path / "runs.jsonl", noise=0.0)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    for r in rows:
        r["n_params_non_embedding"] = r["n_params"] / 2
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fits = {}
    for params in ("total", "non_embedding"):
        cli("scaling", "fit", table, "--params", params, "--bootstrap", "0", "--out", tmp_path / f"{params}.json", check=True)
        fits[params] = json.loads((tmp_path / f"{params}.json").read_text())["chinchilla"]
    # Halving every N leaves the exponent and rescales A by 2^-alpha: A/N^alpha is unchanged.
    assert fits["non_embedding"]["alpha"] == pytest.approx(fits["total"]["alpha"], rel=1e-3)
    assert fits["non_embedding"]["A"] == pytest.approx(fits["total"]["A"] * 2 ** -fits["total"]["alpha"], rel=1e-2)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda rows: rows.__setitem__(2, list(rows[2].values())), ":3: a run must be a JSON object of named columns, got list"),
        (lambda rows: rows[4].__setitem__("tokens", "lots"), ":5: tokens is 'lots', not a number"),
        (lambda rows: rows[0].__setitem__("val_loss", [2.5]), ":1: val_loss is [2.5], not a number"),
        (lambda rows: rows.__setitem__(1, None), ":2: a run must be a JSON object of named columns, got NoneType"),
    ],
)
def test_malformed_table_rows_are_named_by_line(tmp_path, damage, problem):
    table = _synthetic_table(tmp_path / "runs.jsonl")
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    damage(rows)
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=re.escape(f"{table}{problem}")):
        sweep_mod.load_runs([table])


def test_a_csv_cell_that_is_not_a_number_is_named(tmp_path):
    table = tmp_path / "runs.csv"
    table.write_text("name,n_params,tokens,val_loss\na,1e6,2e6,3.1\nb,1e6,two million,3.0\n")
    with pytest.raises(InputError, match=r"runs.csv:3: tokens is 'two million', not a number"):
        sweep_mod.load_runs([table])


def test_fit_command_on_a_binary_file_is_one_clear_line(tmp_path, cli):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    proc = cli("scaling", "fit", blob, "--out", tmp_path / "fit.json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "looks binary" in proc.stderr and not (tmp_path / "fit.json").exists()

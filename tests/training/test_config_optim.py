import argparse
import math

import pytest
import torch

from lmstack.errors import InputError
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.training import config as config_mod
from lmstack.training.config import TrainConfig
from lmstack.training.optim import lr_at, make_optimizer


def parse(*argv):
    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\nbatch_size = 8\ndata = ["a.txt"]\n[model]\nn_layer = 3\nn_head = 2\n')
    cfg = config_mod.resolve(
        config_mod.read_file(f), parse("--batch-size", "4", "--model", "n_layer=5", "--model", "dropout=0.1", "--compile")
    )
    assert (cfg.lr, cfg.batch_size, cfg.data, cfg.compile) == (0.01, 4, ["a.txt"], True)
    assert cfg.model == {"n_layer": 5, "n_head": 2, "dropout": 0.1}
    assert cfg.max_steps == TrainConfig().max_steps
    config_mod.save(cfg, tmp_path)
    assert config_mod.resolve(config_mod.read_file(tmp_path / config_mod.CONFIG_FILE)) == cfg


def test_config_errors_name_the_field(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("learning_rate = 0.1\n")
    with pytest.raises(InputError, match=r"unknown config fields \['learning_rate'\]"):
        config_mod.read_file(f)
    f.write_text('lr = "fast"\n')
    with pytest.raises(InputError, match="'lr' must be float"):
        config_mod.resolve(config_mod.read_file(f))
    f.write_text("lr = [\n")
    with pytest.raises(InputError, match="not valid TOML"):
        config_mod.read_file(f)
    with pytest.raises(InputError, match="objective must be"):
        TrainConfig(objective="dpo")
    with pytest.raises(InputError, match="KEY=VALUE"):
        config_mod.resolve({}, parse("--model", "n_layer"))


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # decay_steps sets the schedule's length independently of where the run stops
    assert lr_at(60, TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=30, decay_steps=110)) == pytest.approx(0.55)


def test_warmup_stable_decay_is_flat_then_linear():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=10, max_steps=100, wsd_decay_fraction=0.2)
    assert lr_at(10, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(80, cfg) == pytest.approx(0.95) and lr_at(89, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.0) and math.isclose(lr_at(100, cfg), 0.0)
    assert lr_at(50, TrainConfig(lr=1.0, schedule="constant", warmup_steps=0)) == 1.0


def test_weight_decay_skips_biases_and_norms():
    model = GPT(GPTConfig.preset("tiny", vocab_size=50))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert "wte.weight" in {names[id(p)] for p in decay["params"]}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert isinstance(opt, torch.optim.AdamW)


def test_objective_settings_are_tables_checked_by_key(tmp_path):
    """[span] / --span hold span corruption's settings; a wrong key or value is named, and a run
    saved by an older lmstack (top-level noise_density, ...) still reads."""
    f = tmp_path / "c.toml"
    f.write_text('objective = "span"\nfamily = "t5"\n[span]\nmean_span = 5.0\n')
    cfg = config_mod.resolve(config_mod.read_file(f))
    assert cfg.span == {"mean_span": 5.0}
    with pytest.raises(InputError, match=r"\[span\].*unknown key\(s\) \['mean'\]; known: \['mean_span', 'noise_density'\]"):
        TrainConfig(span={"mean": 2})
    with pytest.raises(InputError, match=r"\[mlm\].*probability must be in \[0, 1\]"):
        TrainConfig(mlm={"probability": 2.0})
    old = tmp_path / "train_config.json"
    old.write_text('{"objective": "span", "family": "t5", "noise_density": 0.3, "mean_span": 2.0, "rtd_weight": 10.0}')
    values = config_mod.read_file(old)
    assert values["span"] == {"noise_density": 0.3, "mean_span": 2.0} and values["rtd"] == {"weight": 10.0}

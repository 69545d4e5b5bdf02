"""`lmstack finetune --task classify`: a tiny BERT and a tiny GPT learn a separable task (checked
on held-out rows, and again through `load_classifier`), macro-F1 matches its closed form, the GPT
reads the last real token of right-padded rows, LoRA trains only adapters and the head, a run
resumes exactly, and bad input fails with one clear message before the run directory exists."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmstack.data.sft import split
from lmstack.errors import InputError
from lmstack.models.bert import BERT, BERTConfig
from lmstack.models.checkpoint import load
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.lora import lora_modules
from lmstack.tokenizers.char import CharTokenizer
from lmstack.training import checkpoint
from lmstack.training.classify import classify, load_classifier, macro_f1
from lmstack.training.embed import pad_rows, sequence_features, text_ids
from lmstack.training.finetune import FinetuneConfig

FILLER = "the movie was plot actor really quite very film story".split()
SPECIALS = ("<|endoftext|>", "<|mask|>", "<|cls|>", "<|sep|>")


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """Four filler words and one of "good" / "bad" somewhere: the label says which."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), "good" if label == "pos" else "bad")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model(family: str, tok, dropout: float = 0.0):
    torch.manual_seed(0)
    if family == "gpt":
        return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=dropout))
    sp = tok.special_tokens
    return BERT(
        BERTConfig(
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=64,
            max_position=64,
            dropout=dropout,
            mask_token_id=sp["<|mask|>"],
            cls_token_id=sp["<|cls|>"],
            sep_token_id=sp["<|sep|>"],
        )
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A JSONL file of 160 reviews and random tiny BERT and GPT checkpoints with a char tokenizer."""
    root = tmp_path_factory.mktemp("classify")
    rows = review_rows(160)
    tok = CharTokenizer.train([r["text"] for r in rows] + ["0123456789"], special_tokens=SPECIALS)
    for family in ("gpt", "bert"):
        tiny_model(family, tok).save(root / family, tok)
    return root, write_jsonl(root / "reviews.jsonl", rows), tok


def config(root, data, out, family="gpt", **kw):
    base = dict(
        task="classify",
        init_from=str(root / family),
        data=[str(data)],
        out_dir=str(out),
        max_steps=30,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=3,
        batch_size=16,
        eval_interval=0,
        val_fraction=0.2,
        device="cpu",
    )
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_a_tiny_model_learns_a_separable_task(setup, family, tmp_path):
    root, data, _ = setup
    cfg = config(root, data, tmp_path, family)
    last = classify(cfg)
    assert last["val_accuracy"] >= 0.9 and last["val_macro_f1"] >= 0.9
    # The checkpoint predicts as the run measured: the same held-out rows, the same accuracy.
    clf = load_classifier(last["checkpoint"])
    assert clf.labels == ["neg", "pos"]
    _, held_out = split([json.loads(line) for line in data.read_text().splitlines()], cfg.val_fraction, cfg.seed)
    texts = [r["text"] for r in held_out]
    predicted = clf.predict(texts)
    assert sum(p == r["label"] for p, r in zip(predicted, held_out)) / len(held_out) == pytest.approx(last["val_accuracy"])
    probs = clf.probabilities(texts)
    assert probs.shape == (len(texts), 2) and torch.allclose(probs.sum(-1), torch.ones(len(texts)))
    assert clf.predict(["film good story", "film bad story"]) == ["pos", "neg"]


def test_macro_f1_closed_form():
    # true 0 0 1 1 2 2, predicted 0 1 1 1 0 2; class 3 occurs in neither and does not count.
    true, pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]
    confusion = torch.zeros(4, 4)
    for t, p in zip(true, pred):
        confusion[t, p] += 1
    # F1 = 2TP / (2TP + FP + FN): class 0 2/(2+1+1), class 1 4/(4+1+0), class 2 2/(2+0+1)
    assert macro_f1(confusion) == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1(torch.eye(3) * 5) == 1.0


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_padded_rows_read_the_same_feature_as_each_row_alone(setup, family):
    """GPT: the state at the last real token (right padding, gathered at length - 1); BERT: the
    pooled [CLS] state, padding masked."""
    root, _, tok = setup
    model, _ = load(root / family)
    texts = ["good", "the movie was really quite bad", "film story"]
    rows = [text_ids(model, tok, t, 64)[0] for t in texts]
    with torch.no_grad():
        batched = sequence_features(model, **pad_rows(rows))
        for i, row in enumerate(rows):
            alone = torch.tensor([row])
            if family == "gpt":
                want = model.hidden_states(alone)[0, -1]
            else:
                want = model.pooled(alone)[0]
            assert (batched[i] - want).abs().max() < 1e-5
    if family == "bert":
        sp = tok.special_tokens
        assert rows[0] == [sp["<|cls|>"], *tok.encode("good"), sp["<|sep|>"]]


def test_lora_trains_only_adapters_and_the_head(setup, tmp_path):
    root, data, tok = setup
    last = classify(config(root, data, tmp_path, "bert", max_steps=3, lora={"r": 2, "alpha": 4}))
    ckpt = checkpoint.list_checkpoints(tmp_path)[-1]
    trained = {k.removeprefix("state.").rsplit(".", 1)[0] for k in load_file(str(ckpt / checkpoint.OPTIMIZER_FILE))}
    assert trained and all(".lora_" in name or name.startswith("head.") for name in trained)
    assert {"head.weight", "head.bias"} <= trained
    # The adapter directory loads as base + adapter; the base's own weights are untouched.
    base, _ = load(root / "bert")
    adapted, _ = load(ckpt)
    assert lora_modules(adapted)
    adapted_sd = adapted.state_dict()
    assert all(torch.equal(v, adapted_sd[k]) for k, v in base.state_dict().items())
    clf = load_classifier(last["checkpoint"])
    assert clf.probabilities(["film good story"]).shape == (1, 2)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(setup, tmp_path):
    root, data, _ = setup
    whole = classify(config(root, data, tmp_path / "a", max_steps=4, ckpt_interval=0))
    classify(config(root, data, tmp_path / "b", max_steps=2))
    resumed = classify(config(root, data, tmp_path / "b", max_steps=4), resume=True)
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    a = load_file(str(tmp_path / "a/checkpoints/step_0000004" / checkpoint.OBJECTIVE_FILE))
    b = load_file(str(tmp_path / "b/checkpoints/step_0000004" / checkpoint.OBJECTIVE_FILE))
    assert torch.allclose(a["head.weight"], b["head.weight"], atol=1e-6)


def test_bad_input_fails_before_the_run_directory_exists(setup, tmp_path):
    root, data, _ = setup
    good = review_rows(20, seed=1)

    def fails(rows, match, **kw):
        f = write_jsonl(tmp_path / "bad.jsonl", rows) if rows is not None else data
        with pytest.raises(InputError, match=match):
            classify(config(root, f, tmp_path / "run", **kw))
        assert not (tmp_path / "run").exists()

    fails(good[:3] + [{"label": "pos"}] + good[3:], r"bad.jsonl:4: no 'text' field")
    fails(good[:5] + [{"text": "hello"}], r"bad.jsonl:6: no 'label' field")
    fails([{**r, "label": "pos"} for r in good], r"only one label \('pos'\); a classifier needs at least two")
    fails(good[:2] + [{"text": "x", "label": 1}], r"bad.jsonl:3: label 1 is a int .* all strings or all integers")
    fails(good[:2] + [{"text": "x", "label": 1.5}], r"bad.jsonl:3: \"label\" must be a string or an integer")
    fails(good[:2] + [{"text": "", "label": "pos"}], r"bad.jsonl:3: \"text\" must be a non-empty string")
    # one "odd" row, held out by the seeded split: its label never reaches training
    rare = good + [{"text": "film odd story", "label": "odd"}]
    seed = next(s for s in range(100) if rare[-1] in split(rare, 0.2, s)[1])
    fails(rare, r"label 'odd' \(.*bad.jsonl:21\) is held out for validation but never occurs in the training rows", seed=seed)
    with pytest.raises(InputError, match=r"reads JSONL rows"):
        classify(config(root, root / "gpt" / "config.json", tmp_path / "run"))
    with pytest.raises(InputError, match="no such checkpoint directory"):
        classify(config(root, data, tmp_path / "run", family="missing"))
    assert not (tmp_path / "run").exists()


def test_the_finetune_command_trains_a_classifier(setup, tmp_path, lmstack_cli):
    root, data, _ = setup
    out = lmstack_cli(
        "finetune",
        "--task",
        "classify",
        "--init-from",
        root / "bert",
        "--data",
        data,
        "--out-dir",
        tmp_path,
        "--max-steps",
        2,
        "--batch-size",
        8,
        "--device",
        "cpu",
    )
    done = out.strip().splitlines()[-1]
    assert done.startswith("done: step 2") and "val_accuracy" in done and "val_macro_f1" in done
    assert load_classifier(done.rsplit("checkpoint ", 1)[1]).labels == ["neg", "pos"]

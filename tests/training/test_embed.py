"""`lmstack finetune --task embed` (SimCSE): InfoNCE against its closed form and a direct
computation, pooling against each row alone, dropout views, training that lowers the held-out
loss and ranks reordered sentences above unrelated ones, and bad input."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_classify import SPECIALS, tiny_model

from lmstack.errors import InputError
from lmstack.models.checkpoint import load, read_config
from lmstack.tokenizers.char import CharTokenizer
from lmstack.training import checkpoint
from lmstack.training.config import table
from lmstack.training.embed import EmbedOptions, SentenceEncoder, SimCSE, embed, info_nce, pad_rows, pool, with_dropout
from lmstack.training.finetune import FinetuneConfig
from lmstack.training.metrics import read_metrics

WORDS = "apple river stone cloud night bread horse tiger paper lemon grass storm candle mirror garden silver".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 3)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """150 three-word sentences (a text file) and random tiny GPT and BERT checkpoints, dropout 0."""
    root = tmp_path_factory.mktemp("embed")
    (root / "sentences.txt").write_text("\n".join(sentences(150)) + "\n")
    tok = CharTokenizer.train(WORDS, special_tokens=SPECIALS)
    for family in ("gpt", "bert"):
        tiny_model(family, tok).save(root / family, tok)
    return root, tok


def config(root, out, family="gpt", data=None, **kw):
    base = dict(
        task="embed",
        init_from=str(root / family),
        data=[str(data or root / "sentences.txt")],
        out_dir=str(out),
        max_steps=12,
        lr=3e-3,
        min_lr=1e-4,
        warmup_steps=2,
        batch_size=16,
        eval_interval=0,
        val_fraction=0.2,
        device="cpu",
    )
    return FinetuneConfig(**{**base, **kw})


def test_info_nce_closed_form_and_direct_computation():
    B = 4
    # identical views, orthogonal sentences: cos = 1 on the diagonal, 0 elsewhere, in both directions
    z = torch.eye(B, 8) * 3.0
    assert info_nce(z, z, 0.5).item() == pytest.approx(math.log(1 + (B - 1) * math.exp(-1 / 0.5)), rel=1e-5)
    # every sentence on one vector (collapse): the positive is no likelier than a negative, log B
    assert info_nce(torch.ones(B, 8), torch.ones(B, 8) * 2, 0.05).item() == pytest.approx(math.log(B), rel=1e-5)
    tau = 0.05
    # any views: the mean over rows of -log softmax(cos / tau) at the positive, both directions averaged
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 6), torch.randn(5, 6)
    cos = [[F.cosine_similarity(a, b, dim=0).item() for b in z2] for a in z1]

    def direction(c):
        return sum(-c[i][i] / tau + math.log(sum(math.exp(x / tau) for x in c[i])) for i in range(5)) / 5

    transposed = [list(col) for col in zip(*cos)]
    assert info_nce(z1, z2, tau).item() == pytest.approx((direction(cos) + direction(transposed)) / 2, rel=1e-5)


def test_pooling_reads_only_real_tokens():
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(pool(states, mask, "cls"), states[:, 0])
    assert torch.allclose(pool(states, mask, "mean")[1], states[1, :2].mean(0))
    assert torch.equal(pool(states, mask, "last"), torch.stack([states[0, 3], states[1, 1]]))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_views_differ_by_dropout_and_padding_changes_nothing(setup, family):
    root, tok = setup
    model, _ = load(root / family)
    assert model.config.dropout == 0
    trained = with_dropout(model, 0.1)
    assert trained.config.dropout == 0 and trained.drop.p == 0.1  # the config (and so the checkpoint) is kept
    objective = SimCSE(trained, "mean", 0.05)
    rows = [tok.encode("apple river"), tok.encode("stone cloud night bread")]
    batch = pad_rows(rows)
    z1, z2 = objective.views(batch)
    assert not torch.allclose(z1, z2)
    objective.eval()  # no dropout: the two views agree, and each equals its row run alone
    with torch.no_grad():
        z1, z2 = objective.views(batch)
        assert torch.equal(z1, z2)
        for i, row in enumerate(rows):
            alone = pad_rows([row])
            assert (objective.views(alone)[0][0] - z1[i]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_training_lowers_the_held_out_loss_and_groups_reordered_sentences(setup, family, tmp_path):
    root, _ = setup
    last = embed(config(root, tmp_path, family))
    vals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 12]
    assert vals[-1]["val_loss"] < 0.5 * vals[0]["val_loss"]
    assert vals[-1]["val_top1"] >= max(0.85, vals[0]["val_top1"]) and vals[-1]["val_pos_cos"] > vals[-1]["val_neg_cos"] + 0.3
    ckpt = checkpoint.list_checkpoints(tmp_path)[-1]
    assert read_config(ckpt)["dropout"] == 0  # trained with dropout 0.1, saved as it came
    assert json.loads((ckpt / "trainer_state.json").read_text())["embed"]["pooling"] == "mean"
    enc = SentenceEncoder.load(last["checkpoint"])
    # the same words reordered stay closer than sentences sharing no word
    rng = random.Random(1)
    pairs = [rng.sample(WORDS, 6) for _ in range(20)]
    a = enc.encode([" ".join(w[:3]) for w in pairs])
    same = enc.encode([" ".join(reversed(w[:3])) for w in pairs])
    other = enc.encode([" ".join(w[3:]) for w in pairs])

    def cos(x, y):
        return F.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y)).mean().item()

    assert cos(a, same) > cos(a, other) + 0.2


def test_lora_embeddings_train_only_adapters(setup, tmp_path):
    root, tok = setup
    last = embed(config(root, tmp_path, "gpt", max_steps=2, lora={"r": 2, "alpha": 4}))
    enc = SentenceEncoder.load(last["checkpoint"])  # an adapter directory
    base = SentenceEncoder.load(root / "gpt")
    x = ["apple river stone"]
    assert enc.encode(x).shape == (1, 32) and not (enc.encode(x) == base.encode(x)).all()


def test_bad_input(setup, tmp_path):
    root, _ = setup
    (tmp_path / "empty.jsonl").write_text('{"text": "apple"}\n{"text": "  "}\n')
    (tmp_path / "few.txt").write_text("apple river\nstone cloud\n\napple river\n")

    def fails(match, **kw):
        with pytest.raises(InputError, match=match):
            embed(config(root, tmp_path / "run", **kw))
        assert not (tmp_path / "run").exists()

    fails(r"empty.jsonl:2: \"text\" must be a non-empty string", data=tmp_path / "empty.jsonl")
    fails(r"2 distinct sentences give 1 to train on and 1 held out", data=tmp_path / "few.txt", val_fraction=0.5)
    fails(r"--batch-size 2 or more", batch_size=1)
    fails(r"no such file", data=tmp_path / "missing.txt")
    with pytest.raises(InputError, match=r"\[embed\].*temperature must be > 0"):
        table(EmbedOptions, {"temperature": 0}, "embed")
    with pytest.raises(InputError, match=r"\[embed\].*unknown key"):
        table(EmbedOptions, {"temp": 0.1}, "embed")

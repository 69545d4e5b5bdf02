"""Reward models: the reward is transformers' sequence-classification score at the last token, the
loss is Bradley–Terry's, a run learns a held-out preference, the checkpoint scores text from
Python and the command line, and wrong checkpoints get one clear error."""

import pytest
import torch
import torch.nn.functional as F
from test_dpo import rule_rows, tiny_chat_gpt, write_jsonl

from lmstack.cli import main
from lmstack.data.pairs import collate_pairs, read_pairs
from lmstack.errors import CheckpointError, InputError
from lmstack.models.checkpoint import load
from lmstack.training.metrics import read_metrics
from lmstack.training.reward import RewardConfig, RewardModel, load_reward_model, train_reward


@pytest.fixture
def tiny(tmp_path):
    return tiny_chat_gpt(tmp_path / "tiny")


def test_gpt_reward_is_transformers_sequence_classification_score_and_the_loss_is_bradley_terry(tiny, tmp_path):
    from transformers import GPT2ForSequenceClassification

    from lmstack.models.hf import to_hf

    model, tok = load(tiny)
    objective = RewardModel(model).eval()
    torch.nn.init.normal_(objective.head.weight)
    pairs, _ = read_pairs(write_jsonl(tmp_path / "p.jsonl", rule_rows(4, 0, "pairs")), tok, 96)
    batch = collate_pairs(pairs)
    real = batch["segments"] > 0
    pad = max(set(range(tok.vocab_size)) - set(batch["idx"][real].tolist()))  # an id no row uses
    to_hf(model, tmp_path / "hf")
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1, pad_token_id=pad).eval()
    hf.score.weight.data.copy_(objective.head.weight)  # HF's score has no bias; ours starts at 0
    with torch.no_grad():
        theirs = hf(batch["idx"].masked_fill(~real, pad)).logits[:, 0]
        ours = objective.rewards(batch)
        loss = objective(batch)
    assert ours.tolist() == pytest.approx(theirs.tolist(), abs=1e-5)
    chosen, rejected = theirs.chunk(2)
    assert float(loss) == pytest.approx(float(-F.logsigmoid(chosen - rejected).mean()), abs=1e-6)


def test_a_reward_model_learns_a_held_out_preference_and_scores_text(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(80, 1, "pairs"))
    last = train_reward(
        RewardConfig(
            init_from=str(tiny),
            data=[str(data)],
            out_dir=str(tmp_path / "rm"),
            max_length=96,
            batch_size=8,
            max_steps=25,
            lr=1e-2,
            min_lr=1e-3,
            warmup_steps=2,
            eval_interval=0,
            val_fraction=0.2,
        )
    )
    evals = [r for r in read_metrics(tmp_path / "rm") if "val_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 25
    assert evals[-1]["val_accuracy"] == 1.0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    scorer = load_reward_model(last["checkpoint"])
    held_out = rule_rows(10, 7, "pairs")
    chosen = scorer.score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = scorer.score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    assert bool((chosen > rejected).all())
    capsys.readouterr()
    assert (
        main(
            [
                "align",
                "score-reward",
                "--reward-model",
                last["checkpoint"],
                "--prompt",
                "Say lemon",
                "--continuation",
                "Answer: lemon!",
                "--continuation",
                "Answer: lemon.",
                "--json",
            ]
        )
        == 0
    )
    import json

    liked, other = [json.loads(line)["reward"] for line in capsys.readouterr().out.splitlines()]
    assert liked > other
    assert liked == pytest.approx(float(scorer.score(["Say lemon"], ["Answer: lemon!"])[0]), abs=1e-5)


def test_wrong_checkpoints_and_empty_replies_get_one_clear_error(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not a reward model.*lmstack align reward"):
        load_reward_model(tiny)
    assert main(["align", "score-reward", "--reward-model", str(tiny), "--prompt", "a", "--continuation", "b"]) != 0
    with pytest.raises(InputError, match="no preference pairs"):
        train_reward(RewardConfig(init_from=str(tiny), out_dir=str(tmp_path / "rm")))
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(10, 1, "pairs"))
    last = train_reward(
        RewardConfig(
            init_from=str(tiny),
            data=[str(data)],
            out_dir=str(tmp_path / "rm"),
            max_length=96,
            batch_size=2,
            max_steps=1,
            warmup_steps=0,
            eval_interval=0,
        )
    )
    with pytest.raises(InputError, match="response 1 is empty"):
        load_reward_model(last["checkpoint"]).score(["a", "b"], ["fine", " "])


def test_bert_reward_is_transformers_sequence_classification_score_of_the_pooled_cls(tmp_path):
    from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

    from lmstack.data.pairs import Pair
    from lmstack.models.bert import from_hf_bert

    torch.manual_seed(0)
    hf_cfg = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForPreTraining(hf_cfg).save_pretrained(tmp_path / "bert")  # with a pooler
    model, _ = from_hf_bert(tmp_path / "bert")
    objective = RewardModel(model).eval()
    torch.nn.init.normal_(objective.head.weight)
    torch.nn.init.normal_(objective.head.bias)
    hf = BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=1).eval()
    hf.classifier.load_state_dict(objective.head.state_dict())
    cls, sep = [1], [2]
    pairs = [
        Pair(cls + [5, 6, 7] + sep, [8, 9] + sep, [10] + sep, "a"),
        Pair(cls + [11] + sep, [12, 13, 14] + sep, [15] + sep, "b"),
    ]
    batch = collate_pairs(pairs)
    types = torch.zeros_like(batch["idx"])
    for i, p in enumerate(pairs + pairs):
        types[i, len(p.prompt) :] = 1  # [CLS] prompt [SEP] is segment 0, the reply and its [SEP] segment 1
    with torch.no_grad():
        theirs = hf(batch["idx"], attention_mask=(batch["segments"] > 0).long(), token_type_ids=types).logits[:, 0]
        ours = objective.rewards(batch)
    assert ours.tolist() == pytest.approx(theirs.tolist(), abs=1e-5)


def test_a_bert_reward_model_trains_on_pairs_and_scores_text(tmp_path):
    from lmstack.models.bert import BERT, BERTConfig
    from lmstack.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyzASY :.!"], special_tokens=("[CLS]", "[SEP]", "[MASK]"))
    ids = tok.special_tokens
    torch.manual_seed(0)
    BERT(
        BERTConfig(
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=64,
            max_position=64,
            dropout=0.0,
            cls_token_id=ids["[CLS]"],
            sep_token_id=ids["[SEP]"],
            mask_token_id=ids["[MASK]"],
        )
    ).save(tmp_path / "b", tok)
    data = write_jsonl(tmp_path / "pairs.jsonl", rule_rows(60, 1, "pairs"))
    last = train_reward(
        RewardConfig(
            init_from=str(tmp_path / "b"),
            data=[str(data)],
            out_dir=str(tmp_path / "rm"),
            batch_size=8,
            max_steps=20,
            lr=3e-3,
            warmup_steps=2,
            eval_interval=0,
            val_fraction=0.2,
        )
    )
    assert last["val_accuracy"] >= 0.9
    scorer = load_reward_model(last["checkpoint"])
    assert float(scorer.score(["Say lemon"], ["Answer: lemon!"])[0]) > float(scorer.score(["Say lemon"], ["Answer: lemon."])[0])

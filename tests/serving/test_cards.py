"""Persona cards: `lmstack card create|list|show`, loading a card into a running scheduler, and
refusing cards of another base or from outside the cards folder."""

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import CheckpointError, InputError
from lmstack.generation import GenerationConfig
from lmstack.generation.scheduler import Scheduler
from lmstack.models import lora
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.serving.cards import card_dir_in, check_card, create_card, list_cards, load_card, read_card

V = 30


def adapter(tmp_path, name: str, n_embd: int = 32):
    """A LoRA adapter with non-zero weights, on a base checkpoint of its own width."""
    torch.manual_seed(0)
    base = tmp_path / f"base{n_embd}"
    if not base.exists():
        GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=n_embd)).save(base)
    model = GPT.load(base).eval()
    lora.attach(model, lora.LoraConfig(r=2, targets=("attn",)))
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(std=0.5)
    return lora.save_adapter(model, tmp_path / name, base), base


def test_card_create_list_show_and_serve(tmp_path, capsys):
    src, base = adapter(tmp_path, "adapter")
    cards = tmp_path / "cards"
    assert (
        main(
            [
                "card",
                "create",
                "--adapter",
                str(src),
                "--name",
                "pirate",
                "--system",
                "You are a pirate. 🏴‍☠️",
                "--description",
                "talks like a pirate",
                "--out",
                str(cards / "pirate"),
            ]
        )
        == 0
    )
    assert main(["card", "show", str(cards / "pirate")]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["name"] == "pirate" and shown["system"] == "You are a pirate. 🏴‍☠️" and shown["language"] == "en"
    assert shown["base_fingerprint"] == lora.base_fingerprint(GPT.load(base))
    assert main(["card", "list", "--cards-dir", str(cards), "--json"]) == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["pirate"]
    # the copied adapter still finds its base from the card's folder, and serving the card gives
    # what the adapter gives on its own
    ref, _ = lora.load_adapter_dir(cards / "pirate")
    sched = Scheduler(GPT.load(base).eval(), None)
    card = load_card(sched, cards / "pirate")
    assert sched.adapters == {"pirate": card.path}
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    rid = sched.add([1, 2, 3], config, adapter="pirate")
    out = []
    while sched.busy:
        out += [e.token for e in sched.step() if e.request == rid and e.token is not None]
    seq = [1, 2, 3]
    for _ in range(6):
        seq.append(int(ref.next_token_logprobs(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_a_card_for_another_base_is_refused(tmp_path):
    src, _ = adapter(tmp_path, "wide", n_embd=16)
    card = create_card(src, tmp_path / "cards" / "wide", "wide", "Be brief.")
    _, base = adapter(tmp_path, "narrow")
    sched = Scheduler(GPT.load(base).eval(), None)
    with pytest.raises(CheckpointError, match="made for another base"):
        load_card(sched, card.path)
    with pytest.raises(CheckpointError, match="made for another base"):
        check_card(read_card(card.path), GPT.load(base))
    assert sched.adapters == {}


def test_bad_cards_and_paths_are_clear_errors(tmp_path, capsys):
    src, _ = adapter(tmp_path, "adapter")
    with pytest.raises(InputError, match="card name '../x' is not valid"):
        create_card(src, tmp_path / "c", "../x", "hi")
    with pytest.raises(InputError, match="not a LoRA adapter directory"):
        create_card(tmp_path, tmp_path / "c", "ok", "hi")
    assert not (tmp_path / "c").exists()
    card = create_card(src, tmp_path / "cards" / "ok", "ok", "hi")
    (card.path / "card.json").write_text('{"name": "ok"}')
    with pytest.raises(CheckpointError, match="string fields"):
        read_card(card.path)
    assert main(["card", "show", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert list_cards(tmp_path / "empty") == []
    cards = tmp_path / "cards"
    assert card_dir_in(cards, "ok") == (cards / "ok").resolve()
    for outside in ("../adapter", str(src), ".", "ok/../../adapter"):
        with pytest.raises(InputError, match="only from inside the cards folder"):
            card_dir_in(cards, outside)

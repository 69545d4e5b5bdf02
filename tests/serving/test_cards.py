"""Persona cards: `lmstack card create|list|show`, loading a card into a running scheduler, and
refusing cards of another base (architecture or weights), adapters a server cannot load, and cards
from outside the cards folder."""

import json
import shutil

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import CheckpointError, InputError
from lmstack.generation import GenerationConfig
from lmstack.generation.scheduler import Scheduler
from lmstack.models import lora
from lmstack.models.base import input_major
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.multi_lora import MultiLoraLinear
from lmstack.serving.cards import card_dir_in, check_card, create_card, list_cards, load_card, read_card, weights_fingerprint
from lmstack.tokenizers.char import CharTokenizer

V = 30


def adapter(tmp_path, name: str, n_embd: int = 32, seed: int = 0, **lora_settings):
    """A LoRA adapter with non-zero weights, on a base checkpoint of its own width and seed."""
    torch.manual_seed(seed)
    base = tmp_path / f"base{n_embd}-{seed}"
    if not base.exists():
        GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=n_embd)).save(base)
    model = GPT.load(base).eval()
    lora.attach(model, lora.LoraConfig(r=2, targets=("attn",), **lora_settings))
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


def test_a_card_for_another_base_of_the_same_architecture_is_refused(tmp_path):
    """Two bases of one config (another seed) share the architecture fingerprint; the card's
    weights fingerprint tells them apart, and stays its base's through input_major and loaded cards."""
    src, base = adapter(tmp_path, "a0", seed=0)
    card = create_card(src, tmp_path / "cards" / "a0", "a0", "hi")
    other_src, other = adapter(tmp_path, "a1", seed=1)
    assert card.base_fingerprint == lora.base_fingerprint(GPT.load(other))
    sched = Scheduler(GPT.load(other).eval(), None)
    with pytest.raises(CheckpointError, match="made for another base model of this architecture.*adapter trained on this base"):
        load_card(sched, card.path)
    assert sched.adapters == {}
    # on its own base, laid out for serving and already carrying another card, it loads
    model = GPT.load(base).eval()
    input_major(model)
    sched = Scheduler(model, None)
    load_card(sched, create_card(src, tmp_path / "cards" / "b0", "b0", "hi").path)
    load_card(sched, card.path)
    assert any(isinstance(m, MultiLoraLinear) for m in model.modules())
    assert weights_fingerprint(model) == read_card(card.path).base_weights == weights_fingerprint(GPT.load(base))
    # a card written before weights were fingerprinted is checked by architecture only
    manifest = json.loads((card.path / "card.json").read_text())
    del manifest["base_weights"]
    (card.path / "card.json").write_text(json.dumps(manifest))
    check_card(read_card(card.path), GPT.load(other))
    # the base must be readable when the card is made
    shutil.rmtree(other)
    with pytest.raises(CheckpointError, match=f"its base .*{other.name}.* is not a checkpoint directory"):
        create_card(other_src, tmp_path / "cards" / "a1", "a1", "hi")
    assert not (tmp_path / "cards" / "a1").exists()


def test_card_create_refuses_an_adapter_that_trains_whole_modules(tmp_path, capsys):
    """A vocabulary grown for chat tokens makes the adapter carry whole embeddings, which a server
    cannot share between rows: refused when the card is made, with fixes a user can run."""
    src, base = adapter(tmp_path, "grown", modules_to_save=("embeddings",))
    out = tmp_path / "cards" / "grown"
    assert main(["card", "create", "--adapter", str(src), "--name", "g", "--system", "hi", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trains whole modules" in err
    assert f"lmstack lora merge --adapter {src}" in err and "--special '<|system|>'" in err
    assert not out.exists()
    with pytest.raises(CheckpointError, match="lmstack lora merge"):  # what a server says of such a card
        lora.adapter_updates(GPT.load(base), src)


def test_card_list_takes_the_folder_as_an_argument(tmp_path, capsys):
    src, _ = adapter(tmp_path, "adapter")
    cards = tmp_path / "cards"
    create_card(src, cards / "pirate", "pirate", "hi")
    for args in ([str(cards)], ["--cards-dir", str(cards)]):
        assert main(["card", "list", *args]) == 0
        assert capsys.readouterr().out.startswith("pirate\t")
    assert main(["card", "list", str(cards), "--cards-dir", str(tmp_path)]) == 2
    assert "name one" in capsys.readouterr().err


def test_card_holds_the_adapter_not_the_training_state(tmp_path, capsys):
    """A finetune checkpoint's optimizer, random state and trainer state stay behind; the adapter's
    tokenizer (its chat tokens) comes along, and the card verifies as it is."""
    src, _ = adapter(tmp_path, "adapter")
    CharTokenizer.train(["ahoy"], special_tokens=("<|endoftext|>", "<|user|>")).save(src)
    for junk in ("optimizer.safetensors", "rng_0.safetensors", "trainer_state.json", "checksums.json"):
        (src / junk).write_text("{}")
    card = create_card(src, tmp_path / "card", "c", "hi")
    names = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "card.json", "checksums.json"}
    assert {f.name for f in card.path.iterdir()} == names
    assert main(["verify", str(card.path)]) == 0


def test_card_create_does_not_overwrite_without_force(tmp_path, capsys):
    src, _ = adapter(tmp_path, "adapter")
    out = tmp_path / "cards" / "c"
    create_card(src, out, "first", "hi")
    (out / "notes.txt").write_text("mine")
    before = (out / "card.json").read_text()
    args = ["card", "create", "--adapter", str(src), "--name", "second", "--system", "hi", "--out", str(out)]
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "card.json").read_text() == before
    assert main([*args, "--force"]) == 0
    assert read_card(out).name == "second" and not (out / "notes.txt").exists()
    with pytest.raises(InputError, match="adapter directory lies there"):
        create_card(src, tmp_path, "x", "hi", force=True)

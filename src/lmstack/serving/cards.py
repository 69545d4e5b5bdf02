"""Persona cards: a LoRA adapter plus a manifest, plugged into a running base model.

A card directory is a PEFT-format LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`, from `lmstack finetune --lora`) and `card.json`:

    {"name": ..., "description": ..., "system": <system prompt>, "language": ...,
     "base_fingerprint": <sha256 of the base's config, as lmstack's adapters store it>}

The fingerprint names the base architecture, so a card made for another base is refused when it
is loaded (CheckpointError), before any weight is read into the batch.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from lmstack.errors import CheckpointError, FormatError, InputError
from lmstack.io import output_dir, read_json, write_json
from lmstack.models import lora

CARD_FILE = "card.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
FIELDS = ("name", "description", "system", "language", "base_fingerprint")


@dataclass
class Card:
    name: str
    description: str
    system: str  # the system prompt a chat with this card starts from
    language: str
    base_fingerprint: str
    path: Path  # the card directory

    def manifest(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "path"}


def check_name(name: str) -> str:
    """Card names are model names in the API: 1-64 letters, digits and . _ : - (no slashes)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(
            f"card name {name!r} is not valid: use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return name


def create_card(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    system: str,
    description: str = "",
    language: str = "en",
) -> Card:
    """Write a card directory at `out_dir`: the adapter's files (its base path rewritten to stay
    valid from the new place) and card.json."""
    src, out = Path(adapter_dir), Path(out_dir)
    check_name(name)
    if not lora.is_adapter_dir(src):
        raise InputError(
            f"{src}: not a LoRA adapter directory (no {lora.ADAPTER_CONFIG}); pass the output of `lmstack finetune --lora`"
        )
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: that is the adapter directory; pick another --out")
    fingerprint = lora.adapter_fingerprint(src)
    acfg = read_json(src / lora.ADAPTER_CONFIG, "adapter config")
    with output_dir(out, "--out") as d:
        for f in src.iterdir():
            if f.is_file() and f.name not in (lora.ADAPTER_CONFIG, CARD_FILE):
                shutil.copyfile(f, d / f.name)
        write_json(d / lora.ADAPTER_CONFIG, {**acfg, "base_model_name_or_path": _rebased(acfg, src, out)})
        card = Card(name, description, system, language, fingerprint, out)
        write_json(d / CARD_FILE, card.manifest())
    return card


def _rebased(acfg: dict, src: Path, out: Path) -> str | None:
    """The adapter's base path as seen from `out`: a relative path counts from the adapter, so it
    moves with the files; a name that is not a local directory (a Hub id) stays as it is."""
    name = acfg.get("base_model_name_or_path")
    if not name or Path(name).is_absolute() or not (src / name).is_dir():
        return name
    return os.path.relpath((src / name).resolve(), out.resolve())


def read_card(card_dir: str | os.PathLike) -> Card:
    """The card at `card_dir` (CheckpointError naming the file when it is not one)."""
    p = Path(card_dir)
    if not (p / CARD_FILE).is_file():
        raise CheckpointError(
            f"{p}: no {CARD_FILE}; make a card with `lmstack card create --adapter DIR --name N --system ... --out DIR`"
        )
    if not lora.is_adapter_dir(p):
        raise CheckpointError(f"{p}: a card needs its LoRA adapter ({lora.ADAPTER_CONFIG}) beside {CARD_FILE}")
    try:
        data = read_json(p / CARD_FILE, "card")
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in FIELDS):
        raise CheckpointError(
            f"{p / CARD_FILE}: must be a JSON object with string fields {list(FIELDS)}; write it again with `lmstack card create`"
        )
    try:
        check_name(data["name"])
    except InputError as e:
        raise CheckpointError(f"{p / CARD_FILE}: {e}") from None
    return Card(**{k: data[k] for k in FIELDS}, path=p)


def list_cards(cards_dir: str | os.PathLike) -> list[Card]:
    """The cards directly inside `cards_dir`, by name."""
    d = Path(cards_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such folder of cards; check --cards-dir")
    return sorted((read_card(p) for p in d.iterdir() if (p / CARD_FILE).is_file()), key=lambda c: c.name)


def card_dir_in(cards_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` (relative to `cards_dir`, or absolute) if it lies inside `cards_dir`, links resolved;
    anything outside it is refused (a server loads cards from its cards folder only)."""
    root = Path(cards_dir).resolve()
    target = (root / path).resolve()
    if target == root or not target.is_relative_to(root):
        raise InputError(f"{path}: cards load only from inside the cards folder {cards_dir}; give a card folder there")
    return target


def check_card(card: Card, model) -> None:
    """Refuse a card made for another base (its fingerprint is not this model's)."""
    if not is_dataclass(getattr(model, "config", None)):
        raise InputError(
            f"a {getattr(model, 'family', type(model).__name__)} model takes no cards (LoRA adapters); "
            "serve cards on a neural base (GPT, RNN, T5)"
        )
    if card.base_fingerprint != lora.base_fingerprint(model):
        raise CheckpointError(
            f"{card.path}: card {card.name!r} was made for another base model (fingerprint "
            f"{card.base_fingerprint[:12]}), not this {getattr(model, 'family', '')} model; "
            "load it on its own base"
        )


def load_card(scheduler, card_dir: str | os.PathLike) -> Card:
    """Read a card, check it belongs to the scheduler's base and serve it under its name."""
    card = read_card(card_dir)
    check_card(card, scheduler.model)
    scheduler.load_adapter(card.name, card.path)
    return card

"""Persona cards: a LoRA adapter plus a manifest, plugged into a running base model.

A card directory is a PEFT-format LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`, and the adapter's `tokenizer.json` if it has one, from
`lmstack finetune --lora`) and `card.json`:

    {"name": ..., "description": ..., "system": <system prompt>, "language": ...,
     "base_fingerprint": <sha256 of the base's config, as lmstack's adapters store it>,
     "base_weights": <weights_fingerprint of the base checkpoint the adapter names>}

`base_fingerprint` names the base architecture, `base_weights` the base itself: a card made for
another base (another architecture, or the same one with other weights: another seed, more
training) is refused when it is loaded (CheckpointError), before any weight is read into the
batch. Cards written before `base_weights` existed are checked by architecture only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import weakref
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch

from lmstack.errors import CheckpointError, FormatError, InputError
from lmstack.io import check_output_dir, output_dir, read_json, write_json
from lmstack.models import lora
from lmstack.models.checkpoint import TOKENIZER_FILE, write_checksums

CARD_FILE = "card.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
FIELDS = ("name", "description", "system", "language", "base_fingerprint")
SAMPLE = 4096  # values hashed per tensor by weights_fingerprint
_served_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its weights_fingerprint


@dataclass
class Card:
    name: str
    description: str
    system: str  # the system prompt a chat with this card starts from
    language: str
    base_fingerprint: str
    path: Path  # the card directory
    base_weights: str | None = None  # None on cards made before weights were fingerprinted

    def manifest(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "path" and v is not None}


def check_name(name: str) -> str:
    """Card names are model names in the API: 1-64 letters, digits and . _ : - (no slashes)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(
            f"card name {name!r} is not valid: use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return name


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's persistent state (`state_dict`, in name order): each tensor's name,
    shape, dtype and SAMPLE values evenly strided over its logical order. The config fingerprint
    is shared by every base of one architecture; this one changes with another seed or any
    training, yet costs milliseconds for a large model. It reads values by logical position, so a
    weight laid out input-major (`models.base.input_major`) or on a GPU hashes the same, and
    adapters served side by side (`multi_lora`, non-persistent buffers) leave it unchanged."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        n = t.numel()
        if n <= SAMPLE:
            values = t.reshape(-1)
        else:
            values = t[torch.unravel_index(torch.arange(SAMPLE, device=t.device) * n // SAMPLE, t.shape)]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(values.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _base_weights(adapter_dir: Path) -> str:
    """weights_fingerprint of the base checkpoint `adapter_dir` names; the adapter is checked on
    it as a server checks a card (lora.adapter_updates), so a card is made only from an adapter
    that `lmstack serve` can load."""
    try:
        model, _ = lora.load_base(adapter_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (a card records its base's weights, so the base must be readable)") from None
    lora.adapter_updates(model, adapter_dir)
    return weights_fingerprint(model)


def create_card(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    system: str,
    description: str = "",
    language: str = "en",
    force: bool = False,
) -> Card:
    """Write a card directory at `out_dir` (replacing a non-empty one only with `force`): the
    adapter's own files (its base path rewritten to stay valid from the new place; no optimizer or
    trainer state) and card.json, with the fingerprints of the base checkpoint the adapter names."""
    src, out = Path(adapter_dir), Path(out_dir)
    check_name(name)
    if not lora.is_adapter_dir(src):
        raise InputError(
            f"{src}: not a LoRA adapter directory (no {lora.ADAPTER_CONFIG}); pass the output of `lmstack finetune --lora`"
        )
    if src.resolve().is_relative_to(out.resolve()):
        raise InputError(f"{out}: the adapter directory lies there; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: already exists and is not empty; pass --force to replace it, or pick another --out")
    check_output_dir(out, "--out")  # before the base is read
    fingerprint = lora.adapter_fingerprint(src)
    weights = _base_weights(src)
    acfg = read_json(src / lora.ADAPTER_CONFIG, "adapter config")
    with output_dir(out, "--out", replace=True) as d:
        shutil.copyfile(src / lora.ADAPTER_WEIGHTS, d / lora.ADAPTER_WEIGHTS)
        if (src / TOKENIZER_FILE).is_file():  # a vocabulary or chat template of the adapter's own
            shutil.copyfile(src / TOKENIZER_FILE, d / TOKENIZER_FILE)
        write_json(d / lora.ADAPTER_CONFIG, {**acfg, "base_model_name_or_path": _rebased(acfg, src, out)})
        card = Card(name, description, system, language, fingerprint, out, weights)
        write_json(d / CARD_FILE, card.manifest())
        write_checksums(d, [f.name for f in d.iterdir() if f.is_file()])
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
    if (
        not isinstance(data, dict)
        or not all(isinstance(data.get(k), str) for k in FIELDS)
        or not isinstance(data.get("base_weights", ""), str)
    ):
        raise CheckpointError(
            f"{p / CARD_FILE}: must be a JSON object with string fields {list(FIELDS)} (and optionally base_weights); "
            "write it again with `lmstack card create`"
        )
    try:
        check_name(data["name"])
    except InputError as e:
        raise CheckpointError(f"{p / CARD_FILE}: {e}") from None
    return Card(**{k: data[k] for k in FIELDS}, path=p, base_weights=data.get("base_weights"))


def list_cards(cards_dir: str | os.PathLike) -> list[Card]:
    """The cards directly inside `cards_dir`, by name."""
    d = Path(cards_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such folder of cards; name the folder that holds the card directories")
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
    """Refuse a card made for another base: another architecture (config fingerprint) or, for
    cards that record it, other weights. The served model's weights are hashed once and
    remembered, before the card's adapter is installed."""
    if not is_dataclass(getattr(model, "config", None)):
        raise InputError(
            f"a {getattr(model, 'family', type(model).__name__)} model takes no cards (LoRA adapters); "
            "serve cards on a neural base (GPT, RNN, T5)"
        )
    family = getattr(model, "family", "")
    if card.base_fingerprint != lora.base_fingerprint(model):
        raise CheckpointError(
            f"{card.path}: card {card.name!r} was made for another base model (fingerprint "
            f"{card.base_fingerprint[:12]}), not this {family} model; load it on its own base"
        )
    if card.base_weights and isinstance(model, torch.nn.Module):
        if model not in _served_weights:
            _served_weights[model] = weights_fingerprint(model)
        if card.base_weights != _served_weights[model]:
            raise CheckpointError(
                f"{card.path}: card {card.name!r} was made for another base model of this architecture "
                f"(its weights fingerprint {card.base_weights[:12]}, this {family} model's {_served_weights[model][:12]}); "
                "make the card from an adapter trained on this base (`lmstack finetune --init-from THIS_BASE --lora ...`, "
                "then `lmstack card create`), or serve it on the base it was made for"
            )


def load_card(scheduler, card_dir: str | os.PathLike) -> Card:
    """Read a card, check it belongs to the scheduler's base and serve it under its name."""
    card = read_card(card_dir)
    check_card(card, scheduler.model)
    scheduler.load_adapter(card.name, card.path)
    return card

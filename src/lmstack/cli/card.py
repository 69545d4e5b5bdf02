"""`lmstack card create|list|show`: persona cards (a LoRA adapter plus card.json)."""

from __future__ import annotations

import json

from lmstack.cli import add_group


def register(sub) -> None:
    group = add_group(
        sub,
        "card",
        help="persona cards: a LoRA adapter with a name, a system prompt and a description",
        description="A card directory is a LoRA adapter (from `lmstack finetune --lora`) plus card.json "
        "(name, description, system prompt, language, base fingerprint). `lmstack serve` loads cards "
        "into a running base model; a card made for another base is refused.",
    )
    p = group.add_parser("create", help="make a card directory from a LoRA adapter")
    p.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory")
    p.add_argument("--name", required=True, help="card name (its model name in the API): letters, digits, . _ : -")
    p.add_argument("--system", required=True, help="the system prompt a chat with this card starts from")
    p.add_argument("--description", default="", help="one line about the card")
    p.add_argument("--language", default="en", help="the card's language (default: en)")
    p.add_argument("--out", required=True, metavar="DIR", help="card directory to write")
    p.set_defaults(func=cmd_create)
    p = group.add_parser("list", help="list the cards in a folder")
    p.add_argument("--cards-dir", default=".", metavar="DIR", help="folder holding card directories (default: .)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(func=cmd_list)
    p = group.add_parser("show", help="print a card's manifest")
    p.add_argument("card", metavar="DIR", help="card directory")
    p.set_defaults(func=cmd_show)


def cmd_create(args) -> int:
    from lmstack.serving.cards import create_card

    card = create_card(args.adapter, args.out, args.name, args.system, args.description, args.language)
    print(f"wrote card {card.name!r} to {card.path}")
    return 0


def cmd_list(args) -> int:
    from lmstack.serving.cards import list_cards

    cards = list_cards(args.cards_dir)
    for card in cards:
        if args.json:
            print(json.dumps({**card.manifest(), "path": str(card.path)}, ensure_ascii=False))
        else:
            print(f"{card.name}\t{card.language}\t{card.path}\t{card.description}")
    if not cards and not args.json:
        print(f"no cards in {args.cards_dir}")
    return 0


def cmd_show(args) -> int:
    from lmstack.serving.cards import read_card

    card = read_card(args.card)
    print(json.dumps({**card.manifest(), "path": str(card.path)}, ensure_ascii=False, indent=2))
    return 0

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
        "(name, description, system prompt, language, fingerprints of the base's architecture and weights). "
        "`lmstack serve` loads cards into a running base model; a card made for another base is refused.",
    )
    p = group.add_parser(
        "create",
        help="make a card directory from a LoRA adapter",
        description="Copy the adapter's files (not its optimizer or trainer state) into a card directory with "
        "card.json. The adapter's base checkpoint must be readable: the card records its weights' fingerprint. "
        "An adapter that trains whole modules (a vocabulary grown for chat tokens) cannot be a card.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory")
    p.add_argument("--name", required=True, help="card name (its model name in the API): letters, digits, . _ : -")
    p.add_argument("--system", required=True, help="the system prompt a chat with this card starts from")
    p.add_argument("--description", default="", help="one line about the card")
    p.add_argument("--language", default="en", help="the card's language (default: en)")
    p.add_argument("--out", required=True, metavar="DIR", help="card directory to write")
    p.add_argument("--force", action="store_true", help="replace an --out that already holds files")
    p.set_defaults(func=cmd_create)
    p = group.add_parser(
        "list",
        help="list the cards in a folder",
        description="List the card directories inside a folder: `lmstack card list cards` (or --cards-dir cards).",
    )
    p.add_argument("folder", nargs="?", metavar="DIR", help="folder holding card directories (default: .)")
    p.add_argument("--cards-dir", metavar="DIR", help="the same folder, as `lmstack serve` names it")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(func=cmd_list)
    p = group.add_parser("show", help="print a card's manifest")
    p.add_argument("card", metavar="DIR", help="card directory")
    p.set_defaults(func=cmd_show)


def cmd_create(args) -> int:
    from lmstack.serving.cards import create_card

    card = create_card(args.adapter, args.out, args.name, args.system, args.description, args.language, args.force)
    print(f"wrote card {card.name!r} to {card.path}")
    return 0


def cmd_list(args) -> int:
    from lmstack.errors import InputError
    from lmstack.serving.cards import list_cards

    if args.folder and args.cards_dir and args.folder != args.cards_dir:
        raise InputError(f"two folders given ({args.folder} and --cards-dir {args.cards_dir}); name one")
    folder = args.folder or args.cards_dir or "."
    cards = list_cards(folder)
    for card in cards:
        if args.json:
            print(json.dumps({**card.manifest(), "path": str(card.path)}, ensure_ascii=False))
        else:
            print(f"{card.name}\t{card.language}\t{card.path}\t{card.description}")
    if not cards and not args.json:
        print(f"no cards in {folder}")
    return 0


def cmd_show(args) -> int:
    from lmstack.serving.cards import read_card

    card = read_card(args.card)
    print(json.dumps({**card.manifest(), "path": str(card.path)}, ensure_ascii=False, indent=2))
    return 0

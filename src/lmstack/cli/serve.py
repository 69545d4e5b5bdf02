"""`lmstack serve`: an OpenAI-compatible HTTP server with persona cards and a web chat."""

from __future__ import annotations

from pathlib import Path

from lmstack.errors import InputError


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI's HTTP API, with persona cards and a web chat",
        description="Serve a checkpoint of any family over an OpenAI-compatible API (/v1/completions, "
        "/v1/chat/completions, /v1/models, streaming), with a chat page at / . Requests share one continuously "
        "batched decoder; a request picks a persona card (a LoRA adapter with a system prompt) by its `model`. "
        "Needs the serving extra: pip install 'lmstack[serve]'.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="checkpoint directory (a training run's checkpoints/step_N, an n-gram from `lmstack ngram train`, an import)",
    )
    p.add_argument(
        "--card", action="append", default=[], metavar="NAME=DIR", help="load a persona card directory under NAME (repeatable)"
    )
    p.add_argument(
        "--cards-dir",
        metavar="DIR",
        help="cards found here are loaded at start; POST /v1/load_lora_adapter loads more from inside it (and only from there)",
    )
    p.add_argument("--name", metavar="NAME", help="the base model's id in the API (default: the --model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one, printed at start)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on the API (a non-empty key)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together (default: 32)")
    p.add_argument(
        "--max-queue", type=int, default=256, help="most prompts waiting for a batch row (>= 1); more get 429 (default: 256)"
    )
    p.add_argument("--device", default="cpu", help="torch device for neural models (default: cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="GPT only: decode through a static KV cache and a torch.compile'd step (CUDA graphs on a GPU); "
        "the step compiles before the server starts (tens of seconds), and once more the first time the "
        "cards' shapes change (a card loaded at run time, a larger rank)",
    )
    p.set_defaults(func=cmd_serve)


def parse_cards(specs: list[str]) -> dict[str, Path]:
    """{name: card directory} from --card NAME=DIR."""
    cards = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--card {spec!r}: expected NAME=DIR, e.g. --card pirate=cards/pirate")
        cards[name] = Path(path)
    return cards


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise InputError("serving needs FastAPI and uvicorn; install them with pip install 'lmstack[serve]'") from None
    from lmstack.serving.app import build_app, check_options, listen

    if args.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {args.max_batch}")
    check_options(args.name, args.api_key, args.max_queue)  # before the port is taken
    cards = parse_cards(args.card)
    sock = listen(args.host, args.port)
    with sock:
        app = build_app(
            args.model,
            cards=cards,
            cards_dir=args.cards_dir,
            name=args.name,
            api_key=args.api_key,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            device=args.device,
            compile=args.compile,
        )
        server = app.state.server
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{sock.getsockname()[1]}/"
        print(f"serving {server.name} ({len(server.cards)} cards) on {url} (API at /v1)", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0

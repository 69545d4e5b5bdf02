"""The OpenAI-compatible HTTP server: `create_app(model, tokenizer, ...)` -> a FastAPI app.

One worker thread drives the decoding scheduler (`lmstack.generation.scheduler`) while any request is
running; request handlers only `add` and `cancel` requests and await their events, which the worker
hands to each request's asyncio queue through `loop.call_soon_threadsafe`. Every request of every
persona card shares the scheduler's batch, so the server's throughput grows with its clients.

Endpoints follow OpenAI's API (and vLLM's names for what OpenAI lacks): /v1/models, /v1/models/{id},
/v1/completions, /v1/chat/completions (both streaming as server-sent events), /v1/load_lora_adapter,
/v1/unload_lora_adapter, /tokenize, /detokenize and /tokenizer_info (which lm-evaluation-harness's
`local-completions` uses as its "remote" tokenizer), /health, /metrics (Prometheus text) and `/`,
the chat page. Every error, an unknown route's included, is OpenAI's `{"error": {"message", "type",
"param", "code"}}`; an OpenAI parameter this server does not implement is refused, never ignored.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import http.client
import json
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from lmstack.errors import InputError, LmstackError
from lmstack.generation.config import GenerationConfig

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        500: "server_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": self.TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": body}, status_code=self.status)


# --- request bodies ---------------------------------------------------------------------------------


class _Body(BaseModel):
    # Clients send fields that change nothing here (user, store, metadata, ...): accepted and ignored.
    model_config = ConfigDict(extra="allow")
    # OpenAI parameters this server does not implement -> the values that ask for nothing (clients
    # may send those); any other value is refused, since ignoring it would answer another question.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, harmless in self.UNSUPPORTED.items():
            if extra.get(name) not in harmless:
                raise ApiError(400, f"{name} is not supported by this server; drop it from the request", name)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False  # vLLM's: keep generating past <|endoftext|>
    stream: bool = False
    stream_options: StreamOptions | None = None

    def config(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> GenerationConfig:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(stop):
            raise ApiError(400, "stop strings must be non-empty", "stop")
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0),
            top_p=self.top_p or 1.0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            stop=stop + extra_stop,
            stop_at_eot=not self.ignore_eos,
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    UNSUPPORTED = {"logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, "")}
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for "system"
    content: str | list[ContentPart]

    def text(self) -> str:
        """The content as text: OpenAI's list of parts is read as its text parts joined by newlines
        (as vLLM does); other parts (images, audio, ...) are refused, since this model reads text only."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise ApiError(400, f"content parts of type {part.type!r} are not supported here; send text", "messages")
            if part.text is None:
                raise ApiError(400, "a content part of type 'text' needs its 'text'", "messages")
        return "\n".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    UNSUPPORTED = {
        "logit_bias": (None, {}),
        "tools": (None, []),
        "functions": (None, []),
        "tool_choice": (None, "none"),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
    }
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class LoadAdapter(_Body):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[\w.\-]+$")
    lora_path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")  # a NUL is no path


class UnloadAdapter(_Body):
    lora_name: str


class TokenizeRequest(_Body):
    model: str | None = None  # the base when left out
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# --- metrics ----------------------------------------------------------------------------------------


class Metrics:
    """Counters, gauges and latency histograms, written in Prometheus' text format."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.histograms = {
            name: [0] * (len(self.BUCKETS) + 1) + [0.0] for name in ("time_to_first_token_seconds", "request_latency_seconds")
        }

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def count_tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            h = self.histograms[name]
            h[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            h[-1] += seconds

    def render(self, rows: int, waiting: int) -> str:
        """The metrics now; `rows`: sequences in the decoding batch, `waiting`: requests queued for it."""
        with self.lock:
            lines = ["# TYPE lmstack_requests_total counter"]
            lines += [f'lmstack_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += [
                "# TYPE lmstack_prompt_tokens_total counter",
                f"lmstack_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE lmstack_generation_tokens_total counter",
                f"lmstack_generation_tokens_total {self.generation_tokens}",
                "# TYPE lmstack_batch_size gauge",
                f"lmstack_batch_size {rows}",
                "# TYPE lmstack_requests_waiting gauge",
                f"lmstack_requests_waiting {waiting}",
            ]
            for name, h in self.histograms.items():
                lines.append(f"# TYPE lmstack_{name} histogram")
                total = 0
                for bound, count in zip((*map(str, self.BUCKETS), "+Inf"), h):
                    total += count
                    lines.append(f'lmstack_{name}_bucket{{le="{bound}"}} {total}')
                lines += [f"lmstack_{name}_sum {h[-1]}", f"lmstack_{name}_count {total}"]
        return "\n".join(lines) + "\n"


# --- the worker -------------------------------------------------------------------------------------


class Engine:
    """Owns the scheduler: one worker thread steps it while it is busy; handlers add and cancel
    requests and receive each step's events on an asyncio queue. `lock` guards the listeners (a
    request is added and its listener registered at once, so no event is missed); `model_lock` is
    held around every step, so whoever holds it pauses the decoding (scoring a prompt for echo
    goes through `scheduler.adapted`, which waits for the step in progress by itself)."""

    def __init__(self, scheduler, max_queue: int):
        self.scheduler, self.max_queue = scheduler, max_queue
        self.lock = threading.Condition()
        self.model_lock = threading.Lock()
        self.listeners: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue, set[int]]] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="lmstack-scheduler", daemon=True)
        self.thread.start()

    def submit(
        self, prompts: list[list[int]], config: GenerationConfig, n: int, adapter: str | None, logprobs: int
    ) -> list[tuple[Any, asyncio.Queue]]:
        """Add one HTTP request's prompts, all or none (each prompt takes a place in the queue; its n
        samples share it). Each prompt's queue receives lists of events, then None when every sample
        ended (or an exception if decoding failed). A request larger than the whole queue is a 400:
        retrying it, as a 429 asks, could never succeed."""
        if len(prompts) > self.max_queue:
            raise ApiError(
                400,
                f"the request has {len(prompts)} prompts, more than the server queues at once (--max-queue "
                f"{self.max_queue}); send at most {self.max_queue} per request, or start the server with a larger --max-queue",
                "prompt",
            )
        loop, subs = asyncio.get_running_loop(), []
        with self.lock:
            if self.scheduler.queued + len(prompts) > self.max_queue:
                raise ApiError(
                    429,
                    f"the server is full ({self.scheduler.queued} prompts waiting for a batch row, room for "
                    f"{self.max_queue}); retry shortly, or start it with a larger --max-queue",
                    code="queue_full",
                )
            try:
                for prompt in prompts:
                    rid = self.scheduler.add(prompt, config, n=n, adapter=adapter, logprobs=logprobs)
                    self.listeners[rid] = (loop, asyncio.Queue(), set(range(n)))
                    subs.append((rid, self.listeners[rid][1]))
            except Exception:
                for rid, _ in subs:
                    self.cancel(rid)
                raise
            self.lock.notify()
        return subs

    def cancel(self, rid) -> None:
        """Stop a request (its client left): its batch rows are freed at the next step."""
        with self.lock:
            if self.listeners.pop(rid, None) is not None:
                self.scheduler.cancel(rid)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.scheduler.busy:
                    self.lock.wait()
                if self.closed:
                    return
            try:
                with self.model_lock:
                    events = self.scheduler.step()
            except Exception as e:  # a failed step fails its requests, never the server
                with self.lock:
                    self._fail_all(e)
                continue
            with self.lock:
                self._deliver(events)

    def _deliver(self, events) -> None:
        by_request = defaultdict(list)
        for e in events:
            by_request[e.request].append(e)
        for rid, evs in by_request.items():
            if rid not in self.listeners:
                continue  # cancelled while it stepped
            loop, queue, open_samples = self.listeners[rid]
            loop.call_soon_threadsafe(queue.put_nowait, evs)
            open_samples -= {e.index for e in evs if e.finish_reason is not None}
            if not open_samples:
                del self.listeners[rid]
                loop.call_soon_threadsafe(queue.put_nowait, None)

    def _fail_all(self, error: Exception) -> None:
        for rid, (loop, queue, _) in list(self.listeners.items()):
            self.scheduler.cancel(rid)
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self.listeners.clear()


# --- the server's state -----------------------------------------------------------------------------


class Server:
    """The model, its tokenizer, the engine and the loaded cards: what the endpoints share."""

    def __init__(self, model, tokenizer, scheduler, name: str, cards_dir: Path | None, api_key: str | None, max_queue: int):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.cards_dir = cards_dir.resolve() if cards_dir is not None else None
        self.api_key = api_key
        self.metrics = Metrics()
        self.engine = Engine(scheduler, max_queue)
        self.cards: dict = {}  # served name -> serving.cards.Card
        self.created = int(time.time())

    # cards
    def load_card(self, name: str, path: Path):
        """Serve the card at `path` as `name` (refused when made for another base)."""
        from lmstack.serving.cards import check_card, read_card

        if name == self.name or name in self.cards:
            raise ApiError(400, f"a model named {name!r} is already loaded; unload it first or pick another name", "lora_name")
        try:
            card = read_card(path)
            check_card(card, self.model)
            self.engine.scheduler.load_adapter(name, card.path)
        except LmstackError as e:
            raise ApiError(400, str(e), "lora_path") from None
        self.cards[name] = card
        return card

    def unload_card(self, name: str) -> None:
        if name not in self.cards:
            raise ApiError(404, f"no card named {name!r} is loaded; see /v1/models", "lora_name", "model_not_found")
        del self.cards[name]  # new requests are refused at once; running ones finish with it
        self.engine.scheduler.unload_adapter(name)

    def inside_cards_dir(self, lora_path: str) -> Path:
        """The card directory a load request names, which must lie inside --cards-dir."""
        from lmstack.serving.cards import card_dir_in

        if self.cards_dir is None:
            raise ApiError(
                400, "loading cards at run time needs a cards directory; start the server with --cards-dir DIR", "lora_path"
            )
        try:
            path = card_dir_in(self.cards_dir, lora_path)
        except InputError as e:
            raise ApiError(400, str(e), "lora_path") from None
        if not path.is_dir():
            raise ApiError(404, f"no card directory {lora_path!r} inside the cards directory", "lora_path")
        return path

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` picks: None for the base, the card's name for a card."""
        if model == self.name:
            return None
        if model in self.cards:
            return model
        raise ApiError(
            404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids())}", "model", "model_not_found"
        )

    def model_ids(self) -> list[str]:
        return [self.name, *self.cards]

    def models(self) -> dict:
        base = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "lmstack",
            "root": self.name,
            "parent": None,
        }
        cards = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "lmstack",
                "root": self.name,
                "parent": self.name,
                "description": c.description,
                "system": c.system,
                "language": c.language,
            }
            for name, c in self.cards.items()
        ]
        return {"object": "list", "data": [base, *cards]}

    # prompts
    def check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.model.vocab_size
        if not ids:
            raise ApiError(400, "a prompt is empty; give at least one token", "prompt")
        if not all(0 <= i < vocab for i in ids):
            raise ApiError(400, f"a prompt holds a token id outside the vocabulary of {vocab}", "prompt")
        return ids

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        limit = getattr(self.model, "max_context", None)
        if limit is not None and len(ids) + max_tokens > limit:
            raise ApiError(
                400,
                f"this model's context is {limit} tokens, but the request needs {len(ids) + max_tokens} "
                f"({len(ids)} in the prompt, {max_tokens} to generate); shorten the prompt or lower "
                "max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )

    def piece(self, token: int) -> str:
        return self.tokenizer.id_to_piece(token)


# --- helpers for the endpoints ----------------------------------------------------------------------


def _prompts(server: Server, prompt) -> list[list[int]]:
    """A completion request's prompt (text, token ids, or a list of either) as token-id lists."""
    from lmstack.generation.engine import encode_prompt

    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; give a string, a list of token ids or a list of those", "prompt")
    return [server.check_ids(encode_prompt(server.tokenizer, p) if isinstance(p, str) else list(p)) for p in prompt]


def _echo_logprobs(server: Server, ids: list[int], top: int, adapter: str | None) -> list[tuple[float | None, list]]:
    """(log p(token | tokens before it), the `top` likeliest there) for each prompt token; the first
    token has no context, so None (OpenAI's convention). Computed by lmstack's scoring, on the base
    with the request's card (between decoding steps: the worker shares the model)."""
    from lmstack.evaluation.scoring import token_scores

    if len(ids) < 2:
        return [(None, [])]
    try:
        with server.engine.scheduler.adapted(adapter) as model:
            scores = token_scores(model, ids, start=1, top=max(top, 1))
    except InputError as e:  # the card was unloaded since the request named it
        raise ApiError(404, str(e), "model", "model_not_found") from None
    return [(None, []), *((s.logprob, s.top[:top]) for s in scores)]


def _logprobs_block(server: Server, entries: list[tuple[int, float | None, list]], start: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], start
    for token, _, _ in entries:
        piece = server.piece(token)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if lp is None else {server.piece(t): v for t, v in top} for _, lp, top in entries],
        "text_offset": offsets,
    }


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(request: Request, engine: Engine, rid, queue: asyncio.Queue):
    """The lists of events of one request, until it ends; cancels it when the client goes away
    (polled while no event comes: a stream that sends nothing would not notice it)."""
    finished = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if item is None or isinstance(item, Exception):
                finished = True
                if item is not None:
                    raise ApiError(500, f"decoding failed: {type(item).__name__}: {item}")
                return
            yield item
    finally:
        if not finished:
            engine.cancel(rid)


def _stream_error(e: ApiError) -> str:
    """An error after a stream has begun (its status is already sent): an error event, then the end."""
    body = {"message": e.message, "type": ApiError.TYPES.get(e.status), "param": e.param, "code": e.code}
    return _sse({"error": body}) + "data: [DONE]\n\n"


def _submit(server: Server, prompts: list[list[int]], config: GenerationConfig, n: int, adapter, logprobs: int):
    rows = server.engine.scheduler.max_batch
    if n > rows:
        raise ApiError(400, f"n={n} samples do not fit in this server's batch of {rows} rows (--max-batch); ask for fewer", "n")
    try:
        return server.engine.submit(prompts, config, n, adapter, logprobs)
    except LmstackError as e:
        raise ApiError(400, str(e)) from None


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    model,
    tokenizer,
    scheduler,
    name: str = "lmstack",
    cards: dict[str, Path] | None = None,
    cards_dir: str | Path | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
) -> FastAPI:
    """The server for `model` (served as `name`) on `scheduler` (a `generation.scheduler.Scheduler`
    over the same model), with `cards` ({name: card directory}) loaded and more loadable from inside
    `cards_dir`; `api_key` (if set) is required as a bearer token on /v1 and the tokenizer endpoints."""
    check_options(None, api_key, max_queue)
    server = Server(model, tokenizer, scheduler, name, Path(cards_dir) if cards_dir else None, api_key, max_queue)
    for card_name, path in (cards or {}).items():
        if card_name == name:
            raise InputError(f"the card at {path} is named {name!r}, as the base model (--name); give the base another --name")
        try:
            server.load_card(card_name, Path(path))
        except ApiError as e:
            raise InputError(f"card {card_name} ({path}): {e.message}") from None
    app = FastAPI(title="lmstack", version="1", description=__doc__.split("\n\n")[0])
    app.state.server = server
    _install_middleware(app, server)
    _add_routes(app, server)
    app.router.on_shutdown.append(server.engine.close)
    return app


def build_app(
    model_dir: str | Path,
    cards: dict[str, Path] | None = None,
    cards_dir: str | Path | None = None,
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    device: str = "cpu",
    compile: bool = False,
) -> FastAPI:
    """The app `lmstack serve` runs: the checkpoint in `model_dir` (served as `name`, by default its
    folder's name) on a scheduler of `max_batch` rows, with every card inside `cards_dir` (each under
    the name in its card.json) and `cards` ({name: card directory}) loaded. `compile` decodes a GPT
    through a static KV cache and a compiled step (CUDA graphs on a GPU), compiled before the app
    is returned."""
    from lmstack.generation.scheduler import Scheduler
    from lmstack.models.base import input_major
    from lmstack.models.checkpoint import load_for_text
    from lmstack.serving.cards import list_cards

    check_options(name, api_key, max_queue)
    found = {card.name: card.path for card in list_cards(cards_dir)} if cards_dir is not None else {}
    found.update(cards or {})  # before loading the model: a wrong folder fails fast
    model, tokenizer = load_for_text(model_dir, device)
    input_major(model)
    if compile:
        if not hasattr(model, "compile_decoding"):
            raise InputError(f"--compile needs a GPT checkpoint; {model.family} models decode uncompiled, drop --compile")
        model.compile_decoding()
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch)
    name = name or Path(model_dir).resolve().name
    app = create_app(
        model, tokenizer, scheduler, name=name, cards=found, cards_dir=cards_dir, api_key=api_key, max_queue=max_queue
    )
    if compile:
        scheduler.warm_up()  # no request can arrive yet: the app is not served
    return app


def check_options(name: str | None, api_key: str | None, max_queue: int) -> None:
    """Refuse at start the options that would make a server answer every request wrongly: a queue
    of no places (each request a 429), an empty key (which would turn authentication off), a base
    name that is no valid model id (`name` None: the checkpoint folder's name, taken as it is)."""
    from lmstack.serving.cards import check_name

    if max_queue < 1:
        raise InputError(f"max_queue (--max-queue) must be >= 1, got {max_queue}")
    if api_key is not None and not api_key.strip():
        raise InputError("api_key (--api-key) is empty; give a key, or leave --api-key out to serve without one")
    if name is not None:
        try:
            check_name(name)  # the base is a model in the API, as a card is
        except InputError as e:
            raise InputError(f"name (--name): {e}") from None


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread of this process until the block ends; yields the base
    URL (`http://host:port`; port 0 takes a free one) once /health answers. On exit the server
    stops and its decoding worker ends."""
    import uvicorn

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmstack-http", daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(host, port):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise LmstackError(f"the server at {url} did not start within {timeout:.0f} s; see the log above")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one, `getsockname()` says which), bound
    before the model loads so that a busy port fails at once; InputError says why it cannot."""
    if not 0 <= port <= 65535:
        raise InputError(f"port {port}: must be in 0..65535 (0: a free one)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server may take its port at once
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        advice = "check the host, or pick another port (0: a free one)"
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); {advice}") from None
    return sock


@contextlib.contextmanager
def background(
    model_dir: str | Path,
    cards_dir: str | Path | None = None,
    cards: dict[str, Path] | None = None,
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 0,
    compile: bool = False,
) -> Iterator[str]:
    """`lmstack serve` inside this process, in a thread (`build_app`, then `serve_in_thread`) until
    the block ends; yields the base URL. The OpenAI client takes `base_url=url + "/v1"`; a request's
    `model` picks the base by its served name and a card by its card.json name (see /v1/models)."""
    app = build_app(model_dir, cards, cards_dir, name, api_key, max_batch, max_queue, device, compile)
    with serve_in_thread(app, host, port) as url:
        yield url


def _healthy(host: str, port: int) -> bool:
    """Whether the server answers GET /health (straight to the socket: no proxy settings apply)."""
    connection = http.client.HTTPConnection(host, port, timeout=1)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


# What a field must be, for the fields whose type is a union: pydantic's own message names a branch
# of the union ("prompt.str: Input should be a valid string"), which tells a user nothing.
FIELD_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of parts like {"type": "text", "text": "..."}',
}


def _validation_error(request: Request, errors: list) -> ApiError:
    """A request body that did not validate, as a 400 that says what is wrong in the API's terms."""
    first = errors[0] if errors else {}
    where = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not where:
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type:
            got = f"not {content_type!r}" if content_type else "none was sent"
            return ApiError(400, f"send the body as JSON with the header Content-Type: application/json ({got})")
        return ApiError(400, "the request body must be a JSON object")
    if first.get("type") == "missing":
        return ApiError(400, f"{'.'.join(where)} is required", where[0])
    field = next((i for i, w in enumerate(where) if w in FIELD_TYPES), None)
    if field is not None:
        return ApiError(400, f"{'.'.join(where[: field + 1])} must be {FIELD_TYPES[where[field]]}", where[0])
    return ApiError(400, f"{'.'.join(where)}: {first.get('msg', 'invalid request')}", where[0])


def _endpoint(app: FastAPI, request: Request) -> str:
    """A request's label in /metrics: the path of the route that serves it (`/v1/models/{model}`
    for every model id), or "unmatched", so that requests for arbitrary paths cannot add series
    without end."""
    route = request.scope.get("route")  # set by the router once it ran; not yet for a refused key
    if route is None:
        route = next((r for r in app.router.routes if r.matches(request.scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def _install_middleware(app: FastAPI, server: Server) -> None:
    open_paths = {"/", "/health", "/metrics", "/static/chat.js", "/static/chat.css", "/docs", "/openapi.json"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if server.api_key and request.url.path not in open_paths:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            right = scheme.lower() == "bearer"  # schemes are case-insensitive (RFC 7235)
            if not (secrets.compare_digest(given.strip().encode(), server.api_key.encode()) and right):
                response = ApiError(
                    401,
                    "missing or wrong API key; send the header 'Authorization: Bearer KEY' with the server's --api-key",
                    code="invalid_api_key",
                ).response()
                server.metrics.count_request(_endpoint(app, request), 401)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # the last line of defence: an internal error is a 500 in OpenAI's shape
            response = ApiError(500, f"internal error: {type(e).__name__}: {e}").response()
        server.metrics.count_request(_endpoint(app, request), response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        """Starlette's own errors (no such route, a wrong method) in OpenAI's shape, as every other error."""
        if e.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; /docs lists them"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "another method")  # as Starlette sets it
            message = f"{request.url.path} does not take {request.method}; it takes {allowed}"
        else:
            message = str(e.detail)
        response = ApiError(e.status_code, message).response()
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        return _validation_error(request, e.errors()).response()

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError):
        return ApiError(400, str(e)).response()


def _add_routes(app: FastAPI, server: Server) -> None:
    tok = server.tokenizer

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in ("chat.js", "chat.css"):
            raise ApiError(404, f"no static file {name!r}")
        return FileResponse(STATIC / name)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        sched = server.engine.scheduler
        return PlainTextResponse(server.metrics.render(sched.running, sched.queued), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model}")
    async def model(model: str):
        server.adapter_for(model)  # a 404 for an unknown one
        return next(m for m in server.models()["data"] if m["id"] == model)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter):
        card = await asyncio.to_thread(server.load_card, body.lora_name, server.inside_cards_dir(body.lora_path))
        return {"status": "ok", "message": f"card {body.lora_name!r} loaded ({card.name})", "model": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter):
        server.unload_card(body.lora_name)
        return {"status": "ok", "message": f"card {body.lora_name!r} unloaded", "model": body.lora_name}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eot = "<|endoftext|>" if tok.eot_id is not None else None
        return {
            "eos_token": eot,
            "bos_token": None,
            "pad_token": None,
            "chat_template": tok.chat_template,
            "vocab_size": tok.vocab_size,
            "model_max_length": getattr(server.model, "max_context", None),
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            server.adapter_for(body.model)  # every model shares the tokenizer, but a wrong name is a 404 here too
        ids = tok.encode(body.prompt, allowed_special="all" if body.add_special_tokens else ())
        return {"tokens": ids, "count": len(ids), "max_model_len": getattr(server.model, "max_context", None)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            server.adapter_for(body.model)
        return {"prompt": tok.decode(server.check_ids(body.tokens) if body.tokens else [])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(server, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _chat(server, body, request)


# --- /v1/completions --------------------------------------------------------------------------------


async def _completions(server: Server, body: CompletionRequest, request: Request):
    adapter = server.adapter_for(body.model)
    body.refuse_unsupported()
    prompts = _prompts(server, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    config = body.config(max_tokens)
    top = body.logprobs or 0
    if body.stream and body.echo:
        raise ApiError(400, "echo is not supported with stream; drop one of them", "echo")
    if body.echo and body.logprobs is not None and hasattr(server.model, "target_logprobs"):
        raise ApiError(
            400,
            f"echo with logprobs: a {server.model.family} model reads the prompt as its encoder's source, which "
            "has no log-probabilities (as `lmstack score` says); drop echo, the completion's own logprobs are given",
            "echo",
        )
    for p in prompts:
        server.check_length(p, max_tokens)
    rid_prefix, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    subs = _submit(server, prompts, config, body.n, adapter, top) if max_tokens else []
    if body.stream:
        return StreamingResponse(
            _stream_completions(server, body, request, prompts, subs, top, rid_prefix, created), media_type="text/event-stream"
        )
    started = time.perf_counter()
    subs = subs or [None] * len(prompts)  # max_tokens 0: nothing generated
    results = await asyncio.gather(*(_collect(server, request, sub, body.n, top, started) for sub in subs))
    choices, completion_tokens = [], 0
    for i, (prompt, samples) in enumerate(zip(prompts, results)):
        echo = None
        if body.echo and body.logprobs is not None:
            echo = await asyncio.to_thread(_echo_logprobs, server, prompt, top, adapter)
        for j, s in enumerate(samples):
            completion_tokens += len(s["tokens"])
            text = (server.tokenizer.decode(prompt) if body.echo else "") + s["text"]
            logprobs = None
            if body.logprobs is not None:
                entries = [(t, lp, tp) for t, (lp, tp) in zip(prompt, echo)] if echo is not None else []
                entries += list(zip(s["tokens"], s["logprobs"], s["tops"]))
                logprobs = _logprobs_block(server, entries)
            choices.append({"index": i * body.n + j, "text": text, "logprobs": logprobs, "finish_reason": s["finish"]})
    prompt_tokens = sum(map(len, prompts))
    server.metrics.count_tokens(prompt_tokens, completion_tokens)
    server.metrics.observe("request_latency_seconds", time.perf_counter() - started)
    return {
        "id": rid_prefix,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }


async def _collect(server: Server, request: Request, sub, n: int, top: int, started: float) -> list[dict]:
    """Run one submitted prompt's n samples to the end: their tokens, log-probs, top alternatives,
    text, finish (`sub` None: nothing to generate, max_tokens 0)."""
    samples = [{"tokens": [], "logprobs": [], "tops": [], "text": "", "finish": "length"} for _ in range(n)]
    if sub is None:
        return samples
    rid, queue = sub
    first = True
    async for events in _events(request, server.engine, rid, queue):
        if first:
            server.metrics.observe("time_to_first_token_seconds", time.perf_counter() - started)
            first = False
        for e in events:
            s = samples[e.index]
            if e.token is not None:
                s["tokens"].append(e.token)
                s["logprobs"].append(e.logprob)
                s["tops"].append(list(e.top or [])[:top])
            s["text"] += e.text or ""
            if e.finish_reason is not None:
                s["finish"] = e.finish_reason
    return samples


async def _stream_completions(server, body, request, prompts, subs, top, rid_prefix, created):
    started, tokens = time.perf_counter(), 0
    offsets = defaultdict(int)  # choice index -> length of its text so far (text_offset, as without stream)
    try:
        for i, (rid, queue) in enumerate(subs):
            async for events in _events(request, server.engine, rid, queue):
                if not tokens:
                    server.metrics.observe("time_to_first_token_seconds", time.perf_counter() - started)
                for e in events:
                    tokens += e.token is not None
                    logprobs = None
                    if body.logprobs is not None and e.token is not None:
                        entry = (e.token, e.logprob, list(e.top or [])[:top])
                        logprobs = _logprobs_block(server, [entry], start=offsets[i * body.n + e.index])
                        offsets[i * body.n + e.index] += len(server.piece(e.token))
                    choice = {
                        "index": i * body.n + e.index,
                        "text": e.text or "",
                        "logprobs": logprobs,
                        "finish_reason": e.finish_reason,
                    }
                    yield _sse(
                        {
                            "id": rid_prefix,
                            "object": "text_completion",
                            "created": created,
                            "model": body.model,
                            "choices": [choice],
                        }
                    )
    except ApiError as e:
        yield _stream_error(e)
        return
    finally:
        for rid, _ in subs:
            server.engine.cancel(rid)  # a no-op for finished requests
    usage = _usage(sum(map(len, prompts)), tokens)
    if body.stream_options and body.stream_options.include_usage:
        yield _sse(
            {
                "id": rid_prefix,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [],
                "usage": usage,
            }
        )
    yield "data: [DONE]\n\n"
    server.metrics.count_tokens(usage["prompt_tokens"], tokens)
    server.metrics.observe("request_latency_seconds", time.perf_counter() - started)


# --- /v1/chat/completions ---------------------------------------------------------------------------


def _chat_prompt(server: Server, body: ChatRequest, adapter: str | None) -> tuple[list[int], tuple[str, ...]]:
    """The conversation's prompt ids in the model's chat format (a card's system prompt first when
    the request has no system message) and the end-of-turn text where the reply stops."""
    from lmstack.data.chat import prompt_ids, turn_end_id
    from lmstack.tokenizers.base import CHAT_ROLES

    tok = server.tokenizer
    if tok.chat_template is None and not set(CHAT_ROLES) <= set(tok.special_tokens):
        raise ApiError(
            400,
            "this model's tokenizer has no chat format (no template, no role tokens); use "
            "/v1/completions, or serve a model fine-tuned on conversations (`lmstack finetune`)",
            "messages",
        )
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    system = server.cards[adapter].system if adapter is not None else ""
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    end = turn_end_id(tok)
    return server.check_ids(prompt_ids(tok, messages)), (tok.decode([end]),) if end is not None else ()


async def _chat(server: Server, body: ChatRequest, request: Request):
    adapter = server.adapter_for(body.model)
    body.refuse_unsupported()
    prompt, end = _chat_prompt(server, body, adapter)
    limit = getattr(server.model, "max_context", None)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:  # as long as the context allows
        max_tokens = max(0, limit - len(prompt)) if limit is not None else 256
    server.check_length(prompt, max_tokens)
    config = body.config(max_tokens, end)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    rid_prefix, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    sub = _submit(server, [prompt], config, body.n, adapter, top)[0] if max_tokens else None
    if body.stream:
        return StreamingResponse(
            _stream_chat(server, body, request, prompt, sub, top, rid_prefix, created), media_type="text/event-stream"
        )
    started = time.perf_counter()
    samples = await _collect(server, request, sub, body.n, top, started)
    choices = []
    for j, s in enumerate(samples):
        logprobs = (
            {"content": [_chat_logprob(server, t, lp, tp) for t, lp, tp in zip(s["tokens"], s["logprobs"], s["tops"])]}
            if body.logprobs
            else None
        )
        choices.append(
            {
                "index": j,
                "message": {"role": "assistant", "content": s["text"]},
                "logprobs": logprobs,
                "finish_reason": s["finish"],
            }
        )
    completion_tokens = sum(len(s["tokens"]) for s in samples)
    server.metrics.count_tokens(len(prompt), completion_tokens)
    server.metrics.observe("request_latency_seconds", time.perf_counter() - started)
    return {
        "id": rid_prefix,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(len(prompt), completion_tokens),
    }


def _chat_logprob(server: Server, token: int, logprob: float, top: list) -> dict:
    def entry(t, lp):
        piece = server.piece(t)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    return {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in top]}


async def _stream_chat(server, body, request, prompt, sub, top, rid_prefix, created):
    def chunk(choices, **extra):
        return _sse(
            {
                "id": rid_prefix,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": choices,
                **extra,
            }
        )

    started, tokens = time.perf_counter(), 0
    for j in range(body.n):
        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    if sub is None:  # max_tokens 0
        for j in range(body.n):
            yield chunk([{"index": j, "delta": {}, "logprobs": None, "finish_reason": "length"}])
    try:
        async for events in _events(request, server.engine, *sub) if sub else _no_events():
            if not tokens:
                server.metrics.observe("time_to_first_token_seconds", time.perf_counter() - started)
            for e in events:
                tokens += e.token is not None
                logprobs = (
                    {"content": [_chat_logprob(server, e.token, e.logprob, list(e.top or [])[:top])]}
                    if body.logprobs and e.token is not None
                    else None
                )
                if e.text or logprobs:
                    yield chunk(
                        [{"index": e.index, "delta": {"content": e.text or ""}, "logprobs": logprobs, "finish_reason": None}]
                    )
                if e.finish_reason is not None:
                    yield chunk([{"index": e.index, "delta": {}, "logprobs": None, "finish_reason": e.finish_reason}])
    except ApiError as e:
        yield _stream_error(e)
        return
    finally:
        if sub:
            server.engine.cancel(sub[0])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=_usage(len(prompt), tokens))
    yield "data: [DONE]\n\n"
    server.metrics.count_tokens(len(prompt), tokens)
    server.metrics.observe("request_latency_seconds", time.perf_counter() - started)


async def _no_events():
    """The events of a request that generates nothing (max_tokens 0)."""
    for _ in ():
        yield

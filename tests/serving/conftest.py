"""A live `lmstack serve` for the tests: a tiny random GPT with a character tokenizer and the chat
roles, saved as a checkpoint, served by uvicorn in a thread on a free port of 127.0.0.1."""

import contextlib
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmstack.data.chat import add_chat_tokens  # noqa: E402
from lmstack.models.gpt import GPT, GPTConfig  # noqa: E402
from lmstack.tokenizers.char import CharTokenizer  # noqa: E402

TEXT = "hello world, the cat sat on the mat. Ahoy matey! yes no maybe?\n"


def tiny_gpt(seed: int = 0, block_size: int = 64):
    """(model, tokenizer): a 1-layer GPT over characters, with <|endoftext|> and the chat roles."""
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    add_chat_tokens(tok)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)).eval()
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` on 127.0.0.1 (a real socket) until the block ends; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

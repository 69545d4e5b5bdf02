"""Time to the first token at one client: a streaming completion through the official `openai`
client against a live server on 127.0.0.1, against lmstack's in-process `generate_tokens`.

    python -P benchmarks/serving_ttft.py [--server process|thread] [--prompt-tokens 32] [--depth 4] [--width 512]
                                         [--requests 30] [--threads 1]

The server is `lmstack serve` in a process of its own (--server process, as deployed), or
`lmstack.serving.app.background` (the same app, uvicorn in a thread of this process, as a program
that serves a model to itself does: --server thread); a real socket either way. The model is
serving_engine.py's random GPT-2-shaped one, with a character tokenizer of about 4k CJK characters
so that every token decodes to text. One request at a time, alternating: the server's TTFT is the
wall time from the client's call until its first chunk with text arrives (the request asks for 8
tokens and is read to the end, so the next one finds an idle server); in-process is
`generate_tokens(..., max_new_tokens=1)` on the same prompt. Prints the medians and their
difference; the issue's target is server <= in-process + 15 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from openai import OpenAI

from lmstack.generation import GenerationConfig, generate_tokens
from lmstack.models.base import input_major
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.serving.app import background
from lmstack.tokenizers.char import CharTokenizer


@contextlib.contextmanager
def subprocess_server(model_dir: Path, max_batch: int):
    """`lmstack serve` in a process of its own, with this process's torch threads; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", model_dir, "--port", str(port), "--max-batch", str(max_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("lmstack serve exited") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("process", "thread"), default="process")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--requests", type=int, default=30, help="timed requests of each kind (after 3 warm-up ones)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 is steadier on a shared CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chars = [chr(0x4E00 + i) for i in range(3800)]
    tok = CharTokenizer.train(["".join(chars)], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.vocab_size, block_size=args.prompt_tokens + 16, n_layer=args.depth, n_head=4, n_embd=args.width)
    ).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [tok.encode("".join(chars[i] for i in torch.randint(0, len(chars), (args.prompt_tokens,), generator=g)))]
    prompts *= args.requests + 3
    one = GenerationConfig(max_new_tokens=1, temperature=0, stop_at_eot=False)
    local, served = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "gpt", tok)
        input_major(model)  # as `lmstack generate` and `lmstack serve` do
        with (background if args.server == "thread" else subprocess_server)(Path(tmp) / "gpt", max_batch=8) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for i, prompt in enumerate(prompts):
                t = time.perf_counter()
                generate_tokens(model, [prompt], one, tok)
                local.append(time.perf_counter() - t)
                t = time.perf_counter()
                first = None
                stream = client.completions.create(
                    model="gpt", prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
                )
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t
                served.append(first)
                if i < 3:  # warm-up
                    local.clear()
                    served.clear()
    lo, se = statistics.median(local) * 1e3, statistics.median(served) * 1e3
    print(
        f"model: GPT d{args.depth} width {args.width}, vocab {tok.vocab_size}; {args.prompt_tokens}-token prompt; "
        f"server: {args.server}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  in-process generate_tokens, first token: median {lo:6.1f} ms  (of {len(local)})")
    print(f"  server, openai client, streaming:        median {se:6.1f} ms  (of {len(served)})")
    print(f"server - in-process = {se - lo:+.1f} ms   (target <= +15 ms)")


if __name__ == "__main__":
    main()

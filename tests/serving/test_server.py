"""`lmstack serve` through the official `openai` client and raw HTTP, on a live socket: outputs equal
lmstack's in-process generation and `lmstack score`, errors are OpenAI's, 64 streams run at once."""

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from lmstack.data.chat import prompt_ids, turn_end_id
from lmstack.generation import GenerationConfig, generate_tokens
from lmstack.generation.engine import encode_prompt
from lmstack.generation.scheduler import Scheduler
from lmstack.models.checkpoint import load_for_text
from lmstack.serving.app import background, create_app, serve_in_thread

from .conftest import make_card, tiny_gpt

openai = pytest.importorskip("openai")
types = pytest.importorskip("openai.types")
chat_types = pytest.importorskip("openai.types.chat")

KEY = "sk-test"


PIRATE, SAILOR = "You are a pirate.", "You are a sailor."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A base checkpoint and a cards folder: pirate and sailor for it, alien for another base."""
    root = tmp_path_factory.mktemp("serve")
    model, tok = tiny_gpt()
    model.save(root / "tiny", tok)
    refs = {
        "pirate": make_card(root / "tiny", model, root / "cards" / "pirate", "pirate", PIRATE, seed=1),
        "sailor": make_card(root / "tiny", model, root / "cards" / "sailor", "sailor", SAILOR, seed=2),
    }
    other, other_tok = tiny_gpt(block_size=32)
    other.save(root / "other", other_tok)
    make_card(root / "other", other, root / "cards" / "alien", "alien", "You are an alien.")
    return root, refs


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return workdir[0] / "tiny"


@pytest.fixture(scope="module")
def served(workdir):
    """(base URL, model, tokenizer, app) of a server with an API key and the pirate card."""
    root, _ = workdir
    model, tok = load_for_text(root / "tiny")
    app = create_app(
        model,
        tok,
        Scheduler(model, tok, max_batch=16),
        name="tiny",
        cards={"pirate": root / "cards" / "pirate"},
        cards_dir=root / "cards",
        api_key=KEY,
        max_queue=1000,
    )
    with serve_in_thread(app) as url:
        yield url, model, tok, app


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def post(url, path, body, key=KEY, stream=False):
    return requests.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, stream=stream, timeout=60)


def greedy(model, tok, ids, max_tokens, stop=()):
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0, stop=tuple(stop))
    return generate_tokens(model, [ids], config, tok)[0]


def chat_reference(model, tok, messages, max_tokens):
    end = turn_end_id(tok)
    return greedy(model, tok, prompt_ids(tok, messages), max_tokens, stop=(tok.decode([end]),))


def sse(response) -> list:
    """The data of each server-sent event, the final [DONE] included."""
    return [line[len("data: ") :] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]


def test_completions_and_chat_equal_in_process_generation(served):
    url, model, tok, _ = served
    c = client(url)
    assert c.models.list().data[0].id == "tiny"
    out = c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    want = greedy(model, tok, encode_prompt(tok, "the cat"), 12)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(encode_prompt(tok, "the cat")) and out.usage.completion_tokens == len(want.tokens)
    # token-id prompts and lists of prompts: one choice per prompt, in order
    ids = tok.encode("hello")
    out = c.completions.create(model="tiny", prompt=[ids, tok.encode("mat")], max_tokens=6, temperature=0)
    assert [ch.text for ch in out.choices] == [greedy(model, tok, p, 6).text for p in (ids, tok.encode("mat"))]
    # a stop string ends the text before it
    full = greedy(model, tok, ids, 20, stop=()).text
    if len(full) > 3:
        stop = full[2:4]
        out = c.completions.create(model="tiny", prompt=[ids], max_tokens=20, temperature=0, stop=[stop])
        assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "hello"}]
    reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == chat_reference(model, tok, messages, 10).text
    assert reply.choices[0].message.role == "assistant"
    # content as OpenAI's list of parts: the text parts, joined by newlines
    parts = [{"type": "text", "text": "the"}, {"type": "text", "text": "cat"}]
    reply = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=10, temperature=0)
    want = chat_reference(model, tok, [{"role": "user", "content": "the\ncat"}], 10)
    assert reply.choices[0].message.content == want.text
    # "developer" is OpenAI's newer name for the system role
    system = [{"role": "system", "content": "be brief"}, *messages]
    developer = [{"role": "developer", "content": "be brief"}, *messages]
    reply = c.chat.completions.create(model="tiny", messages=developer, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == chat_reference(model, tok, system, 10).text


def test_sampling_n_and_seed(served):
    url, *_ = served
    c = client(url)
    args = dict(
        model="tiny", prompt="the", max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7, extra_body={"min_p": 0.01, "top_k": 20}
    )
    first, again = c.completions.create(**args), c.completions.create(**args)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]  # seeded: repeatable
    assert len({ch.text for ch in first.choices}) > 1  # the n samples differ


def test_streaming_matches_and_follows_openai_chunks(served):
    url, model, tok, _ = served
    c = client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    want = chat_reference(model, tok, messages, 15)
    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=15, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    # the raw events: each a valid chunk, then data: [DONE]
    r = post(
        url,
        "/v1/chat/completions",
        {"model": "tiny", "messages": messages, "max_tokens": 15, "temperature": 0, "stream": True},
        stream=True,
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        raw = json.loads(e)
        chat_types.ChatCompletionChunk.model_validate(raw)
        assert raw["object"] == "chat.completion.chunk" and set(raw) >= {"id", "created", "model", "choices"}
    # completions stream: the pieces make the whole text; logprobs' text_offset counts from its start, as without stream
    args = dict(model="tiny", prompt="the cat", max_tokens=12, temperature=0, logprobs=1)
    pieces = list(c.completions.create(**args, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == greedy(model, tok, encode_prompt(tok, "the cat"), 12).text
    offsets = [o for p in pieces if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert offsets == c.completions.create(**args).choices[0].logprobs.text_offset and offsets[-1] > 0


def test_raw_json_follows_the_schema(served):
    url, *_ = served
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3, "logprobs": 2})
    raw = r.json()
    types.Completion.model_validate(raw)
    assert raw["object"] == "text_completion" and set(raw["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    lp = raw["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    r = post(
        url,
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    )
    raw = r.json()
    chat_types.ChatCompletion.model_validate(raw)
    assert raw["object"] == "chat.completion" and raw["usage"]["total_tokens"] == sum(
        raw["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    assert all(len(t["top_logprobs"]) == 2 for t in raw["choices"][0]["logprobs"]["content"])
    models = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    types.Model.model_validate(models["data"][0])


@pytest.mark.parametrize("card", [None, "pirate"])
def test_echo_logprobs_equal_lmstack_score(served, workdir, lmstack_cli, tmp_path, card):
    """What lm-evaluation-harness's loglikelihood requests read: echo + logprobs + max_tokens 0; for
    a card, what `lmstack score` says of the card merged into the base (`lmstack lora merge`)."""
    url, model, tok, _ = served
    checkpoint = workdir[0] / "tiny"
    if card is not None:
        lmstack_cli("lora", "merge", "--adapter", workdir[0] / "cards" / card, "--out", tmp_path / "merged")
        checkpoint = tmp_path / "merged"
    text = "the cat sat on the mat"
    want = json.loads(lmstack_cli("score", "--model", checkpoint, "--prompt", text, "--top", "3", "--json"))
    ids = [tok.eot_id, *tok.encode(text)]  # what `lmstack score` scores the text after
    body = {"model": card or "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3, "temperature": 0}
    raw = post(url, "/v1/completions", body).json()
    lp = raw["choices"][0]["logprobs"]
    assert raw["choices"][0]["text"] == tok.decode(ids)
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    got = torch.tensor(lp["token_logprobs"][1:])
    assert torch.allclose(got, torch.tensor([t["logprob"] for t in want["tokens"]]), atol=1e-5)
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(want["logprob"], abs=1e-4)
    for top, t in zip(lp["top_logprobs"][1:], want["tokens"]):
        assert list(top.values()) == pytest.approx([a["logprob"] for a in t["top"]], abs=1e-5)
    if card is not None:  # the card changes the scores, so the check above is not vacuous
        base = post(url, "/v1/completions", {**body, "model": "tiny"}).json()["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(base[1:], lp["token_logprobs"][1:])) > 1e-3
    # echo with generated tokens: the prompt's entries come first, then one per new token
    raw = post(url, "/v1/completions", {**body, "max_tokens": 2, "logprobs": 1}).json()
    assert len(raw["choices"][0]["logprobs"]["tokens"]) == len(ids) + 2


def error_body(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors_are_openai_errors(served):
    url, model, tok, _ = served
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert error_body(post(url, "/v1/completions", body, key="wrong"), 401)["code"] == "invalid_api_key"
    assert requests.post(url + "/v1/completions", json=body).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").models.list()
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", prompt="hi", max_tokens=model.max_context)
    assert e.value.code == "context_length_exceeded"
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"n": 0},
        {"max_tokens": -1},
        {"prompt": []},
        {"prompt": [10**6]},
        {"stop": [""]},
        {"logprobs": 99},
        {"prompt": 5},
        {"seed": -1},
    ):
        error_body(post(url, "/v1/completions", {**body, **bad}), 400)
    err = error_body(post(url, "/v1/completions", {**body, "n": 17}), 400)  # the served batch has 16 rows
    assert err["param"] == "n" and "--max-batch" in err["message"]
    error_body(post(url, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400)
    error_body(post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}), 400)
    assert requests.get(url + "/health").json() == {"status": "ok"}  # open without a key
    # the scheme is case-insensitive (RFC 7235)
    auth = {"Authorization": f"bearer {KEY}"}
    assert requests.post(url + "/v1/completions", json=body, headers=auth).status_code == 200


def test_bad_bodies_are_named_in_the_api_terms(served):
    url, *_ = served
    auth = {"Authorization": f"Bearer {KEY}"}
    r = requests.post(url + "/v1/completions", data="{not json", headers={**auth, "Content-Type": "application/json"})
    assert error_body(r, 400)["message"].startswith("the request body is not valid JSON: ")
    r = requests.post(url + "/v1/completions", data='{"model": "tiny"}', headers={**auth, "Content-Type": "text/plain"})
    assert "Content-Type: application/json" in error_body(r, 400)["message"]
    body = {"model": "tiny", "max_tokens": 1}
    for prompt in (123, ["a", 1], None):
        err = error_body(post(url, "/v1/completions", {**body, "prompt": prompt}), 400)
        assert err["param"] == "prompt"
        assert err["message"] == "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"
    assert error_body(post(url, "/v1/completions", body), 400)["message"] == "prompt is required"
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    err = error_body(post(url, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": [image]}]}), 400)
    assert "'image_url' are not supported" in err["message"]
    # errors outside the API's routes have the same shape, and keep their status
    assert error_body(requests.get(url + "/v1/nothing", headers=auth), 404)["type"] == "not_found_error"
    assert "POST" in error_body(requests.get(url + "/v1/completions", headers=auth), 405)["message"]
    # /metrics counts requests by route, so arbitrary paths and model ids add no series of their own
    requests.get(url + "/v1/models/no-such-model", headers=auth)
    requests.get(url + "/v1/elsewhere", headers={"Authorization": "Bearer wrong"})
    metrics = requests.get(url + "/metrics").text
    assert 'endpoint="/v1/models/{model}",status="404"' in metrics and 'endpoint="unmatched",status="404"' in metrics
    assert 'endpoint="unmatched",status="401"' in metrics
    assert "nothing" not in metrics and "no-such-model" not in metrics and "elsewhere" not in metrics


def test_parameters_the_server_does_not_implement_are_refused_not_ignored(served):
    url, *_ = served
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    refused = [
        (completion, {"logit_bias": {"5": 100}}),
        (completion, {"best_of": 3}),
        (completion, {"suffix": "!"}),
        (chat, {"logit_bias": {"5": 100}}),
        (chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}),
        (chat, {"tool_choice": "auto"}),
        (chat, {"response_format": {"type": "json_object"}}),
    ]
    for base, extra in refused:
        path = "/v1/completions" if base is completion else "/v1/chat/completions"
        (name,) = extra
        err = error_body(post(url, path, {**base, **extra}), 400)
        assert err["param"] == name and "not supported" in err["message"]
    # the values that ask for nothing (what clients send by default) are accepted
    assert post(url, "/v1/completions", {**completion, "best_of": 1, "logit_bias": {}, "suffix": None}).status_code == 200
    harmless = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "user": "me"}
    assert post(url, "/v1/chat/completions", {**chat, **harmless}).status_code == 200


def test_queue_full_is_429(checkpoint):
    model, tok = load_for_text(checkpoint)
    app = create_app(model, tok, Scheduler(model, tok, max_batch=1), name="tiny", max_queue=1)
    engine = app.state.server.engine
    with serve_in_thread(app) as url:
        with engine.model_lock:  # the worker cannot step: the first request waits in the queue
            first = ThreadPoolExecutor(1).submit(post, url, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
            while not engine.scheduler.queued:
                threading.Event().wait(0.01)
            err = error_body(post(url, "/v1/completions", {"model": "tiny", "prompt": "b", "max_tokens": 2}), 429)
            assert err["code"] == "queue_full"
        assert first.result().status_code == 200
        # more prompts than the whole queue holds could never be served: a 400 naming the flag, not a 429
        err = error_body(post(url, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2}), 400)
        assert err["param"] == "prompt" and "--max-queue" in err["message"]


def test_disconnect_cancels_the_request(checkpoint):
    model, tok = load_for_text(checkpoint)
    scheduler = Scheduler(model, tok, max_batch=4)
    cancelled = []
    real_cancel = scheduler.cancel
    scheduler.cancel = lambda rid: (cancelled.append(rid), real_cancel(rid))
    app = create_app(model, tok, scheduler, name="tiny")
    with serve_in_thread(app) as url:
        with app.state.server.engine.model_lock:  # no step runs: the request cannot finish on its own
            r = requests.post(
                url + "/v1/completions",
                json={"model": "tiny", "prompt": "a", "max_tokens": 60, "ignore_eos": True, "stream": True},
                stream=True,
                timeout=60,
            )
            assert r.status_code == 200 and app.state.server.engine.listeners
            r.close()  # the client leaves
            deadline = threading.Event()
            for _ in range(200):
                if cancelled:
                    break
                deadline.wait(0.05)
        assert cancelled, "the server did not cancel a request whose client went away"
        for _ in range(200):
            if not scheduler.busy:
                break
            deadline.wait(0.05)
        assert not scheduler.busy and scheduler.running == 0


def test_64_concurrent_streams(served):
    url, model, tok, _ = served
    prompts = [f"the cat {i}" for i in range(64)]

    def one(prompt):
        r = post(
            url,
            "/v1/completions",
            {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True},
            stream=True,
        )
        assert r.status_code == 200
        events = sse(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return "".join(ch["choices"][0]["text"] for ch in chunks)

    with ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(one, prompts))
    want = generate_tokens(
        model, [encode_prompt(tok, p) for p in prompts], GenerationConfig(max_new_tokens=10, temperature=0), tok
    )
    assert texts == [w.text for w in want]
    metrics = requests.get(url + "/metrics").text
    assert 'lmstack_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "lmstack_time_to_first_token_seconds_bucket" in metrics and "lmstack_batch_size" in metrics


def test_tokenizer_endpoints(served):
    url, _, tok, _ = served
    ids = post(url, "/tokenize", {"prompt": "the mat"}).json()["tokens"]
    assert ids == tok.encode("the mat")
    assert post(url, "/detokenize", {"tokens": ids}).json()["prompt"] == "the mat"
    assert post(url, "/tokenize", {"model": "pirate", "prompt": "the mat"}).json()["tokens"] == ids
    assert error_body(post(url, "/tokenize", {"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert error_body(post(url, "/detokenize", {"model": "gpt-4", "tokens": ids}), 404)["code"] == "model_not_found"
    assert (
        requests.get(url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()["eos_token"] == "<|endoftext|>"
    )


def test_cards_are_listed_served_and_hot_loaded(served, workdir):
    url, model, tok, app = served
    root, refs = workdir
    c = client(url)
    listed = {m.id: m for m in c.models.list().data}
    assert listed["pirate"].parent == "tiny" and listed["tiny"].parent is None
    assert listed["pirate"].model_extra["system"] == PIRATE
    assert c.models.retrieve("pirate") == listed["pirate"] and c.models.retrieve("tiny") == listed["tiny"]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    # a card's reply: the base with its adapter, after the card's system prompt
    messages = [{"role": "user", "content": "hello"}]
    got = c.chat.completions.create(model="pirate", messages=messages, max_tokens=12, temperature=0)
    want = chat_reference(refs["pirate"], tok, [{"role": "system", "content": PIRATE}, *messages], 12)
    assert got.choices[0].message.content == want.text
    base = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert base.choices[0].message.content == chat_reference(model, tok, messages, 12).text != want.text

    # hot-load sailor while 16 streams run; it is served to the next request
    def stream(i):
        chunks = list(
            c.chat.completions.create(
                model="pirate" if i % 2 else "tiny", messages=messages, max_tokens=12, temperature=0, stream=True
            )
        )
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    with ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(stream, i) for i in range(16)]
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "sailor", "lora_path": "sailor"})
        assert r.status_code == 200, r.text
        assert "sailor" in {m.id for m in c.models.list().data}
        got = c.chat.completions.create(model="sailor", messages=messages, max_tokens=12, temperature=0)
        texts = [f.result() for f in streams]
    assert texts == [want.text if i % 2 else base.choices[0].message.content for i in range(16)]
    want_sailor = chat_reference(refs["sailor"], tok, [{"role": "system", "content": SAILOR}, *messages], 12)
    assert got.choices[0].message.content == want_sailor.text
    # prompt log-probs after card rows ran: the base's own (echo reads the base alone)
    ids = [tok.eot_id, *tok.encode("the mat")]
    lp = post(url, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    with torch.no_grad():
        direct = model.next_token_logprobs(torch.tensor([ids[:-1]]))[0].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["choices"][0]["logprobs"]["token_logprobs"][1:]), direct, atol=1e-5)

    # refused: outside the cards folder, a card for another base, a name in use, nothing there
    for path in ("../tiny", str(root / "tiny"), "sailor/../../tiny", "/etc"):
        assert error_body(post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}), 400)["param"] == "lora_path"
    assert (
        "another base"
        in error_body(post(url, "/v1/load_lora_adapter", {"lora_name": "alien", "lora_path": "alien"}), 400)["message"]
    )
    error_body(post(url, "/v1/load_lora_adapter", {"lora_name": "sailor", "lora_path": "sailor"}), 400)
    error_body(post(url, "/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": "ghost"}), 404)
    # unloaded: gone from the list, 404 for the next request
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "sailor"}).status_code == 200
    assert "sailor" not in {m.id for m in c.models.list().data}
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="sailor", messages=messages, max_tokens=2)
    error_body(post(url, "/v1/unload_lora_adapter", {"lora_name": "sailor"}), 404)


def test_background_serves_a_checkpoint_and_its_cards_until_the_block_ends(workdir, tmp_path):
    """`background`: `lmstack serve` in this process, as `lmstack quickstart --assistant` uses it."""
    root, _ = workdir
    model, tok = load_for_text(root / "tiny")
    adapted = make_card(root / "tiny", model, tmp_path / "cards" / "pirate", "pirate", PIRATE)
    threads = set(threading.enumerate())
    with background(root / "tiny", cards_dir=tmp_path / "cards", api_key=KEY, max_batch=4) as url:
        c = client(url)
        assert {m.id: m.parent for m in c.models.list().data} == {"tiny": None, "pirate": "tiny"}
        messages = [{"role": "user", "content": "ahoy"}]
        got = c.chat.completions.create(model="pirate", messages=messages, max_tokens=8, temperature=0)
        want = chat_reference(adapted, tok, [{"role": "system", "content": PIRATE}, *messages], 8)
        assert got.choices[0].message.content == want.text
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)
    assert not [t.name for t in set(threading.enumerate()) - threads if t.name.startswith("lmstack-")]


def test_a_compiled_server_is_compiled_before_it_serves_and_answers_as_eager(workdir, compile_counter):
    """`lmstack serve --compile`: the step compiles while the app is built (no request pays for it),
    and mixed requests for the base and a card get what eager decoding gives them."""
    root, refs = workdir
    model, tok = load_for_text(root / "tiny")
    with background(root / "tiny", cards={"pirate": root / "cards" / "pirate"}, max_batch=4, compile=True) as url:
        assert compile_counter.frame_count == 2  # by `Scheduler.warm_up`, before the server answered
        c = client(url)
        prompts = [("tiny", "the cat"), ("pirate", "ahoy"), ("pirate", "yes"), ("tiny", "no maybe")]
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda mp: c.completions.create(model=mp[0], prompt=mp[1], max_tokens=8, temperature=0), prompts))
        for (name, prompt), answer in zip(prompts, got):
            reference = refs["pirate"] if name == "pirate" else model
            assert answer.choices[0].text == greedy(reference, tok, encode_prompt(tok, prompt), 8).text
    assert compile_counter.frame_count == 2


def test_the_serve_command_takes_a_free_port_with_0_and_names_a_busy_one(workdir, cli):
    """`lmstack serve --port 0` prints the port it took and answers there; a port in use is one
    line and exit code 2, before the model loads."""
    root, _ = workdir
    argv = [sys.executable, "-m", "lmstack.cli", "serve", "--model", str(root / "tiny"), "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url and url[1] != "0", line + proc.stderr.read() if proc.poll() is not None else line
        port = int(url[1])
        for _ in range(200):  # the socket listens before the app runs: connections wait, /health answers once up
            try:
                assert requests.get(url[0] + "health", timeout=5).status_code == 200
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        else:
            raise AssertionError("the server never answered /health")
        busy = cli("serve", "--model", root / "tiny", "--port", port)
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [
            f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
            "check the host, or pick another port (0: a free one)"
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert cli("serve", "--model", root / "tiny", "--port", "70000").stderr.startswith("error: port 70000: must be in 0..65535")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-queue", "0"], "error: max_queue (--max-queue) must be >= 1, got 0"),
        (["--api-key", " "], "error: api_key (--api-key) is empty; give a key, or leave --api-key out to serve without one"),
        (["--name", "my model"], "error: name (--name): card name 'my model' is not valid"),
        (["--name", "pirate", "--card", "pirate=CARDS/pirate"], "error: the card at CARDS/pirate is named 'pirate', as the base"),
    ],
)
def test_the_serve_command_refuses_bad_options_in_one_line(workdir, capsys, args, message):
    from lmstack.cli import main

    cards = str(workdir[0] / "cards")
    argv = ["serve", "--model", str(workdir[0] / "tiny"), "--port", "0", *(a.replace("CARDS", cards) for a in args)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith(message.replace("CARDS", cards))
    assert len(capsys.readouterr().err.strip().splitlines()) <= 1

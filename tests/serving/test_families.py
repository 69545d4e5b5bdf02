"""Every family that implements the model contract can be served, as it can be generated from: `lmstack serve`
(`serving.app.background`) of a Kneser-Ney n-gram, an LSTM and a T5 checkpoint answers, through the
official `openai` client, what in-process greedy generation gives: one request, several at once (rows
whose decoding states do not join share the batch), streamed, and with log-probs equal to lmstack's
scoring. The GPT-only `--compile` is refused with a clear message for the others."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from lmstack.errors import InputError
from lmstack.evaluation.scoring import token_scores
from lmstack.generation import GenerationConfig, generate_tokens
from lmstack.generation.engine import encode_prompt
from lmstack.generation.scheduler import Scheduler
from lmstack.models.checkpoint import load_for_text
from lmstack.serving.app import background, build_app

openai = pytest.importorskip("openai")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\nAll:\nResolved. resolved.\n"
)
# Prompts of different lengths; for the n-gram, words it has seen, so it continues them.
PROMPTS = ["Before", "You are", "we proceed", "rather to", "Speak,"]
FAMILIES = ("ngram", "lstm", "t5")
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A word 3-gram (no tokenizer.json: its vocabulary is its tokenizer), and a random LSTM and T5
    over characters, each saved with its tokenizer as `load_for_text` reads it. The networks are not
    trained: their greedy outputs still differ from prompt to prompt, which is all the checks need."""
    from lmstack.models.ngram import NGramLM
    from lmstack.models.rnn import RNNLM, RNNConfig
    from lmstack.models.t5 import T5, T5Config
    from lmstack.tokenizers.char import CharTokenizer

    root = tmp_path_factory.mktemp("families")
    NGramLM.train_texts(TEXT.splitlines(), order=3, discount_fallback=True).save(root / "ngram")
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>", "<|pad|>"))
    torch.manual_seed(0)
    lstm = RNNLM(RNNConfig(vocab_size=tok.vocab_size, cell="lstm", d_embed=16, d_hidden=32, n_layers=1))
    with torch.no_grad():
        lstm.out.weight.mul_(20)  # sharp next-token distributions, so the prompt decides the output
    lstm.save(root / "lstm", tok)
    pad = tok.special_id("<|pad|>")  # the special ids as the T5 pretraining recipe sets them
    t5 = T5Config.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=tok.eot_id,
        dropout=0.0,
        tie_embeddings=False,
    )
    T5(t5).save(root / "t5", tok)
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, checkpoints):
    """(family, base URL, model, tokenizer): the family's checkpoint served by `background`, as
    `lmstack serve --model DIR --max-batch 4` serves it, and the same checkpoint loaded here."""
    family = request.param
    model, tok = load_for_text(checkpoints / family)
    with background(checkpoints / family, max_batch=4) as url:
        yield family, url, model, tok


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy(model, tok, prompt: str, max_tokens: int = MAX_TOKENS):
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0)
    return generate_tokens(model, [encode_prompt(tok, prompt)], config, tok)[0]


def complete(c, family, prompt, **kw):
    return c.completions.create(model=family, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw)


def test_models_lists_the_checkpoint_and_completions_equal_in_process_generation(served):
    family, url, model, tok = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == [family]
    wants = {}
    for prompt in PROMPTS:
        want = wants[prompt] = greedy(model, tok, prompt)
        got = complete(c, family, prompt)
        assert got.choices[0].text == want.text, prompt
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(encode_prompt(tok, prompt))
        assert got.usage.completion_tokens == len(want.tokens)
    assert len({w.text for w in wants.values()}) >= 3  # the outputs depend on the prompt
    assert any(w.text for w in wants.values())


def test_concurrent_requests_share_the_batch_and_each_get_their_own_text(served, monkeypatch):
    """Continuous batching for states that do not join: the first request decodes alone for a step,
    then the other four arrive; three join the running row and the fifth waits for a free one
    (max_batch 4). The server's worker holds its second step until all have arrived, so this happens
    whatever the timing; the (rows, queued) it saw before each step show that it did."""
    family, url, model, tok = served
    wants = [greedy(model, tok, p) for p in PROMPTS]
    step, add, seen, added, stepped = Scheduler.step, Scheduler.add, [], [], threading.Event()

    def counting_add(self, *args, **kw):
        added.append(1)
        return add(self, *args, **kw)

    def gated_step(self):
        if threading.current_thread().name == "lmstack-scheduler":  # the server's worker
            if stepped.is_set():
                deadline = time.monotonic() + 30
                while len(added) < len(PROMPTS) and time.monotonic() < deadline:
                    time.sleep(0.005)
            seen.append((self.running, self.queued))
            events = step(self)
            stepped.set()
            return events
        return step(self)

    monkeypatch.setattr(Scheduler, "add", counting_add)
    monkeypatch.setattr(Scheduler, "step", gated_step)
    c = client(url)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        first = pool.submit(complete, c, family, PROMPTS[0])
        assert stepped.wait(30)
        rest = [pool.submit(complete, c, family, p) for p in PROMPTS[1:]]
        got = [f.result() for f in (first, *rest)]
    for prompt, want, answer in zip(PROMPTS, wants, got):
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == (want.text, want.finish_reason), prompt
    assert seen[:3] == [(0, 1), (1, 4), (4, 1)], seen  # alone; four arrive while it runs; three join, one waits
    assert (0, 1) not in seen[3:] and seen[-1][1] == 0, seen  # the fifth joined before the batch emptied


def test_streaming_yields_the_same_text(served):
    family, url, model, tok = served
    c = client(url)
    for prompt in PROMPTS[:3]:
        want = greedy(model, tok, prompt)
        chunks = list(complete(c, family, prompt, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text, prompt
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason


def test_logprobs_equal_lmstack_scoring(served):
    """The log-probs of the generated tokens (and, for a causal family, echo's of the prompt) equal
    `evaluation.scoring.token_scores`: an encoder-decoder scores its output given the prompt as
    source, a causal model given the prompt before it."""
    family, url, model, tok = served
    prompt = "You are"
    ids, want = encode_prompt(tok, prompt), greedy(model, tok, prompt)
    got = complete(c := client(url), family, prompt, logprobs=2)
    lp = got.choices[0].logprobs
    scores = token_scores(model, ids + want.tokens, start=len(ids), top=2)
    assert got.choices[0].text == want.text and len(lp.token_logprobs) == len(want.tokens) > 0
    assert lp.token_logprobs == pytest.approx([s.logprob for s in scores], abs=1e-4)
    assert lp.tokens == [tok.id_to_piece(t) for t in want.tokens]
    for top, s in zip(lp.top_logprobs, scores):
        assert sorted(top.values(), reverse=True) == pytest.approx([v for _, v in s.top], abs=1e-4)
    if family == "t5":
        return  # a source has no log-probability under an encoder-decoder: nothing to echo
    echoed = c.completions.create(model=family, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([s.logprob for s in token_scores(model, ids, start=1)], abs=1e-4)


def test_tokenizer_and_chat_endpoints_answer_without_an_internal_error(served):
    """A model without a chat format gets the 400 that says so; /tokenize and /tokenizer_info
    answer for every family."""
    family, url, model, tok = served
    chat = {"model": family, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = requests.post(url + "/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400 and "no chat format" in r.json()["error"]["message"], r.text
    r = requests.post(url + "/tokenize", json={"prompt": "You are"}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("You are"), r.text
    r = requests.get(url + "/tokenizer_info", timeout=30)
    assert r.status_code == 200 and r.json()["vocab_size"] == tok.vocab_size, r.text


def test_echo_logprobs_of_an_encoder_decoder_prompt_are_refused(checkpoints):
    """A T5 reads its prompt as the encoder's source, which has no log-probability (`lmstack score`
    refuses to score one without a continuation): echo with logprobs is a 400 that says so."""
    with background(checkpoints / "t5", max_batch=4) as url:
        body = {"model": "t5", "prompt": "You are", "max_tokens": 0, "echo": True, "logprobs": 1}
        r = requests.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_is_refused_for_a_family_other_than_gpt(checkpoints, family):
    with pytest.raises(InputError, match="--compile needs a GPT checkpoint") as e:
        build_app(checkpoints / family, compile=True)
    assert family.replace("lstm", "rnn") in str(e.value)  # the message names the family it got

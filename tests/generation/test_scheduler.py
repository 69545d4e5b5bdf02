"""The scheduler (continuous batching) and mixed LoRA adapters in one batch: every request gets
what it would get alone, whatever joins or leaves the batch around it."""

import copy
import threading

import pytest
import torch
from conftest import BigramLM, random_bigram

from lmstack.errors import CheckpointError, InputError
from lmstack.generation import GenerationConfig, generate, generate_tokens
from lmstack.generation.scheduler import Scheduler
from lmstack.models import lora
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.multi_lora import MultiLora
from lmstack.tokenizers.char import CharTokenizer

V = 40
GREEDY = GenerationConfig(max_new_tokens=10, temperature=0)


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": V, "block_size": 48, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})).eval()


def naive_greedy(model, prompt, n):
    """Greedy decoding the slow way: rescore the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.next_token_logprobs(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def run(scheduler: Scheduler, arrivals: dict[int, list[tuple]]) -> dict[int, list]:
    """Step until idle, adding `arrivals[step]` (add() arguments) at each step; the events by request."""
    events: dict[int, list] = {}
    step = 0
    while scheduler.busy or any(s >= step for s in arrivals):
        for args in arrivals.get(step, []):
            events[scheduler.add(*args)] = []
        for e in scheduler.step():
            events[e.request].append(e)
        step += 1
    return events


def tokens(events, index: int = 0) -> list[int]:
    return [e.token for e in events if e.index == index and e.token is not None]


def test_requests_joining_and_leaving_a_running_batch_get_what_they_get_alone():
    model = tiny_gpt()
    prompts = [[1, 2, 3], list(range(5, 25)), [7], [9, 10, 11, 12, 13, 14], [2, 2]]
    configs = [
        GREEDY,
        GenerationConfig(max_new_tokens=4, temperature=0),
        GenerationConfig(max_new_tokens=12, seed=3, top_k=5),
        GenerationConfig(max_new_tokens=7, seed=1, temperature=0.8, presence_penalty=0.5),
        GREEDY,
    ]
    # requests arrive while others run; the long prompt leaves early, so the batch is trimmed
    arrivals = {
        0: [(prompts[0], configs[0]), (prompts[1], configs[1])],
        2: [(prompts[2], configs[2])],
        3: [(prompts[3], configs[3])],
        9: [(prompts[4], configs[4])],
    }
    events = run(Scheduler(model, None, max_batch=8), arrivals)
    for rid, (prompt, config) in enumerate(zip(prompts, configs)):
        alone = generate_tokens(model, [prompt], config)[0]
        assert tokens(events[rid]) == alone.tokens
        if config.greedy:
            assert alone.tokens == naive_greedy(model, prompt, config.max_new_tokens)
        # each event's log-prob is the model's log p of its token after the whole sequence so far
        seq = prompt + alone.tokens
        full = model.next_token_logprobs(torch.tensor([seq]))[0].detach()
        expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(alone.tokens)]
        assert [e.logprob for e in events[rid] if e.token is not None] == pytest.approx(expected, abs=1e-5)
        assert events[rid][-1].finish_reason == "length"


def test_n_samples_read_the_prompt_once_and_each_is_a_seeded_request_of_its_own():
    model = random_bigram(12, sharpness=1.0)
    sched = Scheduler(model, None)
    config = GenerationConfig(max_new_tokens=6, seed=10)
    events = run(sched, {0: [([1, 2, 3, 4], config, 3)]})[0]
    assert model.fed == 4 + 3 * 5  # the prompt once, then one token per sample per step
    samples = [tokens(events, i) for i in range(3)]
    assert len({tuple(s) for s in samples}) > 1
    for i, s in enumerate(samples):
        assert s == generate_tokens(model, [[1, 2, 3, 4]], GenerationConfig(max_new_tokens=6, seed=10 + i))[0].tokens


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on():
    model = tiny_gpt()
    sched = Scheduler(model, None, max_batch=2)
    a, b = sched.add([1, 2], GREEDY), sched.add([3, 4, 5], GREEDY)
    queued = sched.add([6], GREEDY)  # no room: waits
    first = sched.step()
    assert {e.request for e in first} == {a, b} and sched.queued == 1
    sched.cancel(a)
    sched.cancel(queued)
    events = {a: [], b: [], queued: []}
    while sched.busy:
        for e in sched.step():
            events[e.request].append(e)
    assert [(e.token, e.finish_reason) for e in events[a]] == [(None, "cancelled")]
    assert [(e.token, e.finish_reason) for e in events[queued]] == [(None, "cancelled")]
    assert [e.token for e in first if e.request == b] + tokens(events[b]) == naive_greedy(model, [3, 4, 5], 10)


def test_max_batch_holds_requests_until_rows_free_up():
    model = random_bigram(12)
    sched = Scheduler(model, None, max_batch=3)
    ids = [sched.add([i + 1], GenerationConfig(max_new_tokens=2 + i, temperature=0)) for i in range(5)]
    widths, done = [], {}
    while sched.busy:
        for e in sched.step():
            if e.finish_reason:
                done[e.request] = e.finish_reason
        widths.append(sched.running)
    assert max(widths) <= 3 and set(done) == set(ids)


@pytest.mark.parametrize("name", ["ngram", "lstm", "t5"])
def test_families_whose_states_do_not_join_are_served_too(name):
    from lmstack.models.ngram import NGramLM
    from lmstack.models.rnn import RNNLM, RNNConfig
    from lmstack.models.t5 import T5, T5Config

    torch.manual_seed(0)
    words = [" ".join(f"w{(i * j) % 7}" for j in range(6)) for i in range(30)]
    model = {
        "ngram": lambda: NGramLM.train_texts(words, order=3, discount_fallback=True),
        "lstm": lambda: RNNLM(RNNConfig(vocab_size=V, d_embed=16, d_hidden=16)).eval(),
        "t5": lambda: T5(T5Config.preset("tiny", vocab_size=V)).eval(),
    }[name]()
    vocab = model.vocab_size
    prompts = [[1, 2, 3], [4 % vocab, 5 % vocab], [6 % vocab]]
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    events = run(Scheduler(model, None), {0: [(prompts[0], config)], 2: [(prompts[1], config), (prompts[2], config)]})
    for rid, prompt in enumerate(prompts):
        assert tokens(events[rid]) == generate_tokens(model, [prompt], config)[0].tokens
        if name != "t5":
            assert tokens(events[rid]) == naive_greedy(model, prompt, 6)


def test_events_stream_whole_text_and_end_at_end_of_text():
    tok = CharTokenizer.train(["abc xyz"], special_tokens=("<|endoftext|>",))
    ids = tok.encode("abc é世界xyz")  # unseen characters fall back to UTF-8 bytes
    table = torch.full((tok.vocab_size, tok.vocab_size), -30.0)
    for x, y in zip(ids, ids[1:]):
        table[x, y] = 0.0
    table[ids[-1], tok.eot_id] = 0.0
    model = BigramLM(table)
    sched = Scheduler(model, tok)
    config = GenerationConfig(temperature=0, max_new_tokens=50, stop=("yz",))
    plain = GenerationConfig(temperature=0, max_new_tokens=50)
    events = run(sched, {0: [(tok.encode("a"), config), (tok.encode("a"), plain, 1, None, 3)]})
    stopped, ended = events[0], events[1]
    assert "".join(e.text for e in stopped) == generate(model, tok, ["a"], config)[0].text == "bc é世界x"
    assert not any("\ufffd" in e.text for e in stopped) and stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in ended) == "bc é世界xyz"
    assert (ended[-1].token, ended[-1].finish_reason) == (None, "stop")  # <|endoftext|> is not output
    probs = table.log_softmax(-1)
    first = ended[0]
    values, best = probs[ids[0]].topk(3)
    assert first.top == [(int(t), pytest.approx(float(v), abs=1e-6)) for t, v in zip(best, values)]


def test_add_and_cancel_from_another_thread_while_a_worker_steps():
    model = tiny_gpt()
    sched = Scheduler(model, None, max_batch=4)
    finished, stop = {}, threading.Event()

    def worker():
        while not stop.is_set() or sched.busy:
            for e in sched.step():
                if e.finish_reason:
                    finished[(e.request, e.index)] = e.finish_reason

    thread = threading.Thread(target=worker)
    thread.start()
    ids = [sched.add([i % V + 1, 2], GenerationConfig(max_new_tokens=8, seed=i), n=1 + i % 2) for i in range(12)]
    sched.cancel(ids[5])
    stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert {r for r, _ in finished} == set(ids)
    assert all(reason in ("length", "cancelled") for reason in finished.values())


def test_bad_requests_are_refused_when_added():
    sched = Scheduler(tiny_gpt(), None, max_batch=4)
    for args, match in [
        (([],), "at least one token"),
        (([V],), r"token ids must be in \[0, 40\)"),
        (([1], GREEDY, 5), "do not fit"),
        (([1], GREEDY, 0), "n\\) must be"),
        (([1], GREEDY, 1, "nope"), "no adapter named 'nope'"),
        (([1], GREEDY, 1, None, -1), "logprobs"),
        (([1], GenerationConfig(stop=("x",))), "stop strings need a tokenizer"),
        (([1] * 49,), "longer than the model's context"),
    ]:
        with pytest.raises(InputError, match=match):
            sched.add(*args)
    assert not sched.busy
    with pytest.raises(InputError, match="max_batch"):
        Scheduler(tiny_gpt(), None, max_batch=0)


# --- mixed LoRA adapters -------------------------------------------------------------------


def make_adapter(base_dir, out, r: int, targets, seed: int):
    model = GPT.load(base_dir).eval()
    lora.attach(model, lora.LoraConfig(r=r, alpha=2 * r, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    lora.save_adapter(model, out, base_dir)
    return out


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    tiny_gpt(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False).save(tmp / "base")
    return tmp / "base", {
        "a": make_adapter(tmp / "base", tmp / "a", 2, ("attn",), 1),
        "b": make_adapter(tmp / "base", tmp / "b", 4, ("attn", "mlp"), 2),
    }


def alone(base_dir, adapter_dir):
    model = GPT.load(base_dir).eval()
    if adapter_dir is not None:
        lora.load_adapter(model, adapter_dir)
    return model


def test_rows_with_different_adapters_in_one_batch_equal_each_adapter_alone(cards):
    base_dir, dirs = cards
    model = GPT.load(base_dir).eval()
    multi = MultiLora(model)
    slots = {name: multi.install(multi.read(d)) for name, d in dirs.items()}
    x = torch.randint(0, V, (5, 9), generator=torch.Generator().manual_seed(0))
    names = ["a", None, "b", "a", "b"]
    multi.set_rows([slots[n] if n else -1 for n in names])
    with torch.no_grad():
        mixed = model.next_token_logprobs(x)
        for row, name in enumerate(names):
            ref = alone(base_dir, dirs[name] if name else None).next_token_logprobs(x[row : row + 1])[0]
            assert (mixed[row] - ref).abs().max() <= 1e-5
        multi.set_rows(None)
        assert (model.next_token_logprobs(x) - alone(base_dir, None).next_token_logprobs(x)).abs().max() <= 1e-5
    # the adapters change the outputs, so the check above is not vacuous
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


def test_the_scheduler_serves_adapters_side_by_side_and_loads_them_at_run_time(cards, tmp_path):
    base_dir, dirs = cards
    sched = Scheduler(GPT.load(base_dir).eval(), None, max_batch=8)
    sched.load_adapter("a", dirs["a"])
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    first = run(sched, {0: [([1, 2, 3], config, 1, "a"), ([4, 5], config)]})
    sched.load_adapter("b", dirs["b"])  # hot-loaded between requests
    assert set(sched.adapters) == {"a", "b"}
    second = run(sched, {0: [([1, 2, 3], config, 1, "b"), ([6, 7, 8, 9], config, 1, "a")], 1: [([4, 5], config)]})
    expected = [
        (first[0], [1, 2, 3], "a"),
        (first[1], [4, 5], None),
        (second[2], [1, 2, 3], "b"),
        (second[3], [6, 7, 8, 9], "a"),
        (second[4], [4, 5], None),
    ]
    for events, prompt, name in expected:
        assert tokens(events) == naive_greedy(alone(base_dir, dirs[name] if name else None), prompt, 8)
    sched.unload_adapter("a")
    with pytest.raises(InputError, match="no adapter named 'a'"):
        sched.add([1], config, adapter="a")
    other = tmp_path / "other"
    tiny_gpt(n_embd=16).save(other)
    with pytest.raises(CheckpointError, match="not for this gpt model"):
        sched.load_adapter("x", make_adapter(other, tmp_path / "x", 2, ("attn",), 3))


def test_an_adapter_that_replaces_whole_modules_is_refused_for_mixing(cards, tmp_path):
    base_dir, _ = cards
    model = GPT.load(base_dir).eval()
    lora.attach(model, lora.LoraConfig(r=2, targets=("attn",), modules_to_save=("embeddings",)))
    lora.save_adapter(model, tmp_path / "whole", base_dir)
    with pytest.raises(CheckpointError, match="trains whole modules"):
        Scheduler(copy.deepcopy(alone(base_dir, None)), None).load_adapter("w", tmp_path / "whole")


def test_a_compiled_step_serves_mixed_adapters_and_compiles_nothing_after_warm_up(cards, compile_counter):
    """`lmstack serve --compile`: inside the compiled step each row reads its own adapter, so
    requests that join and leave with any mix of adapters get what they get alone, and once
    `warm_up` has run no batch size and no mix of adapters compiles the step again."""
    base_dir, dirs = cards
    sched = Scheduler(GPT.load(base_dir).eval().compile_decoding(capacity=48), None, max_batch=8)
    for name, path in dirs.items():
        sched.load_adapter(name, path)
    sched.warm_up()
    assert compile_counter.frame_count == 2  # a row alone, then any larger batch
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    arrivals = {
        0: [([1, 2, 3], config, 1, "a"), ([4, 5], config), ([6, 7, 8, 9], config, 1, "b")],
        3: [([3, 1], config, 1, "b"), ([2], config, 1, "a"), ([5, 5, 5], config)],
    }
    events = run(sched, arrivals)
    requests = [args for step in sorted(arrivals) for args in arrivals[step]]
    for rid, (prompt, _, *rest) in zip(sorted(events), requests):  # ids in order of arrival
        name = rest[1] if rest else None
        assert tokens(events[rid]) == naive_greedy(alone(base_dir, dirs[name] if name else None), prompt, 8), rid
    assert compile_counter.frame_count == 2

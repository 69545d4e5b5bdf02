"""Fine-tuning examples and batches: the shared chat files, errors naming file and line, and packed
batches checked against transformers' DataCollatorWithFlattening (labels, positions, sequence ids)."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data import chat
from lmstack.data.sft import Example, SFTBatches, collate, pack_rows, read_examples, split
from lmstack.errors import InputError
from lmstack.tokenizers import EOT
from lmstack.tokenizers.char import CharTokenizer

FILES = ("sft_self_instruct_seed.jsonl", "chatterbot_en.jsonl", "chatterbot_zh.jsonl")


@pytest.fixture(scope="module")
def tok(shared):
    text = "".join((shared / "data" / f).read_text(encoding="utf-8") for f in FILES)
    t = CharTokenizer.train([text + "abcdefghijklmnopqrstuvwxyz\n"], special_tokens=(EOT,))
    chat.add_chat_tokens(t)
    return t


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return p


def learned(tok, e: Example) -> str:
    return tok.decode(e.ids[e.mask].tolist())


@pytest.mark.parametrize("name", FILES)
def test_shared_chat_files_read_with_replies_as_the_only_targets(shared, tok, name):
    path = shared / "data" / name
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples, report = read_examples(path, tok, max_length=100_000)
    assert len(examples) == report.rows == len(rows) and report.truncated == report.dropped == 0
    for e, row in zip(examples, rows):
        assert learned(tok, e) == "".join(m["content"] + "<|end|>" for m in row["messages"] if m["role"] == "assistant")
        assert tok.decode(e.ids.tolist()) == chat.render_text(tok, row["messages"])
    assert report.tokens == sum(len(e.ids) for e in examples)
    assert report.target_tokens == sum(int(e.mask[1:].sum()) for e in examples)


def test_prompt_response_rows_are_the_conversation_they_describe(tmp_path, tok):
    row = {"system": "be brief", "prompt": "hi", "response": "hello", "id": 7}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    (a,), _ = read_examples(write(tmp_path, "a.jsonl", [row, ""]), tok, 64)
    (b,), _ = read_examples(write(tmp_path, "b.jsonl", [{"messages": messages, "topic": "x"}]), tok, 64)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
    assert learned(tok, a) == "hello<|end|>"


def test_long_rows_keep_their_start_and_rows_left_without_a_reply_are_dropped(tmp_path, tok):
    short = {"prompt": "ab", "response": "cd"}  # <|user|>ab<|end|><|assistant|>cd<|end|>: 9 tokens
    long_reply = {"prompt": "ab", "response": "c" * 20}
    long_prompt = {"prompt": "a" * 20, "response": "cd"}
    examples, report = read_examples(write(tmp_path, "d.jsonl", [short, long_reply, long_prompt]), tok, 9)
    assert (report.rows, report.truncated, report.dropped, len(examples)) == (3, 2, 1, 2)
    full, _ = chat.render(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c" * 20}])
    assert examples[1].ids.tolist() == full[:9] and learned(tok, examples[1]) == "cccc"
    assert "2 examples of 3 rows" in str(report) and "1 dropped" in str(report)


def test_text_files_are_chunks_with_loss_on_every_token(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 3)
    examples, report = read_examples(p, tok, 8)
    ids = np.concatenate([e.ids for e in examples])
    assert ids.tolist() == tok.encode("abcdefghij" * 3) + [tok.eot_id]
    assert [len(e.ids) for e in examples] == [8, 8, 8, 7] and all(e.mask.all() for e in examples)
    assert report.target_tokens == 7 * 3 + 6


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a",'], r"e\.jsonl:2: not valid JSON"),
        (['{"prompt": "a"}'], r"e\.jsonl:1: needs \"messages\", or string \"prompt\" and \"response\""),
        (["[1, 2]"], r"e\.jsonl:1: not a JSON object"),
        (
            ["", '{"messages": [{"role": "bot", "content": "x"}]}'],
            r"e\.jsonl:2: .*unknown role 'bot'; allowed roles: system, user, assistant",
        ),
        (['{"messages": [{"role": "user", "content": "x"}]}'], r"e\.jsonl:1: no assistant reply"),
        (['{"messages": []}'], r"e\.jsonl:1: a conversation must be a non-empty list"),
        (['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "aaaa"}]}'], "raise max_length"),
        ([""], "file is empty"),
        (["", "  ", ""], "only blank lines"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, tok, lines, message):
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(InputError, match=message):
        read_examples(p, tok, 4)


def test_other_files_and_lengths_are_refused(tmp_path, tok):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="unknown data format '.csv'"):
        read_examples(tmp_path / "x.csv", tok, 8)
    with pytest.raises(InputError, match="at least 2"):
        read_examples(tmp_path / "x.csv", tok, 1)


def examples_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, 50, n), np.r_[False, rng.random(n - 1) < 0.7] | (np.arange(n) == n - 1)) for n in lengths]


def test_split_holds_out_a_seeded_fraction_in_file_order():
    ex = examples_of([3] * 20)
    train, val = split(ex, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    ids = [id(e) for e in ex]
    assert sorted(map(id, train + val), key=ids.index) == ids
    assert [id(e) for e in val] == sorted(map(id, val), key=ids.index)
    assert [id(e) for e in split(ex, 0.25, seed=1)[1]] == [id(e) for e in val]
    assert [id(e) for e in split(ex, 0.25, seed=2)[1]] != [id(e) for e in val]
    assert split(ex, 0.0, 1) == (ex, [])
    with pytest.raises(InputError, match="too few"):
        split(ex[:1], 0.5, 1)


@settings(derandomize=True, max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(2, 16), min_size=1, max_size=40), capacity=st.integers(16, 40))
def test_packing_places_every_example_once_within_the_row(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert len(rows) <= 2 * sum(lengths) / capacity + 1  # greedy packing keeps rows more than half full on average


def test_packed_rows_match_transformers_flattening():
    """One packed row = HF's DataCollatorWithFlattening of its examples: our targets are its labels
    shifted by one (no loss across documents), positions restart where its position_ids do."""
    flatten = pytest.importorskip("transformers").DataCollatorWithFlattening(return_tensors="np", return_seq_idx=True)
    docs = examples_of([5, 3, 7, 2])
    batch = collate([docs], width=20, pad_id=99)
    ref = flatten([{"input_ids": e.ids.tolist(), "labels": np.where(e.mask, e.ids, -100).tolist()} for e in docs])
    n = sum(len(e.ids) for e in docs)
    idx, targets, segments = (batch[k][0].numpy() for k in ("idx", "targets", "segments"))
    assert np.array_equal(idx[:n], ref["input_ids"][0]) and (idx[n:] == 99).all()
    assert np.array_equal(targets[: n - 1], ref["labels"][0][1:]) and (targets[n - 1 :] == -100).all()
    assert np.array_equal(segments[:n] - 1, ref["seq_idx"][0]) and (segments[n:] == 0).all()
    positions = np.concatenate([np.arange(len(e.ids)) for e in docs])
    assert np.array_equal(positions, ref["position_ids"][0])


def docs_of(batch) -> list[list[tuple]]:
    """The documents of each row of a batch, as tuples of ids."""
    return [
        [tuple(row[seg == s].tolist()) for s in range(1, int(seg.max()) + 1)] for row, seg in zip(batch["idx"], batch["segments"])
    ]


@pytest.mark.parametrize("pack", [True, False])
def test_an_epoch_visits_every_example_once_in_a_seeded_order(pack):
    ex = examples_of(list(range(2, 14)) * 2)
    b = SFTBatches(ex, batch_size=1, max_length=16, seed=3, pack=pack)
    n = b.rows_per_epoch
    assert b.steps_per_epoch == n and (n < len(ex) if pack else n == len(ex))
    epochs = [[docs_of(b.make(step, 0))[0] for step in range(e * n, (e + 1) * n)] for e in (0, 1)]
    for rows in epochs:
        assert sorted(d for row in rows for d in row) == sorted(tuple(e.ids.tolist()) for e in ex)
    assert epochs[0] != epochs[1]  # each epoch draws its own order
    assert b.epoch(n) == 1.0


@pytest.mark.parametrize("pack", [True, False])
def test_micro_batches_are_slices_of_a_seeded_global_batch(pack):
    ex = examples_of(list(range(2, 14)) * 2)
    whole = SFTBatches(ex, batch_size=4, max_length=16, seed=3, pack=pack)
    parts = SFTBatches(ex, batch_size=2, max_length=16, seed=3, pack=pack, rows_per_step=4)
    assert docs_of(whole.make(5, 0)) == docs_of(parts.make(5, 0)) + docs_of(parts.make(5, 1))
    again = SFTBatches(ex, batch_size=2, max_length=16, seed=3, pack=pack, rows_per_step=4).make(5, 1)
    assert all(torch.equal(again[k], parts.make(5, 1)[k]) for k in again)
    assert docs_of(whole.make(5, 0)) != docs_of(whole.make(6, 0))
    batch = whole.make(5, 0)
    longest = max(len(d) for row in docs_of(batch) for d in row)
    assert batch["idx"].shape == (4, 16 if pack else longest)
    with pytest.raises(ValueError):
        parts.make(0, 2)


def test_batches_refuse_examples_that_would_give_no_loss_or_do_not_fit():
    with pytest.raises(InputError, match="no token to learn"):
        SFTBatches([Example(np.arange(4), np.array([True, False, False, False]))], 1, 8)
    with pytest.raises(InputError, match="more than max_length 3"):
        SFTBatches(examples_of([4]), 1, 3)
    with pytest.raises(InputError, match="not a multiple"):
        SFTBatches(examples_of([4]), 2, 8, rows_per_step=3)

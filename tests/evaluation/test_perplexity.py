"""Perplexity on the LM contract: KenLM's counting, OOV handling, bits per byte, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.evaluation.perplexity import perplexity, split_lines, text_codec
from lmstack.models.base import LanguageModel
from lmstack.models.ngram import NGramLM


class Uniform(LanguageModel):
    """p(next) = 1/V for every token: perplexity is V whatever the text."""

    def __init__(self, V: int):
        self.vocab_size = V

    def next_token_logprobs(self, tokens):
        return torch.full((*tokens.shape, self.vocab_size), -math.log(self.vocab_size), dtype=torch.float64)

    def start(self, prompt):  # pragma: no cover - not used here
        raise NotImplementedError

    def step(self, state, tokens):  # pragma: no cover
        raise NotImplementedError


def _encode(line: str) -> list[int]:
    return [3 + (ord(c) % 7) if c != "?" else 0 for c in line.replace(" ", "")]


def test_counts_tokens_as_kenlm_and_uniform_model_has_perplexity_v():
    lines = ["ab c\n", "\n", "defg\n"]
    res = perplexity(Uniform(10), lines, _encode, bos=1, eos=2, unk=0)
    assert res.lines == 3
    assert res.tokens == (3 + 1) + (0 + 1) + (4 + 1)  # words plus one </s> per line, no <s>
    assert res.perplexity == pytest.approx(10.0)
    assert res.bytes == 5 + 1 + 5
    assert res.bits_per_byte == pytest.approx(res.tokens * math.log2(10) / res.bytes)


def test_oovs_are_scored_and_excluded_on_request():
    model = NGramLM.train_texts(["a b c", "a c b", "b b a"], order=2, discount_fallback=True)
    enc = model.encode
    res = perplexity(model, ["a zz b", "yy"], enc, model.bos_id, model.eos_id, model.unk_id)
    assert res.oovs == 2 and res.tokens == 6
    lp = [model.token_logprobs(torch.tensor([[model.bos_id, *enc(s), model.eos_id]]))[0] / math.log(10) for s in ("a zz b", "yy")]
    total = float(sum(x.sum() for x in lp))
    oov = float(lp[0][1] + lp[1][0])
    assert res.log10_prob == pytest.approx(total)
    assert res.perplexity == pytest.approx(10 ** (-total / 6))
    assert res.perplexity_excluding_oovs == pytest.approx(10 ** (-(total - oov) / 4))


def test_batching_does_not_change_the_result():
    model = NGramLM.train_texts(["a b c d", "d c b a", "a a b"], order=3, discount_fallback=True)
    lines = ["a b", "c d a b c", "", "b", "a a a a a a a"] * 5
    args = (model.encode, model.bos_id, model.eos_id, model.unk_id)
    one = perplexity(model, lines, *args, max_batch_tokens=1)
    many = perplexity(model, lines, *args, max_batch_tokens=1 << 20)
    for key in ("tokens", "oovs", "bytes", "log10_prob", "perplexity", "perplexity_excluding_oovs", "bits_per_byte"):
        assert one.to_dict()[key] == pytest.approx(many.to_dict()[key]), key


def test_cli_prints_one_json_object(lmstack_cli, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the cat sat\nthe dog sat\na cat ran\nthe cat ran\n" * 3, encoding="utf-8")
    test = tmp_path / "test.txt"
    test.write_text("the cat sat\na bird sat\n", encoding="utf-8")
    lmstack_cli("ngram", "train", train, "--order", "2", "--out", tmp_path / "m", "--discount-fallback")
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m", test, "--json"))
    model = NGramLM.load(tmp_path / "m")
    want = perplexity(model, ["the cat sat\n", "a bird sat\n"], **text_codec(model, None))
    for key in ("tokens", "oovs", "log10_prob", "perplexity", "perplexity_excluding_oovs", "bits_per_byte"):
        assert got[key] == pytest.approx(want.to_dict()[key]), key
    assert got["tokens"] == 8 and got["oovs"] == 1
    # the bare ARPA file gives the same numbers
    arpa = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m" / "model.arpa", test, "--json"))
    assert arpa["perplexity"] == pytest.approx(got["perplexity"], rel=1e-7)


def test_subword_model_reports_bits_per_byte(lmstack_cli, tmp_path):
    from lmstack.tokenizers.char import CharTokenizer

    text = "hello world\nhold the door\nhello there\n"
    CharTokenizer.train([text]).save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    lmstack_cli(
        "ngram",
        "train",
        tmp_path / "c.txt",
        "--order",
        "3",
        "--out",
        tmp_path / "m",
        "--tokenizer",
        tmp_path / "tok",
        "--discount-fallback",
    )
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "m", tmp_path / "c.txt", "--json"))
    assert got["bytes"] == len(text.encode()) and got["tokens"] == len(text)  # one token per char (+ </s> per newline)
    assert got["bits_per_byte"] == pytest.approx(-got["log10_prob"] * math.log2(10) / got["bytes"])


def test_cli_bad_inputs_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe oops\n")
    arpa = tmp_path / "broken.arpa"
    arpa.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1\ta\n\n\\end\\\n", encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("a\n", encoding="utf-8")
    for args, needle in ((["--model", arpa, bad], "UTF-8"), (["--model", arpa, good], "broken.arpa:6")):
        proc = cli("eval", "perplexity", *args)
        assert proc.returncode != 0 and proc.stdout == ""
        assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1 and needle in proc.stderr


# --- per word, stream mode, bits per byte across tokenizers --------------------------------


def test_word_level_ngram_perplexity_per_word_is_its_perplexity():
    """Words are counted as KenLM counts tokens, so for a word model the two figures agree."""
    model = NGramLM.train_texts(["a b c", "a c b", "b b a"], order=2, discount_fallback=True)
    res = perplexity(model, ["a  b\tc", "", "c a zz b"], model.encode, model.bos_id, model.eos_id, model.unk_id)
    assert res.words == res.tokens == 4 + 1 + 5
    assert res.perplexity_per_word == pytest.approx(res.perplexity)


class CountsUnigram(LanguageModel):
    """p(v) proportional to fixed counts, whatever the context."""

    def __init__(self, counts: dict[int, int]):
        self.vocab_size = max(counts) + 1
        total = sum(counts.values())
        self.logp = torch.full((self.vocab_size,), -math.inf, dtype=torch.float64)
        for i, c in counts.items():
            self.logp[i] = math.log(c / total)

    def next_token_logprobs(self, tokens):
        return self.logp.expand(*tokens.shape, self.vocab_size)

    def start(self, prompt):  # pragma: no cover - not used here
        raise NotImplementedError

    def step(self, state, tokens):  # pragma: no cover
        raise NotImplementedError


@pytest.mark.parametrize("kind", ["char", "word"])
def test_bits_per_byte_and_per_word_of_unigram_by_counts_match_hand_computation(kind):
    from collections import Counter

    from lmstack.evaluation.perplexity import stream_perplexity
    from lmstack.tokenizers.char import CharTokenizer
    from lmstack.tokenizers.word import WordTokenizer

    docs = ["the cat sat on the mat\nthe dog sat\n", "a cat, a hat\n"]
    cls = CharTokenizer if kind == "char" else WordTokenizer
    tok = cls.train(docs, special_tokens=("<|endoftext|>",))
    eot = tok.eot_id
    stream = [eot] + [i for d in docs for i in tok.encode(d) + [eot]]
    counts = Counter(stream[1:])
    res = stream_perplexity(CountsUnigram(counts), docs, tok.encode, eot, context=5, stride=3)
    n = len(stream) - 1
    nats = -sum(c * math.log(c / n) for c in counts.values())
    assert res.tokens == n
    assert res.bytes == sum(len(d.encode()) for d in docs) == 48
    assert res.words == 13 + 3  # 13 words and 3 end-of-lines, whatever the tokenizer
    assert res.bits_per_byte == pytest.approx(nats / math.log(2) / 48, rel=1e-12)
    assert res.perplexity_per_word == pytest.approx(math.exp(nats / 16), rel=1e-12)
    assert res.perplexity == pytest.approx(math.exp(nats / n), rel=1e-12)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random HF GPT-2 (context 16) imported into lmstack, and a char tokenizer for it."""
    transformers = pytest.importorskip("transformers")
    from lmstack.models.hf import from_hf
    from lmstack.tokenizers.char import CharTokenizer

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.train([text], special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("gpt2-hf")
    hf.save_pretrained(d)
    model, _ = from_hf(d)
    return hf, model, tok, text


def test_gpt_stream_with_stride_equal_to_context_is_the_sum_over_disjoint_windows(tiny_gpt2):
    from lmstack.evaluation.perplexity import stream_perplexity

    hf, model, tok, text = tiny_gpt2
    docs = [text, text[:23]]
    res = stream_perplexity(model, docs, tok.encode, tok.eot_id, context=16, stride=16)
    ids = torch.tensor([tok.eot_id] + [i for d in docs for i in tok.encode(d) + [tok.eot_id]])
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):  # inputs ids[s:s+16] predict ids[s+1:s+17]
            inputs, targets = ids[s : s + 16], ids[s + 1 : s + 17]
            lp = hf(inputs[None]).logits[0, : len(targets)].double().log_softmax(-1)
            total += float(lp.gather(-1, targets[:, None]).sum())
    assert res.tokens == len(ids) - 1
    assert res.nats == pytest.approx(-total, rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(-total / res.tokens), rel=1e-4)


def test_stream_scores_every_token_once_whatever_the_stride(tiny_gpt2):
    """Stride 1 (every token with the fullest window) against one dense pass over a text that
    fits the window: identical log-probabilities."""
    from lmstack.evaluation.perplexity import stream_perplexity

    _, model, tok, _ = tiny_gpt2
    doc = "hear me speak"  # 13 chars + 2 end-of-text: 14 targets, fits a context of 16
    whole = stream_perplexity(model, [doc], tok.encode, tok.eot_id, context=16, stride=16)
    for stride in (1, 5, 15):
        part = stream_perplexity(model, [doc], tok.encode, tok.eot_id, context=16, stride=stride)
        assert part.tokens == whole.tokens and part.nats == pytest.approx(whole.nats, rel=1e-6)


def test_context_longer_than_the_model_names_the_flag(tiny_gpt2):
    from lmstack.errors import ContextLengthError, InputError
    from lmstack.evaluation.perplexity import stream_perplexity

    _, model, tok, text = tiny_gpt2
    with pytest.raises(ContextLengthError, match="--context 17 .* context of 16"):
        stream_perplexity(model, [text], tok.encode, tok.eot_id, context=17)
    with pytest.raises(InputError, match="--stride"):
        stream_perplexity(model, [text], tok.encode, tok.eot_id, context=8, stride=9)


class CacheLM(LanguageModel):
    """A unigram mixed with the frequencies of the tokens seen so far (Kuhn & De Mori's cache):
    a model that gains from every extra token of context, as a trained LM does."""

    def __init__(self, unigram: torch.Tensor, weight: float = 0.3):
        self.vocab_size, self.unigram, self.weight = len(unigram), unigram, weight

    def next_token_logprobs(self, tokens):
        seen = torch.nn.functional.one_hot(tokens, self.vocab_size).double().cumsum(1)
        seen /= torch.arange(1, tokens.shape[1] + 1, dtype=torch.float64)[:, None]
        return ((1 - self.weight) * self.unigram + self.weight * seen).log()

    def start(self, prompt):  # pragma: no cover - not used here
        raise NotImplementedError

    def step(self, state, tokens):  # pragma: no cover
        raise NotImplementedError


def test_a_smaller_stride_gives_more_context_and_a_lower_perplexity_on_real_text(shared):
    from collections import Counter

    from lmstack.evaluation.perplexity import stream_perplexity
    from lmstack.tokenizers.char import CharTokenizer

    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    train, test = text[:50000], text[50000:55000]
    tok = CharTokenizer.train([train], special_tokens=("<|endoftext|>",))
    counts = Counter(tok.encode(train))
    unigram = torch.tensor([counts.get(i, 0) + 1.0 for i in range(tok.vocab_size)], dtype=torch.float64)
    model = CacheLM(unigram / unigram.sum())
    ppl = [stream_perplexity(model, [test], tok.encode, tok.eot_id, context=64, stride=s).perplexity for s in (64, 16, 4)]
    assert ppl[0] > ppl[1] > ppl[2]


def test_t5_decoder_scores_each_line_as_hf_t5_does_from_an_empty_source(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmstack.evaluation.perplexity import measure
    from lmstack.models.t5 import from_hf_t5
    from lmstack.tokenizers.char import CharTokenizer

    text = "the cat sat\n\nsat the cat on\n"
    tok = CharTokenizer.train([text])
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=tok.vocab_size,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    model, _ = from_hf_t5(tmp_path)
    res = measure(model, tok, [text])
    total, tokens = 0.0, 0
    with torch.no_grad():
        for line in text.splitlines():
            labels = torch.tensor([tok.encode(line) + [1]])
            lp = hf(input_ids=torch.tensor([[1]]), labels=labels).logits.double().log_softmax(-1)
            total += float(lp.gather(-1, labels[..., None]).sum())
            tokens += labels.shape[1]
    assert res.mode == "lines" and res.tokens == tokens
    assert res.nats == pytest.approx(-total, rel=1e-4)
    assert res.bits_per_byte == pytest.approx(-total / math.log(2) / len(text), rel=1e-4)


def test_unknown_words_pay_for_their_spelling_in_bits_per_byte():
    model = NGramLM.train_texts(["the cat sat", "the dog sat", "a cat ran", "the cat ran"] * 3, order=2, discount_fallback=True)
    closed = perplexity(model, ["a bird sat\n"], model.encode, model.bos_id, model.eos_id, model.unk_id)
    spelled = perplexity(model, ["a bird sat\n"], **text_codec(model, None))
    # the speller by hand: word types the cat sat dog a ran -> 16 characters, 11 distinct (+1 end mark),
    # total 16 + 6 ends + 12 = 34; "bird" = b, i unseen (escape 12/34, then one byte of 256), r, d once, end 6/34
    bird = math.log10((12 / 34 / 256) ** 2 * (1 / 34) ** 2 * (6 / 34))
    assert spelled.log10_prob_spelling == pytest.approx(bird)
    assert spelled.perplexity == closed.perplexity  # KenLM's figure is unchanged
    assert spelled.bits_per_byte == pytest.approx(-(closed.log10_prob + bird) * math.log2(10) / len("a bird sat\n"))
    assert spelled.bits_per_byte > closed.bits_per_byte


def test_bits_per_byte_counts_the_newlines_the_text_has():
    """A last line without a newline is still scored (with its </s>), but it adds no byte."""
    ended, open_ended = "ab c\n\ndefg\n", "ab c\n\ndefg"
    assert split_lines(ended) == split_lines(open_ended) == ["ab c", "", "defg"]
    assert split_lines(ended, keepends=True) == ["ab c\n", "\n", "defg\n"]
    assert split_lines(open_ended, keepends=True) == ["ab c\n", "\n", "defg"]
    for text in (ended, open_ended, "", "\n", "春風\n明月"):
        res = perplexity(Uniform(10), split_lines(text, keepends=True), _encode, bos=1, eos=2, unk=0)
        assert res.bytes == len(text.encode("utf-8"))
    a, b = (perplexity(Uniform(10), split_lines(t, keepends=True), _encode, bos=1, eos=2, unk=0) for t in (ended, open_ended))
    assert a.tokens == b.tokens and a.nats == pytest.approx(b.nats) and b.bits_per_byte > a.bits_per_byte

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmstack.errors import FormatError
from lmstack.tokenizers import EOT, load_tokenizer
from lmstack.tokenizers.bpe import BPETokenizer
from lmstack.tokenizers.gpt2 import load_gpt2
from lmstack.tokenizers.hf import load_hf, save_hf


@pytest.fixture(scope="module")
def sample(shared):
    data = shared / "data"
    return [
        data.joinpath("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000],
        data.joinpath("zh_tang_poems.txt").read_text(encoding="utf-8")[:100_000],
    ]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def exported(request, sample, tmp_path_factory):
    tok = BPETokenizer.train(sample, 1500, special_tokens=(EOT, "<|pad|>"), pattern=request.param)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    save_hf(tok, path)
    return tok, Tokenizer.from_file(str(path))


def test_export_gives_the_same_ids_in_huggingface(exported, sample):
    tok, hf = exported
    for text in sample:
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids
        assert hf.decode(ids) == text
    assert hf.get_vocab_size() == tok.vocab_size


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.text(), st.sampled_from(["世界", "😀", "e\u0301", "  \n\n ", "'re", EOT, "\t"])), max_size=10).map(
        "".join
    )
)
def test_export_agrees_on_any_string(exported, s):
    tok, hf = exported
    # Hugging Face always splits out added tokens, so compare with specials allowed.
    assert hf.encode(s).ids == tok.encode(s, allowed_special="all")


def test_import_of_a_huggingface_trained_tokenizer_keeps_its_ids(tmp_path, sample):
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        sample,
        trainers.BpeTrainer(
            vocab_size=1200, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_hf(tmp_path / "tokenizer.json")
    assert tok.special_tokens == {EOT: 0}  # Hugging Face puts specials first
    for text in sample:
        assert tok.encode(text) == hf.encode(text).ids
    tok.save(tmp_path / "lmstack")  # and it survives lmstack's own format
    assert load_tokenizer(tmp_path / "lmstack").encode(sample[1]) == hf.encode(sample[1]).ids
    save_hf(tok, tmp_path / "again.json")  # and exporting it back keeps the special's id
    again = Tokenizer.from_file(str(tmp_path / "again.json"))
    text = sample[0][:2000] + EOT + sample[1][:2000]
    assert again.encode(text).ids == hf.encode(text).ids


def test_gpt2_exports_to_huggingface_with_gpt2_ids(shared, tmp_path):
    d = shared / "fixtures" / "gpt2"
    gpt2 = load_gpt2(d / "encoder.json", d / "vocab.bpe")
    save_hf(gpt2, tmp_path / "tokenizer.json")
    again = load_hf(tmp_path / "tokenizer.json")
    text = shared.joinpath("data", "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == gpt2.encode(text)
    assert again.encode(text) == gpt2.encode(text) and again.special_tokens == gpt2.special_tokens


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["model"].update(type="WordPiece"), "not BPE"),
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "not byte-level"),
        (lambda d: d["model"]["merges"].append(["zz", "q"]), "KeyError"),
    ],
)
def test_unusable_files_are_one_clear_error(exported, tmp_path, edit, match):
    tok, _ = exported
    path = tmp_path / "tokenizer.json"
    save_hf(tok, path)
    d = json.loads(path.read_text(encoding="utf-8"))
    edit(d)
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(FormatError, match=match):
        load_hf(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(FormatError, match="corrupt"):
        load_hf(path)

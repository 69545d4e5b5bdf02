"""The "hf" tokenizer kind against Hugging Face itself: tiny T5-, BERT- and Llama-2-style
tokenizers trained here with `tokenizers`, then imported checkpoints used through the CLI."""

import json
import sys

import pytest
import torch

from lmstack.errors import InputError
from lmstack.tokenizers import load_tokenizer
from lmstack.tokenizers.hf_wrapped import HFTokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

BYTES = [f"<0x{b:02X}>" for b in range(256)]


@pytest.fixture(scope="module")
def corpus(shared):
    """(training text, held-out test lines): a few KB of Tiny Shakespeare and Tang poems."""
    en = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    zh = (shared / "data" / "zh_tang_poems.txt").read_text(encoding="utf-8")
    train = en[:8000].splitlines() + zh[:1500].splitlines()
    test = [s for s in en[50_000:52_000].splitlines() if s] + [s for s in zh[20_000:21_000].splitlines() if s]
    return train, test


def t5_like(train):
    """SentencePiece Unigram as T5 has it: NFKC, Metaspace, specials <pad> </s> <unk> first, and a
    post-processor that appends </s>."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        train,
        trainers.UnigramTrainer(
            vocab_size=1000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def bert_like(train):
    """WordPiece as BERT has it: BertNormalizer (lower-cased, accents stripped), BertPreTokenizer,
    and a post-processor that wraps a sentence in [CLS] ... [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(train, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return tok, {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}


def llama2_like(train):
    """BPE with byte fallback as Llama 2 has it: <unk> <s> </s>, then the 256 <0xNN> byte tokens,
    spaces as ▁ with one prepended, no pre-tokenizer, and <s> put first by the post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # only for training: merges stay inside words
    tok.train_from_iterator(
        train, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>", *BYTES], show_progress=False)
    )
    d = json.loads(tok.to_str())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] not in BYTES]  # bytes are ordinary pieces
    tok = Tokenizer.from_str(json.dumps(d))
    tok.pre_tokenizer = pre_tokenizers.Sequence([])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


STYLES = {"t5": (t5_like, "</s>"), "bert": (bert_like, "[SEP]"), "llama2": (llama2_like, "</s>")}


def save_hf_dir(hf, roles, path):
    """What `save_pretrained` writes for such a tokenizer: tokenizer.json + tokenizer_config.json.
    transformers 5 rewrites the post-processor on save, so the file is then the tokenizer's own,
    as real T5 / BERT / Llama 2 files are (with their post-processor)."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **roles).save_pretrained(path)
    hf.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module", params=list(STYLES))
def style(request, corpus, tmp_path_factory):
    """(name, HF tokenizer, lmstack's import of its directory, the end-of-text token)."""
    build, eot = STYLES[request.param]
    hf, roles = build(corpus[0])
    ours = HFTokenizer.from_dir(save_hf_dir(hf, roles, tmp_path_factory.mktemp(request.param)))
    return request.param, hf, ours, eot


def test_ids_are_huggingface_ids_without_its_added_specials(style, corpus):
    _, hf, ours, _ = style
    for line in corpus[1]:
        assert ours.encode(line) == hf.encode(line, add_special_tokens=False).ids, line
        assert hf.encode(line).ids != hf.encode(line, add_special_tokens=False).ids  # its post-processor adds some


def test_decode_is_huggingface_decode(style, corpus):
    name, hf, ours, _ = style
    for line in corpus[1]:
        ids = hf.encode(line, add_special_tokens=False).ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any ids, specials and lone <0xNN> bytes included
        ids = torch.randint(0, hf.get_vocab_size(), (12,), generator=g).tolist()
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    with pytest.raises(InputError, match="out of range"):
        ours.decode([hf.get_vocab_size()])
    if name == "llama2":  # byte fallback: text the vocabulary lacks still comes back
        s = "Café 東京 😀"
        assert ours.decode(ours.encode(s)) == s


def test_special_tokens_have_huggingface_ids(style):
    name, hf, ours, eot = style
    added = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    assert ours.special_tokens == added and ours.vocab_size == hf.get_vocab_size()
    assert ours.eot_id == hf.token_to_id(eot)
    text = f"Hark! {eot}What news? {eot}"
    assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids
    assert ours.id_to_piece(ours.eot_id) == eot
    if name != "t5":  # (a Unigram vocabulary holds its specials as pieces, which text can spell)
        assert ours.eot_id not in ours.encode(text)


def test_save_and_load_keep_ids_and_roles(style, corpus, tmp_path):
    _, hf, ours, _ = style
    path = ours.save(tmp_path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["kind"] == "hf" and isinstance(saved["hf"], dict)  # the HF file embedded as an object
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer)
    assert again.special_tokens == ours.special_tokens and again.eot_id == ours.eot_id and again.roles == ours.roles
    text = "\n".join(corpus[1])
    assert again.encode(text) == ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_end_of_text_falls_back_to_config_eos_token_id(corpus, tmp_path):
    hf, _ = t5_like(corpus[0])
    save_hf_dir(hf, {"pad_token": "<pad>"}, tmp_path)
    assert HFTokenizer.from_dir(tmp_path).eot_id is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "eos_token_id": 1}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.eot_id == 1 and tok.roles["eos_token"] == "</s>"


def test_ids_past_the_file_are_the_models_padding(corpus, tmp_path):
    """T5 has more embedding rows than tokens (32128 for 32100): those ids have no text, as in HF."""
    hf, roles = t5_like(corpus[0])
    n = hf.get_vocab_size()
    tok = HFTokenizer(json.loads(hf.to_str()), roles, vocab_size=n + 28)
    tok.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("Hark, what news?")
    assert tok.vocab_size == n + 28
    assert tok.decode(ids + [n + 3]) == hf.decode(ids + [n + 3], skip_special_tokens=False) == tok.decode(ids)
    assert tok.id_to_piece(n + 3) == f"<unused {n + 3}>"
    with pytest.raises(InputError, match="out of range"):
        tok.decode([n + 28])


def test_added_specials_reach_the_engine(corpus):
    hf, roles = bert_like(corpus[0])
    tok = HFTokenizer(json.loads(hf.to_str()), roles)
    n = tok.vocab_size
    tok.add_special_tokens(["<|user|>", "[MASK]"])
    assert tok.special_tokens["<|user|>"] == n and tok.special_tokens["[MASK]"] == hf.token_to_id("[MASK]")
    ids = tok.encode("<|user|> hello", allowed_special="all")
    assert ids[0] == n and tok.decode(ids).startswith("<|user|>")


def test_without_tokenizers_the_error_names_the_extra(style, tmp_path, monkeypatch):
    from lmstack.models.hf import hf_tokenizer

    _, hf, ours, _ = style
    ours.save(tmp_path)
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(InputError, match=r"pip install 'lmstack\[hf\]'"):
        load_tokenizer(tmp_path)
    assert hf_tokenizer(tmp_path / "hf", 10_000) is None  # an import is then weights only


def test_it_is_imported_not_trained(corpus):
    with pytest.raises(InputError, match="not trained"):
        HFTokenizer.train(corpus[0], 100)


# --- imported checkpoints through the CLI ---------------------------------------------------


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_t5_converts_with_its_tokenizer_and_scores_as_transformers(corpus, tmp_path, lmstack_cli, monkeypatch):
    hf_tok, roles = t5_like(corpus[0])
    cfg = transformers.T5Config(
        vocab_size=hf_tok.get_vocab_size() + 8,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    ref = _randomized(transformers.T5ForConditionalGeneration(cfg))
    ref.save_pretrained(tmp_path / "hf")
    save_hf_dir(hf_tok, roles, tmp_path / "hf")

    out = lmstack_cli("convert", tmp_path / "hf", tmp_path / "ours")
    assert "weights only" not in out
    prompt, continuation = "translate: Before we proceed", "hear me speak."
    got = json.loads(
        lmstack_cli(
            "score",
            "--model",
            tmp_path / "ours",
            "--prompt",
            prompt,
            "--continuation",
            continuation,
            "--top",
            cfg.vocab_size,
            "--json",
        )
    )  # padding ids among the alternatives
    src = torch.tensor([hf_tok.encode(prompt).ids])  # the source as T5 reads it, ending with </s>
    assert src[0, -1] == hf_tok.token_to_id("</s>")
    labels = torch.tensor([hf_tok.encode(continuation, add_special_tokens=False).ids])
    with torch.no_grad():
        lp = ref(input_ids=src, labels=labels).logits.log_softmax(-1)[0].gather(-1, labels[0, :, None])[:, 0]
    assert [t["token"] for t in got["tokens"]] == labels[0].tolist()
    assert abs(got["logprob"] - lp.sum().item()) <= 1e-4

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # without the library: weights only, and says why
    out = lmstack_cli("convert", tmp_path / "hf", tmp_path / "weights-only")
    assert "weights only" in out and "pip install 'lmstack[hf]'" in out
    assert not (tmp_path / "weights-only" / "tokenizer.json").exists()


def test_bert_converts_with_its_tokenizer_and_pseudo_perplexity_is_transformers(corpus, tmp_path, lmstack_cli):
    hf_tok, roles = bert_like(corpus[0])
    cfg = transformers.BertConfig(
        vocab_size=hf_tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    ref = _randomized(transformers.BertForMaskedLM(cfg))
    ref.save_pretrained(tmp_path / "hf")
    save_hf_dir(hf_tok, roles, tmp_path / "hf")
    lmstack_cli("convert", tmp_path / "hf", tmp_path / "ours")
    lines = corpus[1][:2]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = json.loads(lmstack_cli("eval", "perplexity", "--model", tmp_path / "ours", tmp_path / "text.txt", "--json"))

    pll, tokens = 0.0, 0
    for line in lines:  # Salazar et al.: mask each token of [CLS] line [SEP] in turn
        ids = hf_tok.encode(line).ids  # the post-processor's [CLS] ... [SEP]
        n = len(ids) - 2
        copies = torch.tensor([ids] * n)
        copies[torch.arange(n), torch.arange(1, n + 1)] = hf_tok.token_to_id("[MASK]")
        with torch.no_grad():
            lp = ref(input_ids=copies).logits.log_softmax(-1)
        pll += sum(lp[i, i + 1, ids[i + 1]].item() for i in range(n))
        tokens += n
    assert got["mode"] == "pseudo" and got["tokens"] == tokens
    assert abs(got["log10_prob"] * 2.302585092994046 - pll) <= 1e-3


def test_llama2_converts_both_ways_with_its_tokenizer_and_decodes_greedily_as_transformers(corpus, tmp_path, lmstack_cli):
    hf_tok, roles = llama2_like(corpus[0])
    cfg = transformers.LlamaConfig(
        vocab_size=hf_tok.get_vocab_size(),
        max_position_embeddings=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    ref = _randomized(transformers.LlamaForCausalLM(cfg))
    ref.save_pretrained(tmp_path / "hf")
    save_hf_dir(hf_tok, roles, tmp_path / "hf")
    lmstack_cli("convert", tmp_path / "hf", tmp_path / "ours")
    prompt = "First Citizen: 東京"
    got = json.loads(
        lmstack_cli(
            "generate",
            "--model",
            tmp_path / "ours",
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--ignore-eot",
            "--json",
        )
    )
    ids = torch.tensor([hf_tok.encode(prompt).ids])  # the prompt as Llama 2 reads it, after <s>
    assert ids[0, 0] == hf_tok.token_to_id("<s>")
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0)[
            0, ids.shape[1] :
        ].tolist()
    assert got["tokens"] == want
    reference = hf_tok.decode(want, skip_special_tokens=False)
    # HF's byte fallback turns a whole run of <0x..> tokens into U+FFFD when any byte of it is
    # invalid, valid ones included; a stream has already printed those, so only clean text compares.
    if "\ufffd" not in reference:
        assert got["text"] == reference

    lmstack_cli("convert", tmp_path / "ours", tmp_path / "hf2", "--to", "hf")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    text = "\n".join(corpus[1])
    assert back.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False).ids
    assert (back.bos_token, back.eos_token) == ("<s>", "</s>")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf2")
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_tokenizer_import_keeps_any_tokenizer_json(style, corpus, tmp_path, lmstack_cli):
    """`lmstack tokenizer import` of a model folder: byte-level BPE would become lmstack's own BPE;
    these tokenizers are kept as they are, with HF's ids and end of text."""
    from lmstack.tokenizers import load_tokenizer

    build, eot = STYLES[style[0]]
    hf, roles = build(corpus[0])
    folder = save_hf_dir(hf, roles, tmp_path / "hf")
    out = lmstack_cli("tokenizer", "import", folder, "--out", tmp_path / "ours")
    assert out.startswith("imported hf tokenizer")
    ours = load_tokenizer(tmp_path / "ours")
    assert ours.eot_id == hf.token_to_id(eot)
    for line in corpus[1]:
        assert ours.encode(line) == hf.encode(line, add_special_tokens=False).ids

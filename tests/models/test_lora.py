"""LoRA adapters against `peft` itself: tiny random models built locally (nothing downloaded),
adapters made on one side with random non-zero B, loaded on the other, compared logit for logit."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import CheckpointError, InputError
from lmstack.models import checkpoint, lora
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.hf import to_hf
from lmstack.models.rnn import RNNLM, RNNConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

TOL = 1e-5
V = 64
LLAMA = dict(n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False)
STYLES = {  # lmstack GPT settings, the PEFT target names of its `transformers` twin
    "llama-gqa": (LLAMA, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": ({}, ["c_attn", "c_proj", "c_fc"]),
}
X = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def _randomise(model, std=0.1, seed=0):
    """Non-zero adapters (B starts at zero, which would hide a wrong B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def _gpt(tmp_path, style):
    """An lmstack base checkpoint and its export, as (model, base dir, HF dir)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, **STYLES[style][0])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms and biases away from 1 and 0
    model.save(tmp_path / "base")
    to_hf(model, tmp_path / "hf")
    return model, tmp_path / "base", tmp_path / "hf"


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _peft_load(hf_model, adapter_dir):
    """PeftModel.from_pretrained, failing on any missing or unexpected adapter key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected key" in str(w.message).lower()]
    assert not bad, bad
    return model


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_peft_adapter_loads_into_lmstack(tmp_path, style, rslora):
    base, _, hf_dir = _gpt(tmp_path, style)
    ref = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=STYLES[style][1], use_rslora=rslora))
    _randomise(ref).save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = ref(X).logits
        assert (want - base(X)).abs().max() > 1e-2  # the adapter does change the model
    ours = GPT.load(tmp_path / "base")
    cfg = lora.load_adapter(ours, tmp_path / "adapter")
    assert cfg.rslora == rslora and cfg.r == 4
    first = next(iter(lora.lora_modules(ours).values()))
    assert first.scaling == pytest.approx(8 / 2 if rslora else 8 / 4)
    with torch.no_grad():
        assert (ours(X) - want).abs().max() <= TOL
    # The adapter names PEFT's base (the HF directory): lmstack.load imports it and attaches.
    loaded, _ = checkpoint.load(tmp_path / "adapter")
    with torch.no_grad():
        assert (loaded(X) - want).abs().max() <= TOL


@pytest.mark.parametrize("style", STYLES)
def test_lmstack_adapter_loads_into_peft(tmp_path, style):
    model, base_dir, hf_dir = _gpt(tmp_path, style)
    wrapped = lora.attach(model, lora.LoraConfig(r=4, alpha=8, rslora=True))
    assert "blocks.1.attn.k" in wrapped and "blocks.0.mlp.down" in wrapped
    _randomise(model)
    lora.save_adapter(model, tmp_path / "adapter", base_dir)
    ref = _peft_load(_hf(hf_dir), tmp_path / "adapter")
    # rsLoRA's alpha / sqrt(r) everywhere, GPT-2's rank-12 c_attn too (its alpha_pattern keeps the scale).
    scales = [m.scaling["default"] for m in ref.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert scales == pytest.approx([8 / 4**0.5] * len(scales)) and len(scales) == (14 if style == "llama-gqa" else 8)
    with torch.no_grad():
        want = ref(X).logits
        assert (model(X) - want).abs().max() <= TOL
    # And back: lmstack reads its own file (GPT-2's fused c_attn split again into rank-4 q, k, v).
    again, _ = checkpoint.load(tmp_path / "adapter")
    assert {m.lora_A.shape[0] for m in lora.lora_modules(again).values()} == {4}
    with torch.no_grad():
        assert (again(X) - want).abs().max() <= TOL


def test_merge_unmerge_and_kv_cache(tmp_path):
    model, _, _ = _gpt(tmp_path, "llama-gqa")
    base_logits = model(X).detach()
    lora.attach(model, lora.LoraConfig(r=4, alpha=8))
    _randomise(model)
    with torch.no_grad():
        adapted = model(X)
        lora.merge(model)
        merged = model(X)
        lora.unmerge(model)
        assert (merged - adapted).abs().max() <= TOL
        assert (model(X) - adapted).abs().max() <= TOL
        assert (adapted - base_logits).abs().max() > 1e-2
        # Incremental decoding goes through the adapters too.
        state, lp = model.start(X[:, :4])
        steps = [lp]
        for t in range(4, X.shape[1]):
            state, lp = model.step(state, X[:, t])
            steps.append(lp)
        want = torch.log_softmax(adapted[:, 3:], -1)
        assert (torch.stack(steps, 1) - want).abs().max() <= 1e-4
        plain = lora.merge_and_unload(model)
        assert not lora.lora_modules(plain) and (plain(X) - adapted).abs().max() <= TOL


def test_only_adapters_train(tmp_path):
    model, _, _ = _gpt(tmp_path, "llama-gqa")
    lora.attach(model, lora.LoraConfig(r=2, modules_to_save=("embeddings",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n} | {"wte.weight", "lm_head.weight"}
    opt = torch.optim.AdamW(lora.adapter_parameters(model))
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    # A state dict still reads the base weights under their own names.
    assert "blocks.0.attn.q.weight" in model.state_dict() and "blocks.0.attn.q.lora_A" in model.state_dict()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_layer_gradients_equal_autograds_through_the_plain_expression(dropout):
    """The adapter layer's hand-written backward against autograd through y = x Wᵀ + b + s·B A x'
    (same dropout mask: same seed), for every input, a trainable base weight and bias included."""
    torch.manual_seed(0)
    layer = lora.LoraLinear(torch.nn.Linear(6, 5).double(), r=3, scaling=1.5, dropout=dropout).train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    params = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    torch.manual_seed(1)
    got = torch.autograd.grad(layer(x).square().sum(), params)
    torch.manual_seed(1)
    xd = layer.lora_dropout(x)
    plain = F.linear(x, layer.weight, layer.bias) + 1.5 * F.linear(F.linear(xd, layer.lora_A), layer.lora_B)
    for g, w in zip(got, torch.autograd.grad(plain.square().sum(), params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_layers_reading_one_input_run_jointly_as_they_would_apart():
    """q, k, v (or gate and up) computed together, one low-rank product for all, give each
    layer's own output and every gradient, ranks and biases differing."""
    torch.manual_seed(0)
    layers = [
        lora.LoraLinear(torch.nn.Linear(6, out, bias=out != 4).double(), r=r, scaling=s, dropout=0.0)
        for out, r, s in ((5, 2, 1.5), (4, 3, 0.5))
    ]
    for m in layers:
        torch.nn.init.normal_(m.lora_B)
        m.weight.requires_grad_(False)
    x = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    params = (x, *(p for m in layers for p in m.parameters() if p.requires_grad))
    joint = layers[0].joint(x, tuple(layers))
    apart = [m(x) for m in layers]

    def loss(ys):
        return sum((y * (k + 1)).square().sum() for k, y in enumerate(ys))

    for g, w in zip(torch.autograd.grad(loss(joint), params), torch.autograd.grad(loss(apart), params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(joint, tuple(apart), rtol=1e-12, atol=1e-12)


def test_training_gradients_equal_pefts(tmp_path):
    """One loss, backward on both sides: every adapter matrix gets PEFT's gradient."""
    model, base_dir, hf_dir = _gpt(tmp_path, "llama-gqa")
    lora.attach(model, lora.LoraConfig(r=4, alpha=8))
    _randomise(model)
    lora.save_adapter(model, tmp_path / "adapter", base_dir)
    ref = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter", is_trainable=True).train()
    model.train()
    F.cross_entropy(model(X)[:, :-1].flatten(0, 1), X[:, 1:].flatten()).backward()
    ref(X, labels=X).loss.backward()  # transformers shifts the labels itself
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    names |= {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for path, m in lora.lora_modules(model).items():
        _, layer, _, where = path.split(".")
        theirs = ref.get_submodule(f"base_model.model.model.layers.{layer}.{names[where]}")
        assert m.lora_A.grad.abs().max() > 0 and m.lora_B.grad.abs().max() > 0
        torch.testing.assert_close(m.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_dropout_acts_on_the_adapter_input_in_train_mode(tmp_path):
    model, _, _ = _gpt(tmp_path, "llama-gqa")
    lora.attach(model, lora.LoraConfig(r=4, dropout=0.5, targets=("attn",)))
    with torch.no_grad():
        model.eval()
        before = model(X)
        model.train()
        assert (model(X) - before).abs().max() == 0  # B = 0: dropout on the adapter input changes nothing
        _randomise(model)
        model.eval()
        a, b = model(X), model(X)
        model.train()
        c, d = model(X), model(X)
    assert (a - b).abs().max() == 0 and (c - d).abs().max() > 1e-3


def test_modules_to_save_round_trip_with_peft(tmp_path):
    _, base_dir, hf_dir = _gpt(tmp_path, "llama-gqa")
    ref = peft.get_peft_model(
        _hf(hf_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    _randomise(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "peft")
    ours = GPT.load(base_dir)
    cfg = lora.load_adapter(ours, tmp_path / "peft")
    assert cfg.modules_to_save == ("lm_head", "wte")
    with torch.no_grad():
        want = ref(X).logits
        assert (ours(X) - want).abs().max() <= TOL
    lora.save_adapter(ours, tmp_path / "ours", base_dir)
    back = _peft_load(_hf(hf_dir), tmp_path / "ours")
    with torch.no_grad():
        assert (back(X).logits - want).abs().max() <= TOL


def _hf_bert(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32
    )
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _hf_t5(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_bert_adapters_match_peft(tmp_path):
    from lmstack.models.bert import from_hf_bert

    hf_dir = _hf_bert(tmp_path)
    model, _ = from_hf_bert(hf_dir)
    model.save(tmp_path / "base")
    wrapped = lora.attach(model, lora.LoraConfig(r=4, alpha=8))
    assert wrapped[:2] == ["layers.0.qkv", "layers.0.attn_out"]
    _randomise(model)
    lora.save_adapter(model, tmp_path / "ours", tmp_path / "base")
    ref = _peft_load(transformers.BertForMaskedLM.from_pretrained(hf_dir).eval(), tmp_path / "ours")
    with torch.no_grad():
        want = ref(X).logits
        assert (model(X) - want).abs().max() <= TOL
    # PEFT's own adapter on query, key, value (independent A's) loads into the fused qkv.
    theirs = peft.get_peft_model(
        transformers.BertForMaskedLM.from_pretrained(hf_dir).eval(),
        peft.LoraConfig(r=2, target_modules=["query", "key", "value", "dense"]),
    )
    _randomise(theirs, seed=3).save_pretrained(tmp_path / "peft")
    fresh, _ = from_hf_bert(hf_dir)
    lora.load_adapter(fresh, tmp_path / "peft")
    assert lora.lora_modules(fresh)["layers.0.qkv"].lora_A.shape == (6, 32)
    with torch.no_grad():
        assert (fresh(X) - theirs(X).logits).abs().max() <= TOL


def test_t5_adapters_match_peft(tmp_path):
    from lmstack.models.t5 import from_hf_t5

    hf_dir = _hf_t5(tmp_path)
    model, _ = from_hf_t5(hf_dir)
    model.save(tmp_path / "base")
    lora.attach(model, lora.LoraConfig(r=4, alpha=8))
    assert "decoder.1.cross_attn.o" in lora.lora_modules(model) and "encoder.0.ff.wi_1" in lora.lora_modules(model)
    _randomise(model)
    lora.save_adapter(model, tmp_path / "ours", tmp_path / "base")
    ref = _peft_load(transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval(), tmp_path / "ours")
    src, tgt = X[:, :8].contiguous(), X[:, 8:].contiguous()
    with torch.no_grad():
        want = ref(input_ids=src, labels=tgt).logits
        assert (model(src, tgt)[0] - want).abs().max() <= TOL
        # Decoding state: encoder and cached decoder both see the adapters.
        state, lp = model.start(src)
        assert (lp - want[:, 0].log_softmax(-1)).abs().max() <= 1e-4


def test_rnn_output_adapter_in_decoding():
    torch.manual_seed(0)
    model = RNNLM(RNNConfig(vocab_size=V, d_embed=16, d_hidden=16, n_layers=1)).eval()
    with pytest.raises(InputError, match="no 'attn' group"):
        lora.attach(model, lora.LoraConfig())
    assert lora.attach(model, lora.LoraConfig(r=2, targets=("output",))) == ["out"]
    _randomise(model)
    with torch.no_grad():
        full = model.next_token_logprobs(X)
        state, lp = model.start(X[:, :5])
        state, lp2 = model.step(state, X[:, 5])
    assert (lp - full[:, 4]).abs().max() <= 1e-5 and (lp2 - full[:, 5]).abs().max() <= 1e-5


def test_errors(tmp_path):
    model, base_dir, _ = _gpt(tmp_path / "a", "llama-gqa")
    with pytest.raises(InputError, match=r"matches no module.*blocks\.0\.attn\.q"):
        lora.attach(model, lora.LoraConfig(targets=("*.attn.qkv",)))
    with pytest.raises(InputError, match="rank r must be a positive integer"):
        lora.LoraConfig(r=0)
    lora.attach(model, lora.LoraConfig(r=2, targets=("attn",)))
    with pytest.raises(InputError, match="already has LoRA adapters"):
        lora.attach(model, lora.LoraConfig())
    lora.save_adapter(model, tmp_path / "adapter", base_dir)
    other = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=48, **LLAMA))
    with pytest.raises(CheckpointError, match="this adapter was made for"):
        lora.load_adapter(other, tmp_path / "adapter")
    weights = tmp_path / "adapter" / lora.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt adapter weights"):
        checkpoint.load(tmp_path / "adapter")
    (tmp_path / "adapter" / lora.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt adapter config"):
        checkpoint.load(tmp_path / "adapter")


def test_grown_vocabulary_round_trip_and_resume(tmp_path):
    from lmstack.models.base import grow_vocab

    base, base_dir, _ = _gpt(tmp_path, "llama-gqa")
    cfg = lora.LoraConfig(r=2, targets=("attn",), modules_to_save=("embeddings",))
    model = grow_vocab(base, V + 3)  # three new special tokens
    lora.attach(model, cfg)
    _randomise(model)
    with torch.no_grad():
        model.wte.weight[V:] += torch.randn(3, 32)
    lora.save_adapter(model, tmp_path / "adapter", base_dir)
    ids = torch.tensor([[1, V, V + 2, 5]])
    loaded, _ = checkpoint.load(tmp_path / "adapter")  # the base has V ids; the adapter grows it
    assert loaded.vocab_size == loaded.config.vocab_size == V + 3
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max() <= TOL
    # Resuming: a freshly grown, freshly attached model takes the saved adapter weights.
    resumed = grow_vocab(GPT.load(base_dir), V + 3)
    lora.attach(resumed, cfg)
    lora.load_adapter_weights(resumed, tmp_path / "adapter")
    with torch.no_grad():
        assert (resumed(ids) - model(ids)).abs().max() <= TOL
    other = grow_vocab(GPT.load(base_dir), V + 3)
    lora.attach(other, lora.LoraConfig(r=4, targets=("attn",), modules_to_save=("embeddings",)))
    with pytest.raises(CheckpointError, match="not the ones attached"):
        lora.load_adapter_weights(other, tmp_path / "adapter")

"""Hugging Face interop: import GPT-2 and Llama checkpoints into lmstack's GPT (BERT into the
encoder, via `models.bert`), and export a GPT back to a directory `transformers` loads.

A Hugging Face directory is read as files (`config.json` + safetensors, single or sharded), so
importing needs neither `transformers` nor a network. Both directions go through one table per
architecture of (lmstack name, HF name, transposed?) triples; GPT-2's fused `c_attn` is split
into q/k/v before renaming (and fused again after, on export), and its `Conv1D` weights are
stored [in, out], hence the transposes.

Weights are loaded as float32 whatever the HF dtype (an exact upcast). Only configurations that
compute the same function are accepted; anything else (RoPE scaling, another activation, ...)
is a clear error rather than a silently different model.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from lmstack.errors import CheckpointError
from lmstack.io import atomic_path, read_json, write_json
from lmstack.models.checkpoint import assign_weights
from lmstack.models.gpt import GPT, LLAMA3_SCALING, GPTConfig
from lmstack.models.hf_dir import read_hf_dir
from lmstack.tokenizers.base import EOT

# HF buffers that older checkpoints saved but that are recomputed, not learned.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def hf_model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` of a Hugging Face model directory, None for anything else."""
    p = Path(path) / "config.json"
    return read_json(p, "Hugging Face config").get("model_type") if p.is_file() else None


# --- architectures: config translation and name tables -----------------------------------


def _require(ok: bool, source: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{source}: {what} is not supported by lmstack's GPT; the model would compute a different function")


def _gpt2_config(hf: dict, source: Path) -> GPTConfig:
    _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), source,
             f"activation_function {hf.get('activation_function')!r} (only the tanh GELU, gelu_new)")
    _require(hf.get("scale_attn_weights", True), source, "scale_attn_weights=false")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False), source, "scale_attn_by_inverse_layer_idx=true")
    n_embd = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=n_embd, mlp_hidden=hf.get("n_inner") or 4 * n_embd, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=hf.get("resid_pdrop", 0.0), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_config(hf: dict, source: Path) -> GPTConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5 / older
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in ("default", "llama3"), source, f"RoPE scaling {rope_type!r} (only Llama 3's)")
    _require(hf.get("hidden_act", "silu") == "silu", source, f"hidden_act {hf.get('hidden_act')!r} (only silu)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    _require(hf.get("head_dim") in (None, n_embd // n_head), source, f"head_dim {hf.get('head_dim')} != hidden_size / heads")
    bias = hf.get("attention_bias", False)
    _require(hf.get("mlp_bias", False) == bias, source, "attention_bias != mlp_bias")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope",
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), mlp="swiglu", bias=bias,
        rope_scaling={k: rope[k] for k in LLAMA3_SCALING} if rope_type == "llama3" else None,
        dropout=hf.get("attention_dropout", 0.0), tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _gpt2_names(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False)]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            names += [(f"{ours}{a}.{w}", f"{theirs}{b}.{w}", False) for w in ("weight", "bias")]
        for a, b in (("attn.q", "attn.c_attn.q"), ("attn.k", "attn.c_attn.k"), ("attn.v", "attn.c_attn.v"),
                     ("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            names += [(f"{ours}{a}.weight", f"{theirs}{b}.weight", True), (f"{ours}{a}.bias", f"{theirs}{b}.bias", False)]
    names += [("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _llama_names(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    names = [("wte.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names += [(f"{ours}norm1.weight", f"{theirs}input_layernorm.weight", False),
                  (f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight", False)]
        for a, b in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                     ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                     ("mlp.down", "mlp.down_proj")):
            names.append((f"{ours}{a}.weight", f"{theirs}{b}.weight", False))
            if cfg.bias:
                names.append((f"{ours}{a}.bias", f"{theirs}{b}.bias", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _split_c_attn(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """GPT-2 fuses q, k, v in one [n_embd, 3·n_embd] Conv1D; name its three slices separately."""
    for name in [k for k in tensors if k.endswith(".attn.c_attn.weight") or k.endswith(".attn.c_attn.bias")]:
        base, kind = name.rsplit(".", 1)
        for part, t in zip("qkv", tensors.pop(name).split(cfg.n_embd, dim=-1)):
            tensors[f"{base}.{part}.{kind}"] = t


def _fuse_c_attn(tensors: dict[str, torch.Tensor]) -> None:
    for name in [k for k in tensors if ".attn.c_attn.q." in k]:
        base, kind = name.split(".attn.c_attn.q.")
        parts = [tensors.pop(f"{base}.attn.c_attn.{p}.{kind}") for p in "qkv"]
        tensors[f"{base}.attn.c_attn.{kind}"] = torch.cat(parts, dim=-1)


# --- import ---------------------------------------------------------------------------------


# Families with an importer of their own: model_type -> "module:function".
_OTHER_IMPORTERS = {"bert": "lmstack.models.bert:from_hf_bert", "t5": "lmstack.models.t5:from_hf_t5"}


def from_hf(hf_dir: str | os.PathLike):
    """Import a local Hugging Face checkpoint -> (lmstack model, tokenizer or None).

    GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`) become a `GPT`; BERT
    (`BertForMaskedLM`) becomes the BERT encoder and T5 (`T5ForConditionalGeneration`) the
    encoder-decoder."""
    p = Path(hf_dir)
    kind = hf_model_type(p)
    if kind in _OTHER_IMPORTERS:
        module, name = _OTHER_IMPORTERS[kind].split(":")
        return getattr(importlib.import_module(module), name)(p)
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(
            f"{p}: not a supported Hugging Face model (model_type {kind!r}); lmstack imports gpt2, llama, bert and t5"
        )
    hf, tensors = read_hf_dir(p, kind)
    source = p / "config.json"
    try:
        cfg = _gpt2_config(hf, source) if kind == "gpt2" else _llama_config(hf, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e} for model_type {kind!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if kind == "gpt2":
        if not any(k.startswith("transformer.") for k in tensors):  # saved from GPT2Model, not the LM head
            tensors = {f"transformer.{k}": v for k, v in tensors.items()}
        _split_c_attn(tensors, cfg)
    names = _gpt2_names(cfg) if kind == "gpt2" else _llama_names(cfg)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    missing = [theirs for _, theirs, _ in names if theirs not in tensors]
    unexpected = sorted(set(tensors) - {theirs for _, theirs, _ in names})
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: weights do not match its config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
            "the directory is incomplete or mixes two models"
        )
    model = GPT(cfg)
    ours = {a: tensors[b].t() if t else tensors[b] for a, b, t in names}
    assign_weights(model, {k: v.float() for k, v in ours.items()}, str(p))
    return model.eval(), hf_tokenizer(p, cfg.vocab_size)


def hf_tokenizer(p: Path, vocab_size: int):
    """The tokenizer of a Hugging Face model directory with the same ids, None when it has none
    lmstack reads: byte-level BPE (`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`) as
    lmstack's own exact BPETokenizer, any other `tokenizer.json` (SentencePiece-style Unigram or
    BPE with byte fallback, WordPiece) through Hugging Face's tokenizers library when it is
    installed. A tokenizer with more ids than the model's `vocab_size` belongs to another model."""
    from lmstack.tokenizers.gpt2 import load_gpt2
    from lmstack.tokenizers.hf_wrapped import load_tokenizer_json

    tokenizer = None
    if (p / "tokenizer.json").is_file():
        tokenizer = load_tokenizer_json(p / "tokenizer.json", vocab_size)  # None without the tokenizers library
    elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        tokenizer = load_gpt2(p / "vocab.json", p / "merges.txt")
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{p}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{vocab_size}; the tokenizer files belong to another model")
    return tokenizer


# --- export ---------------------------------------------------------------------------------


def hf_architecture(cfg: GPTConfig) -> str:
    """'gpt2' or 'llama': the HF architecture that computes the same function as `cfg`."""
    if cfg.prenorm and cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp == "gelu" and cfg.bias \
            and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    if cfg.prenorm and cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu":
        return "llama"
    raise CheckpointError(
        f"this GPT (prenorm={cfg.prenorm}, norm={cfg.norm!r}, pos={cfg.pos!r}, mlp={cfg.mlp!r}, bias={cfg.bias}, "
        f"n_kv_head={cfg.n_kv_head}/{cfg.n_head}) has no Hugging Face equivalent; export handles GPT-2 style "
        "(pre-norm LayerNorm, learned positions, GELU, biases, multi-head) and Llama style (pre-norm RMSNorm, RoPE, SwiGLU)"
    )


def _hf_config_dict(cfg: GPTConfig, arch: str) -> dict:
    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None, "dtype": "float32",
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "llama3" if cfg.rope_scaling else "default", "rope_theta": cfg.rope_theta,
                            **(cfg.rope_scaling or {})},
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None, "dtype": "float32",
    }


def to_hf(model: GPT, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. A byte-level BPE `tokenizer` is
    written as HF's tokenizer.json (which `AutoTokenizer` loads), an imported HF one ("hf" kind)
    as the file it came from; other kinds have no HF form."""
    from safetensors.torch import save_file

    from lmstack.tokenizers.bpe import BPETokenizer
    from lmstack.tokenizers.hf import save_hf
    from lmstack.tokenizers.hf_wrapped import HFTokenizer

    if getattr(model, "family", None) != "gpt":
        raise CheckpointError(f"only GPT models export to Hugging Face format; this is a {model.family!r} model")
    cfg = model.config
    arch = hf_architecture(cfg)
    state = model.state_dict()
    names = _gpt2_names(cfg) if arch == "gpt2" else _llama_names(cfg)
    tensors = {b: state[a].t() if t else state[a] for a, b, t in names}
    if arch == "gpt2":
        _fuse_c_attn(tensors)
    hf_config = _hf_config_dict(cfg, arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, BPETokenizer):
        save_hf(tokenizer, out / "tokenizer.json")
        eot = {"eos_token": EOT, "bos_token": EOT} if tokenizer.eot_id is not None else {}
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **eot})
        hf_config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    elif isinstance(tokenizer, HFTokenizer):
        write_json(out / "tokenizer.json", tokenizer.hf_dict(), indent=None)
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.roles})
        hf_config.update(bos_token_id=tokenizer.role_id("bos_token"), eos_token_id=tokenizer.eot_id)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", hf_config)
    return out

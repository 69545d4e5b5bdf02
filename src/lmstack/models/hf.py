"""Hugging Face interop: import GPT-2, Llama, Mistral, Qwen2 and Qwen3 checkpoints into lmstack's
GPT (BERT and T5 via their own modules), and export a GPT back to a directory `transformers` loads.

A Hugging Face directory is read as files (`config.json` + safetensors, single or sharded), so
importing needs neither `transformers` nor a network. Both directions go through one table per
architecture of (lmstack name, HF name, transposed?) triples; GPT-2's fused `c_attn` is split
into q/k/v before renaming (and fused again after, on export), and its `Conv1D` weights are
stored [in, out], hence the transposes. Mistral, Qwen2 and Qwen3 are Llama with a switch or two
(a sliding window; biases on q, k, v; a norm on q and k and a free head size), so they share
Llama's name table and config reader; the export picks the one of them that `transformers` runs
with the same function.

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
    _require(
        hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
        source,
        f"activation_function {hf.get('activation_function')!r} (only the tanh GELU, gelu_new)",
    )
    _require(hf.get("scale_attn_weights", True), source, "scale_attn_weights=false")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False), source, "scale_attn_by_inverse_layer_idx=true")
    n_embd = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        mlp_hidden=hf.get("n_inner") or 4 * n_embd,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=hf.get("resid_pdrop", 0.0),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_config(hf: dict, source: Path, kind: str = "llama") -> GPTConfig:
    """Llama's config and its kin: `kind` "mistral", "qwen2" or "qwen3" adds that family's switches."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5 / older
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in ("default", "llama3"), source, f"RoPE scaling {rope_type!r} (only Llama 3's)")
    _require(hf.get("hidden_act", "silu") == "silu", source, f"hidden_act {hf.get('hidden_act')!r} (only silu)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        head_dim=hf.get("head_dim") or n_embd // n_head,
        mlp_hidden=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        pos="rope",
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        mlp="swiglu",
        rope_scaling={k: rope[k] for k in LLAMA3_SCALING} if rope_type == "llama3" else None,
        dropout=hf.get("attention_dropout", 0.0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **_family_switches(hf, source, kind),
    )


def _family_switches(hf: dict, source: Path, kind: str) -> dict:
    """The GPTConfig fields in which Llama's kin differ from it (transformers hard-codes most of them)."""
    if kind == "llama":
        bias = hf.get("attention_bias", False)
        _require(hf.get("mlp_bias", False) == bias, source, "attention_bias != mlp_bias")
        return {"bias": bias}
    if kind == "mistral":
        return {"bias": False, "sliding_window": hf.get("sliding_window")}
    if kind == "qwen3":
        _require(not hf.get("attention_bias", False), source, "attention_bias=true (biases on q, k, v and o but not the MLP)")
    return {"bias": False, "qkv_bias": kind == "qwen2", "qk_norm": kind == "qwen3", "sliding_window": _qwen_window(hf, source)}


def _qwen_window(hf: dict, source: Path) -> int | None:
    """Qwen's sliding window, as transformers reads it: off unless `use_sliding_window`, then on the
    layers from `max_window_layers` up (or as `layer_types` lists them). Every default Qwen2/2.5/3
    config has it off; the same window on every layer is Mistral's and runs too, a mix does not."""
    n_layer = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layer)
    ]
    if set(types) == {"full_attention"}:
        return None
    _require(
        set(types) == {"sliding_attention"} and window is not None,
        source,
        f"sliding-window attention on only some layers (use_sliding_window with max_window_layers={first} "
        f"of {n_layer} layers; layer_types {sorted(set(types))})",
    )
    return window


def _gpt2_names(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False)]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            names += [(f"{ours}{a}.{w}", f"{theirs}{b}.{w}", False) for w in ("weight", "bias")]
        for a, b in (
            ("attn.q", "attn.c_attn.q"),
            ("attn.k", "attn.c_attn.k"),
            ("attn.v", "attn.c_attn.v"),
            ("attn.o", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            names += [(f"{ours}{a}.weight", f"{theirs}{b}.weight", True), (f"{ours}{a}.bias", f"{theirs}{b}.bias", False)]
    names += [("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _llama_names(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """Llama's names, which Mistral, Qwen2 and Qwen3 share (Qwen3 adds q_norm and k_norm)."""
    names = [("wte.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
    qkv = ("attn.q", "attn.k", "attn.v")
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (f"{ours}norm1.weight", f"{theirs}input_layernorm.weight", False),
            (f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight", False),
        ]
        if cfg.qk_norm:
            names += [(f"{ours}attn.{n}.weight", f"{theirs}self_attn.{n}.weight", False) for n in ("q_norm", "k_norm")]
        for a, b in (
            ("attn.q", "self_attn.q_proj"),
            ("attn.k", "self_attn.k_proj"),
            ("attn.v", "self_attn.v_proj"),
            ("attn.o", "self_attn.o_proj"),
            ("mlp.gate", "mlp.gate_proj"),
            ("mlp.up", "mlp.up_proj"),
            ("mlp.down", "mlp.down_proj"),
        ):
            names.append((f"{ours}{a}.weight", f"{theirs}{b}.weight", False))
            if cfg.bias or (cfg.qkv_bias and a in qkv):
                names.append((f"{ours}{a}.bias", f"{theirs}{b}.bias", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _names(cfg: GPTConfig, arch: str) -> list[tuple[str, str, bool]]:
    return _gpt2_names(cfg) if arch == "gpt2" else _llama_names(cfg)


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
LLAMA_KIN = ("llama", "mistral", "qwen2", "qwen3")  # model_types read by `_llama_config` and `_llama_names`


def from_hf(hf_dir: str | os.PathLike):
    """Import a local Hugging Face checkpoint -> (lmstack model, tokenizer or None).

    GPT-2 (`GPT2LMHeadModel`), Llama (`LlamaForCausalLM`, SmolLM2 included), Mistral, Qwen2 and
    Qwen3 (`...ForCausalLM`) become a `GPT`; BERT (`BertForMaskedLM`) becomes the BERT encoder and
    T5 (`T5ForConditionalGeneration`) the encoder-decoder. The tokenizer keeps its chat template."""
    p = Path(hf_dir)
    kind = hf_model_type(p)
    if kind in _OTHER_IMPORTERS:
        module, name = _OTHER_IMPORTERS[kind].split(":")
        return getattr(importlib.import_module(module), name)(p)
    if kind != "gpt2" and kind not in LLAMA_KIN:
        raise CheckpointError(
            f"{p}: not a supported Hugging Face model (model_type {kind!r}); lmstack imports "
            f"gpt2, {', '.join(LLAMA_KIN)}, bert and t5"
        )
    hf, tensors = read_hf_dir(p, kind)
    source = p / "config.json"
    try:
        cfg = _gpt2_config(hf, source) if kind == "gpt2" else _llama_config(hf, source, kind)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e} for model_type {kind!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if kind == "gpt2":
        if not any(k.startswith("transformer.") for k in tensors):  # saved from GPT2Model, not the LM head
            tensors = {f"transformer.{k}": v for k, v in tensors.items()}
        _split_c_attn(tensors, cfg)
    names = _names(cfg, kind)
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
    tokenizer = hf_tokenizer(p, cfg.vocab_size)
    if tokenizer is not None:
        tokenizer.chat_template = hf_chat_template(p)
    return model.eval(), tokenizer


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
        raise CheckpointError(
            f"{p}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{vocab_size}; the tokenizer files belong to another model"
        )
    return tokenizer


def hf_chat_template(p: Path) -> str | None:
    """The chat template `transformers` applies for a model directory: `chat_template.jinja` (how
    it saves one now), else `tokenizer_config.json`'s `chat_template`, a string or a list of
    {name, template} of which the "default" one is what `apply_chat_template` uses."""
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    config = p / "tokenizer_config.json"
    template = read_json(config, "tokenizer config").get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{config}: chat_template is neither a string nor a list of {{name, template}}; fix or remove it")
    return template


# --- export ---------------------------------------------------------------------------------


def hf_architecture(cfg: GPTConfig) -> str:
    """The HF `model_type` that computes the same function as `cfg`: 'gpt2', or one of Llama's kin,
    whose weights all go by `_llama_names`: 'qwen3' (q/k norm), 'qwen2' (biases on q, k, v only),
    'mistral' (a sliding window), else 'llama'."""
    plain = not (cfg.qkv_bias or cfg.qk_norm or cfg.sliding_window)
    if (
        cfg.prenorm
        and cfg.norm == "layernorm"
        and cfg.pos == "learned"
        and cfg.mlp == "gelu"
        and cfg.bias
        and cfg.n_kv_head == cfg.n_head
        and cfg.head_dim * cfg.n_head == cfg.n_embd
        and plain
    ):
        return "gpt2"
    if cfg.prenorm and cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu":
        if cfg.qk_norm and not cfg.bias and not cfg.qkv_bias:
            return "qwen3"
        if cfg.qkv_bias and not cfg.bias and not cfg.qk_norm:
            return "qwen2"
        if cfg.sliding_window and not cfg.bias and not cfg.qkv_bias and not cfg.qk_norm:
            return "mistral"
        if plain:
            return "llama"
    raise CheckpointError(
        f"this GPT (prenorm={cfg.prenorm}, norm={cfg.norm!r}, pos={cfg.pos!r}, mlp={cfg.mlp!r}, bias={cfg.bias}, "
        f"n_kv_head={cfg.n_kv_head}/{cfg.n_head}, qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
        f"sliding_window={cfg.sliding_window}) has no Hugging Face equivalent; export handles GPT-2 style (pre-norm "
        "LayerNorm, learned positions, GELU, biases, multi-head) and Llama style (pre-norm RMSNorm, RoPE, SwiGLU) "
        "with at most one of: qk_norm (Qwen3), qkv_bias without bias (Qwen2), a sliding window without biases (Mistral)"
    )


_LLAMA_KIN_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _hf_config_dict(cfg: GPTConfig, arch: str) -> dict:
    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,
            "eos_token_id": None,
            "dtype": "float32",
        }
    return {
        "architectures": [_LLAMA_KIN_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {
            "rope_type": "llama3" if cfg.rope_scaling else "default",
            "rope_theta": cfg.rope_theta,
            **(cfg.rope_scaling or {}),
        },
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": "float32",
        **_window_config(cfg, arch),
    }


def _window_config(cfg: GPTConfig, arch: str) -> dict:
    """Mistral's window is on every layer; Qwen's must be switched on, from layer 0 up."""
    if arch == "mistral":
        return {"sliding_window": cfg.sliding_window}
    if arch in ("qwen2", "qwen3"):
        return {
            "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if cfg.sliding_window else cfg.n_layer,
        }
    return {}


def to_hf(model: GPT, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. A byte-level BPE `tokenizer` is
    written as HF's tokenizer.json (which `AutoTokenizer` loads), an imported HF one ("hf" kind)
    as the file it came from, either with its chat template; other kinds have no HF form."""
    from safetensors.torch import save_file

    from lmstack.tokenizers.bpe import BPETokenizer
    from lmstack.tokenizers.hf import save_hf
    from lmstack.tokenizers.hf_wrapped import HFTokenizer

    if getattr(model, "family", None) != "gpt":
        raise CheckpointError(f"only GPT models export to Hugging Face format; this is a {model.family!r} model")
    cfg = model.config
    arch = hf_architecture(cfg)
    state = model.state_dict()
    names = _names(cfg, arch)
    tensors = {b: state[a].t() if t else state[a] for a, b, t in names}
    if arch == "gpt2":
        _fuse_c_attn(tensors)
    hf_config = _hf_config_dict(cfg, arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = getattr(tokenizer, "chat_template", None)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **({"chat_template": template} if template else {})}
    if isinstance(tokenizer, BPETokenizer):
        save_hf(tokenizer, out / "tokenizer.json")
        eot = {"eos_token": EOT, "bos_token": EOT} if tokenizer.eot_id is not None else {}
        write_json(out / "tokenizer_config.json", {**tokenizer_config, **eot})
        hf_config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    elif isinstance(tokenizer, HFTokenizer):
        write_json(out / "tokenizer.json", tokenizer.hf_dict(), indent=None)
        write_json(out / "tokenizer_config.json", {**tokenizer_config, **tokenizer.roles})
        hf_config.update(bos_token_id=tokenizer.role_id("bos_token"), eos_token_id=tokenizer.eot_id)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", hf_config)
    return out

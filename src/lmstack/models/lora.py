"""LoRA adapters (Hu et al. 2021) for every neural family, saved in Hugging Face PEFT's format.

A targeted `nn.Linear` y = W x + b becomes y = W x + b + s · B A dropout(x), with A [r, in]
initialised as PEFT does (Kaiming-uniform, a = sqrt(5)), B [out, r] zeros (the adapter starts as
the identity change) and s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
Everything else is frozen. The wrapper is itself an `nn.Linear` holding the base's own `weight`
and `bias`, so the model's forward, its KV-cache decoding (`start` / `step`) and the state-dict
keys of its base weights are unchanged; the adapter adds `<module>.lora_A` / `<module>.lora_B`.

Targets (`LoraConfig.targets`) are group names or shell-style patterns (`fnmatch`, where `*`
also crosses dots) matched against the whole lmstack module path:

- GPT: "attn" = `blocks.N.attn.{q,k,v,o}`, "mlp" = `blocks.N.mlp.{gate,up,down}`;
- BERT: "attn" = `layers.N.qkv` (q, k, v fused) and `layers.N.attn_out`, "mlp" = `layers.N.ff_{in,out}`;
- T5: "attn" = q, k, v, o of every self- and cross-attention, "mlp" = `*.ff.{wi,wi_0,wi_1,wo}`;
- RNN / biRNN: the recurrent cells are not linear layers; "output" = the softmax projection `out`.

`modules_to_save` names modules trained whole (PEFT's term): "embeddings" = the token embedding
and the output head (for new special tokens), or patterns. lmstack trains those matrices in
place (a tied matrix stays tied) and saves them in full.

Files are PEFT's: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r] under the names
`transformers` gives the modules (Llama style `model.layers.N.self_attn.q_proj`, BERT
`bert.encoder.layer.N.attention.self.query`, T5 `encoder.block.N.layer.0.SelfAttention.q`);
families without a `transformers` twin (RNNs, GPTs no HF class computes) keep lmstack's names.
Where one side fuses what the other splits, the adapter is converted exactly:

- GPT-2 fuses q, k, v into one Conv1D `c_attn`. lmstack's three adapters are written as one
  rank-(r_q + r_k + r_v) adapter on `c_attn`: A stacked, B block-diagonal, its scale kept by a
  `rank_pattern` / `alpha_pattern` entry; lmstack reads such a file back into its three adapters
  (the blocks are listed in the lmstack metadata, below). A PEFT adapter on `c_attn` (shared A,
  dense B) becomes three rank-r adapters sharing that A: the same function.
- BERT's `qkv` adapter is written as three adapters on query / key / value sharing A; PEFT's
  three independent ones load as one adapter of their summed rank with block-diagonal B.

lmstack's own facts ride in the safetensors header's metadata under "lmstack" (an extra key in
adapter_config.json would make PEFT warn that the file needs a newer PEFT): the fused blocks and a
fingerprint of the base (sha256 of its config: family and sizes, which fix every shape), so an
adapter is refused on another base. Weights are not hashed: two checkpoints of the same
architecture share a fingerprint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import CheckpointError, FormatError, InputError
from lmstack.io import atomic_path, read_json, write_json
from lmstack.models.checkpoint import CONFIG_FILE, TOKENIZER_FILE, read_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoRA target groups and whole-module groups per family: fnmatch patterns over module paths.
GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt": {"attn": ("blocks.*.attn.*",), "mlp": ("blocks.*.mlp.*",)},
    "bert": {"attn": ("layers.*.qkv", "layers.*.attn_out"), "mlp": ("layers.*.ff_in", "layers.*.ff_out")},
    "t5": {"attn": ("*.attn.*", "*.self_attn.*", "*.cross_attn.*"), "mlp": ("*.ff.*",)},
    "rnn": {"output": ("out",)},
    "birnn": {"output": ("out",)},
}
SAVE_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt": {"embeddings": ("wte", "lm_head")},
    "bert": {"embeddings": ("embed_tokens",)},
    "t5": {"embeddings": ("embed", "lm_head")},
    "rnn": {"embeddings": ("embed", "out")},
    "birnn": {"embeddings": ("embed", "out")},
}
TASK_TYPES = {"gpt": "CAUSAL_LM", "rnn": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


@dataclass
class LoraConfig:
    """r: rank; alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`);
    dropout: on the adapter's input; targets / modules_to_save: group names or fnmatch patterns
    over module paths (see the module docstring)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn", "mlp")
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise InputError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = _names(self.targets, "targets")
        self.modules_to_save = _names(self.modules_to_save, "modules_to_save")
        if not self.targets:
            raise InputError("LoRA targets is empty; name groups (e.g. 'attn', 'mlp') or module patterns")

    @property
    def scaling(self) -> float:
        return _scaling(self.alpha, self.r, self.rslora)


def _names(value, field: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) and v for v in items):
        raise InputError(f"LoRA {field} must be names or patterns (strings), got {value!r}")
    return items


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# --- the wrapper --------------------------------------------------------------------------


class LoraLinear(nn.Linear):
    """A frozen linear layer plus `scaling · lora_B @ lora_A` (PEFT's LoRA layer). It keeps the
    base's `weight` and `bias` objects, so tied or shared weights stay shared."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # Half-precision bases get float32 adapters, as PEFT does: tiny updates would round away.
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # With p = 0 (or in eval) the adapter reads x itself, which lets the backward fold both paths into one gradient.
        xd = self.lora_dropout(x) if self._dropping() else None
        if self._exact(x):
            return _LoraLinearFn.apply(x, xd, (self.scaling,), *self._tensors())[0]
        # A half-precision base with float32 adapters, or autocast: the adapter in its own precision, as PEFT does.
        y = F.linear(x, self.weight, self.bias)
        z = F.linear((x if xd is None else xd).to(self.lora_A.dtype), self.lora_A)  # [..., r]
        return y + (F.linear(z, self.lora_B) * self.scaling).to(y.dtype)

    def joint(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
        """`layer(x)` for each of `layers` (this one among them: GPT's q, k, v, or gate and up, all
        reading x). When all are adapters that `_LoraLinearFn` runs and none drops inputs, they run
        as one: a single product x [A_1; A_2; ...]ᵀ, one buffer for x's gradient."""
        if all(isinstance(m, LoraLinear) and not m.merged and m._exact(x) and not m._dropping() for m in layers):
            return _LoraLinearFn.apply(x, None, tuple(m.scaling for m in layers), *(t for m in layers for t in m._tensors()))
        return tuple(m(x) for m in layers)

    def _exact(self, x: torch.Tensor) -> bool:
        """Whether base and adapter compute in x's precision (no autocast): `_LoraLinearFn`'s case."""
        return x.dtype == self.weight.dtype == self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type)

    def _dropping(self) -> bool:
        return self.training and self.lora_dropout.p > 0

    def _tensors(self) -> tuple:
        return self.weight, self.bias, self.lora_A, self.lora_B

    def delta(self) -> torch.Tensor:
        """The update to `weight` that the adapter computes: scaling · B A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def set_merged(self, merged: bool) -> None:
        if merged != self.merged:
            self.weight += (self.delta() if merged else -self.delta()).to(self.weight.dtype)
            self.merged = merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class _LoraLinearFn(torch.autograd.Function):
    """y_i = x W_iᵀ + b_i + s_i · (x' A_iᵀ) B_iᵀ for adapted layers i = 1..n that read the same x
    (x' = dropout(x) for a single layer, or x itself when `xd` is None), with the backward written
    out. Inputs after `scalings` are (W, b, A, B) per layer. Autograd's version of the same
    expressions copies each y to add the adapter's product, makes n products x Aᵀ (and n of their
    gradients), and sums x's gradient from 2n paths in separate passes. Here one product
    z = x [A_1; ...; A_n]ᵀ serves all layers, each adapter's product accumulates into its y, and
    x's gradient accumulates in one buffer. Gradients are made only for what requires them (a
    frozen W gets none)."""

    @staticmethod
    def forward(ctx, x, xd, scalings, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = None if xd is None else xd.reshape(-1, xd.shape[-1])
        weights, biases, As, Bs = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        A = As[0] if len(As) == 1 else torch.cat(As)  # [r_1 + ... + r_n, in]
        z = (x2 if xd2 is None else xd2) @ A.t()
        ys, start = [], 0
        for weight, bias, B, s in zip(weights, biases, Bs, scalings, strict=True):
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
            y.addmm_(z[:, start : start + B.shape[1]], B.t(), alpha=s)
            ys.append(y.view(*x.shape[:-1], y.shape[-1]))
            start += B.shape[1]
        ctx.save_for_backward(x2, xd2, A, z, *weights, *Bs)
        ctx.scalings, ctx.x_shape = scalings, x.shape
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        x2, xd2, A, z, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        weights, Bs = rest[:n], rest[n:]
        need_x, need_xd = ctx.needs_input_grad[:2]
        need = ctx.needs_input_grad[3:]  # (W, b, A, B) per layer
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        xa = x2 if xd2 is None else xd2  # what the adapters read
        gz = None  # d loss / d z
        if need_x or need_xd or any(need[2::4]):
            gz = torch.cat([(g @ B).mul_(s) for g, B, s in zip(gs, Bs, ctx.scalings, strict=True)], 1)
        dx = dxd = None
        if need_x:
            dx = gs[0] @ weights[0]
            for g, weight in zip(gs[1:], weights[1:], strict=True):
                dx.addmm_(g, weight)
            if xd2 is None:
                dx.addmm_(gz, A)
            dx = dx.view(ctx.x_shape)
        if need_xd:
            dxd = (gz @ A).view(ctx.x_shape)
        dA = gz.t() @ xa if any(need[2::4]) else None
        out, start = [], 0
        for i, (g, B, s) in enumerate(zip(gs, Bs, ctx.scalings, strict=True)):
            rows = slice(start, start + B.shape[1])
            out += [
                g.t() @ x2 if need[4 * i] else None,
                g.sum(0) if need[4 * i + 1] else None,
                dA[rows] if need[4 * i + 2] else None,
                (g.t() @ z[:, rows]).mul_(s) if need[4 * i + 3] else None,
            ]
            start = rows.stop
        return dx, dxd, None, *out


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _require_adapters(model: nn.Module) -> dict[str, LoraLinear]:
    mods = lora_modules(model)
    if not mods:
        raise InputError("this model has no LoRA adapters; attach them first (lora.attach or load_adapter)")
    return mods


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What fine-tuning updates: every lora_A / lora_B, then the modules_to_save matrices
    (each shared matrix once). Hand these, and only these, to the optimizer."""
    params = [p for m in _require_adapters(model).values() for p in (m.lora_A, m.lora_B)]
    saved = {id(p): p for _, p in _saved_params(model)}
    return params + list(saved.values())


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (same function, no adapter cost per token)."""
    for m in _require_adapters(model).values():
        m.set_merged(True)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: base weights back, adapters active again."""
    for m in _require_adapters(model).values():
        m.set_merged(False)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put plain `nn.Linear` layers back: an ordinary model, every weight trainable."""
    for path, m in _require_adapters(model).items():
        m.set_merged(True)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _set_module(model, path, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# --- attaching ----------------------------------------------------------------------------


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _resolve(
    model: nn.Module, entries: tuple[str, ...], groups: dict[str, tuple[str, ...]], candidates: list[str], field: str
) -> list[str]:
    """Module paths among `candidates` named by group names or fnmatch patterns; an entry that
    names nothing is an error listing what exists."""
    family = getattr(model, "family", type(model).__name__)
    known = {g for fam in (GROUPS, SAVE_GROUPS) for gs in fam.values() for g in gs}
    chosen: list[str] = []
    for entry in entries:
        if entry in groups:
            hits = [c for c in candidates if any(fnmatch.fnmatchcase(c, p) for p in groups[entry])]
        elif entry in known:
            raise InputError(
                f"LoRA {field}: the {family} family has no {entry!r} group; its groups are "
                f"{sorted(groups)}, or give module patterns such as {candidates[:3]}"
            )
        else:
            hits = [c for c in candidates if fnmatch.fnmatchcase(c, entry)]
        if not hits:
            raise InputError(
                f"LoRA {field}: {entry!r} matches no module of this {family} model; "
                f"its modules are {candidates} (groups: {sorted(groups)})"
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _tied(model: nn.Module, module: nn.Module) -> bool:
    return any(m is not module and getattr(m, "weight", None) is module.weight for m in model.modules())


def attach(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every targeted linear layer of `model` in place, freeze everything but the adapters
    (and `modules_to_save`), and return the wrapped module paths."""
    return _attach(model, cfg, {})


def _attach(model: nn.Module, cfg: LoraConfig, ranks: dict[str, tuple[int, float]]) -> list[str]:
    """`attach` with per-module (rank, scaling) overrides, for adapters read from files."""
    if lora_modules(model):
        raise InputError("this model already has LoRA adapters; merge_and_unload it (or load the base again) first")
    family = getattr(model, "family", "")
    linears = _linears(model)
    targets = _resolve(model, cfg.targets, GROUPS.get(family, {}), list(linears), "targets")
    modules = [n for n, _ in model.named_modules() if n]
    saved = _resolve(model, cfg.modules_to_save, SAVE_GROUPS.get(family, {}), modules, "modules_to_save")
    for path in targets:
        if _tied(model, linears[path]):
            raise InputError(
                f"LoRA target {path!r} shares its weight with the embedding (tied); an adapter there "
                "would change the input side too; train it whole with modules_to_save=('embeddings',)"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        r, scaling = ranks.get(path, (cfg.r, cfg.scaling))
        _set_module(model, path, LoraLinear(linears[path], r, scaling, cfg.dropout))
    for path in saved:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)
    model.lora_config = dataclasses.replace(cfg, modules_to_save=tuple(saved))
    return targets


def _saved_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(lmstack tensor name, parameter) of the modules_to_save, from the config `attach` kept."""
    cfg = getattr(model, "lora_config", None)
    out = []
    for path in cfg.modules_to_save if cfg else ():
        out += [(f"{path}.{n}", p) for n, p in model.get_submodule(path).named_parameters()]
    return out


# --- Hugging Face module names ------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    """lmstack module `ours` rows `ours_rows` are Hugging Face module `theirs` rows `theirs_rows`."""

    ours: str
    theirs: str
    ours_rows: slice
    theirs_rows: slice
    in_features: int


def _hf_table(model: nn.Module) -> list[tuple[str, str]]:
    """(lmstack module, HF module) pairs; HF names ending `.c_attn.q` / `.qkv` are parts (see `_links`)."""
    family = getattr(model, "family", "")
    if family == "gpt":
        from lmstack.models.hf import _gpt2_names, _llama_names, hf_architecture

        try:
            arch = hf_architecture(model.config)
        except CheckpointError:
            return []
        names = [(a, b) for a, b, _ in (_gpt2_names if arch == "gpt2" else _llama_names)(model.config)]
    elif family == "bert":
        from lmstack.models.bert import hf_names

        names = [(b, a if a.startswith("cls.") else f"bert.{a}") for a, b in hf_names(model.config).items()]
    elif family == "t5":
        from lmstack.models.t5 import hf_names

        names = [(b, a) for a, b in hf_names(model.config).items()]
    else:
        return []
    return [(a.removesuffix(".weight"), b.removesuffix(".weight")) for a, b in names if a.endswith(".weight")]


def _links(model: nn.Module) -> list[_Link]:
    """How each lmstack module maps onto HF modules, rows included: GPT-2's `c_attn` holds q, k, v
    as row blocks, lmstack BERT's `qkv` holds query, key, value. Modules with no HF name keep theirs."""
    modules = dict(model.named_modules())
    table = dict(_hf_table(model))
    links = []
    for ours, m in modules.items():
        rows = getattr(m, "out_features", None) or getattr(m, "num_embeddings", None) or 0
        cols = getattr(m, "in_features", None) or getattr(m, "embedding_dim", None) or 0
        full = slice(0, rows)
        theirs = table.get(ours, ours)
        if theirs.endswith((".c_attn.q", ".c_attn.k", ".c_attn.v")):
            i = "qkv".index(theirs[-1])
            links.append(_Link(ours, theirs[:-2], full, slice(i * rows, (i + 1) * rows), cols))
        elif theirs.endswith(".qkv"):
            d = rows // 3
            for i, part in enumerate(("query", "key", "value")):
                links.append(_Link(ours, f"{theirs[:-4]}.attention.self.{part}", slice(i * d, (i + 1) * d), slice(0, d), cols))
        elif ours:
            links.append(_Link(ours, theirs, full, full, cols))
    return links


def _fuse(parts: list[tuple[torch.Tensor, torch.Tensor, float, slice]], out_features: int):
    """One adapter (A, B, scale) equal to the sum of `parts` [(A_i, B_i, scale_i, rows_i)]: the
    A_i stacked, each B_i placed at its rows and its own columns, rescaled to the first scale."""
    scale = parts[0][2]
    A = torch.cat([a for a, *_ in parts])
    B = A.new_zeros(out_features, A.shape[0])
    col = 0
    for a, b, s, rows in parts:
        B[rows, col : col + a.shape[0]] = b * (s / scale)
        col += a.shape[0]
    return A, B, scale


def _out_rows(links: list[_Link], side: str) -> int:
    return max((lk.theirs_rows if side == "theirs" else lk.ours_rows).stop for lk in links)


# --- files --------------------------------------------------------------------------------


def _config_dict(model: nn.Module) -> dict:
    return json.loads(json.dumps({"family": model.family, **dataclasses.asdict(model.config)}))


def fingerprint(config: dict) -> str:
    """sha256 of a checkpoint config (family and sizes: every tensor shape follows from it). The
    adapter stores the base's without vocab_size, which it keeps apart: a saved embedding may
    grow the vocabulary."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def save_adapter(
    model: nn.Module, out_dir: str | os.PathLike, base_path: str | os.PathLike, cfg: LoraConfig | None = None, tokenizer=None
) -> Path:
    """Write `model`'s adapters as a PEFT adapter directory that `peft.PeftModel.from_pretrained`
    loads on the `transformers` twin of the base, and `lmstack.load` on the lmstack base at
    `base_path` (stored relative to `out_dir` when given relative, so the two move together).
    `cfg` defaults to the one `attach` used; a vocabulary-grown `tokenizer` belongs here."""
    from safetensors.torch import save_file

    mods = _require_adapters(model)
    cfg = cfg or model.lora_config
    base, out = Path(base_path), Path(out_dir)
    base_cfg = read_config(base)
    _check_base(model, base_cfg, base, cfg)
    tensors, ranks, alphas, blocks = {}, {}, {}, {}
    by_theirs: dict[str, list[_Link]] = {}
    for lk in _links(model):
        by_theirs.setdefault(lk.theirs, []).append(lk)
    for theirs, links in by_theirs.items():
        parts = [
            (mods[lk.ours].lora_A.detach(), mods[lk.ours].lora_B.detach()[lk.ours_rows], mods[lk.ours].scaling, lk.theirs_rows)
            for lk in links
            if lk.ours in mods
        ]
        if not parts:
            continue
        A, B, scale = _fuse(parts, _out_rows(links, "theirs"))
        tensors[f"{PREFIX}{theirs}.lora_A.weight"], tensors[f"{PREFIX}{theirs}.lora_B.weight"] = A, B
        r = A.shape[0]
        alpha = scale * (math.sqrt(r) if cfg.rslora else r)
        if r != cfg.r:
            ranks[theirs] = r
        if not math.isclose(alpha, cfg.alpha, rel_tol=1e-9):
            alphas[theirs] = alpha
        if len(parts) > 1:
            blocks[theirs] = [[p[3].start, p[3].stop, p[0].shape[0]] for p in parts]
    hf_name = {lk.ours: lk.theirs for lk in _links(model)}
    saved = {}
    for name, p in _saved_params(model):
        module, _, kind = name.rpartition(".")
        if not any(p is q for q in saved.values()):
            saved[f"{hf_name.get(module, module)}.{kind}"] = p
    tensors |= {f"{PREFIX}{k}": v.detach() for k, v in saved.items()}
    stored_base = os.path.relpath(base.resolve(), out.resolve()) if not base.is_absolute() else str(base)
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(model.family),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "target_modules": sorted({t.rsplit(".lora_", 1)[0].removeprefix(PREFIX) for t in tensors if ".lora_" in t}),
        "modules_to_save": sorted({k.rpartition(".")[0] for k in saved}) or None,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "fan_in_fan_out": any(k.endswith(".c_attn") for k in by_theirs),
        "init_lora_weights": True,
        "base_model_name_or_path": stored_base,
        "inference_mode": True,
    }
    sizes = {k: v for k, v in base_cfg.items() if k != "vocab_size"}
    meta = {
        "base_fingerprint": fingerprint(sizes),
        "base_vocab_size": base_cfg.get("vocab_size"),
        "family": model.family,
        "fused_blocks": blocks,
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(
            {k: v.float().contiguous().clone() for k, v in tensors.items()},
            str(tmp),
            metadata={"format": "pt", "lmstack": json.dumps(meta)},
        )
    write_json(out / ADAPTER_CONFIG, adapter_cfg)
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
    return out


def _check_base(model: nn.Module, base_cfg: dict, base: Path, cfg: LoraConfig) -> None:
    """The model must be the base at `base` (its vocabulary may have grown if embeddings are saved)."""
    ours = _config_dict(model)
    grown = "vocab_size" if cfg.modules_to_save else None
    differ = sorted(k for k in set(ours) | set(base_cfg) if k != grown and ours.get(k) != base_cfg.get(k))
    if differ:
        raise InputError(
            f"{base}: this model is not that base checkpoint (config differs in {differ}); "
            "pass the checkpoint the adapters were attached to as base_path"
        )


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json with the weights' lmstack metadata as its "lmstack" key, the tensors)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG}; pass a LoRA adapter directory (save_adapter output)")
    try:
        acfg = read_json(adapter_dir / ADAPTER_CONFIG, "adapter config")
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(acfg, dict) or acfg.get("peft_type") != "LORA" or acfg.get("use_dora"):
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG}: not a plain LoRA adapter (peft_type "
            f"{acfg.get('peft_type') if isinstance(acfg, dict) else None!r}); lmstack reads LoRA only"
        )
    if acfg.get("bias", "none") != "none":
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: bias {acfg['bias']!r} is not supported (only 'none')")
    f = adapter_dir / ADAPTER_WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{adapter_dir}: missing {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(f), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("lmstack", "{}"))
        return {**acfg, "lmstack": meta}, load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: corrupt adapter weights ({e}); save the adapter again") from None


def _lora_config(acfg: dict, targets: tuple[str, ...], saved: tuple[str, ...], where: Path) -> LoraConfig:
    try:
        return LoraConfig(
            r=int(acfg["r"]),
            alpha=float(acfg["lora_alpha"]),
            dropout=float(acfg.get("lora_dropout", 0.0)),
            targets=targets,
            rslora=bool(acfg.get("use_rslora", False)),
            modules_to_save=saved,
        )
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise CheckpointError(f"{where}: invalid LoRA settings ({e})") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoraConfig:
    """Attach the adapter in `adapter_dir` (lmstack's or one PEFT wrote for the `transformers`
    twin of this base) to `model` and load its weights; returns its LoraConfig."""
    p = Path(adapter_dir)
    acfg, parts, whole = _adapter_for(model, p)
    linears = _linears(model)
    ranks = {}
    for ours, ps in parts.items():
        if ours not in linears:
            raise CheckpointError(f"{p}: the adapter targets {ours!r}, which is not a linear layer of this model")
        ranks[ours] = (sum(a.shape[0] for a, *_ in ps), ps[0][2])
    saved = tuple(sorted({name.rpartition(".")[0] for name in whole}))
    _attach(model, _lora_config(acfg, tuple(parts), saved, p / ADAPTER_CONFIG), ranks)
    _copy_in(model, parts, whole, p)
    return model.lora_config


def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Load an adapter's weights into the adapters already attached to `model` (resuming a run):
    the same modules with the same ranks, else CheckpointError."""
    p = Path(adapter_dir)
    mods = _require_adapters(model)
    _, parts, whole = _adapter_for(model, p)
    ranks = {ours: sum(a.shape[0] for a, *_ in ps) for ours, ps in parts.items()}
    if ranks != {name: m.lora_A.shape[0] for name, m in mods.items()}:
        raise CheckpointError(
            f"{p}: its adapters ({sorted(ranks.items())[:4]} ...) are not the ones attached to this "
            "model; attach with the same LoRA settings, or use load_adapter on a fresh base"
        )
    _copy_in(model, parts, whole, p)


def adapter_updates(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A [r, in], B [out, r], scaling)} of the adapter at `adapter_dir`, checked
    against `model` as `load_adapter` checks it, without attaching anything: for serving several
    adapters side by side (`models.multi_lora`). An adapter that trains whole modules
    (modules_to_save) is refused there: it replaces base weights, which rows cannot share."""
    p = Path(adapter_dir)
    _, parts, whole = _adapter_for(model, p)
    if whole:
        raise CheckpointError(
            f"{p}: this adapter trains whole modules ({sorted(whole)[:3]}, e.g. an embedding grown for new "
            "chat tokens), which replace the base's weights for every row, so it cannot be a card; serve it "
            f"alone (`lmstack lora merge --adapter {p} --out MERGED`, then `lmstack serve --model MERGED`), or "
            "pretrain the base with the chat tokens in its tokenizer (`lmstack tokenizer train ... --special "
            "'<|endoftext|>' --special '<|system|>' --special '<|user|>' --special '<|assistant|>' --special '<|end|>'`) "
            "so fine-tuning need not grow the vocabulary"
        )
    linears = _linears(model)
    missing = sorted(set(parts) - set(linears))
    if missing:
        raise CheckpointError(f"{p}: the adapter targets {missing[:3]}, which are not linear layers of this model")
    return {ours: _fuse(ps, linears[ours].out_features) for ours, ps in parts.items()}


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint adapters made for `model`'s architecture carry (its config without vocab_size)."""
    cfg = _config_dict(model)
    cfg.pop("vocab_size", None)
    return fingerprint(cfg)


def adapter_fingerprint(adapter_dir: str | os.PathLike) -> str:
    """The fingerprint of the base an adapter was made for: the one lmstack stored with it, or for
    an adapter PEFT wrote, that of the base checkpoint it names."""
    p = Path(adapter_dir)
    acfg, _ = _read_adapter(p)
    stored = (acfg.get("lmstack") or {}).get("base_fingerprint")
    if stored:
        return stored
    cfg = read_config(base_path(p))
    cfg.pop("vocab_size", None)
    return fingerprint(cfg)


def _adapter_for(model: nn.Module, p: Path):
    """(adapter config, {lmstack module: adapter parts}, {lmstack tensor: whole matrix}) of the
    adapter at `p`, checked against `model`: its base, its module names, its shapes."""
    acfg, tensors = _read_adapter(p)
    lora, full = _split_keys(tensors, p)
    _check_fingerprint(model, acfg, full, p)
    links = _links(model)
    by_theirs: dict[str, list[_Link]] = {}
    for lk in links:
        by_theirs.setdefault(lk.theirs, []).append(lk)
    unexpected = sorted({t for t in lora if t not in by_theirs} | {t for t in full if t.rpartition(".")[0] not in by_theirs})
    if unexpected:
        raise CheckpointError(
            f"{p}: adapter modules {unexpected[:5]} do not exist in this {model.family} model; "
            "the adapter belongs to another architecture"
        )
    hf_to_ours = {lk.theirs: lk.ours for lk in links}
    whole = {}
    for t, v in full.items():
        module, _, kind = t.rpartition(".")
        whole[f"{hf_to_ours[module]}.{kind}"] = v
    return acfg, _parts_by_ours(acfg, lora, by_theirs, p), whole


def _check_fingerprint(model: nn.Module, acfg: dict, full: dict[str, torch.Tensor], p: Path) -> None:
    """lmstack adapters name their base by fingerprint; the vocabulary may be the base's or the
    one the adapter's saved embedding grew it to."""
    meta = acfg.get("lmstack") or {}
    if not meta.get("base_fingerprint"):
        return  # written by PEFT: only the shapes can be checked
    ours = _config_dict(model)
    vocab = ours.pop("vocab_size", None)
    vocabs = {meta.get("base_vocab_size"), *(t.shape[0] for t in full.values())}
    if meta["base_fingerprint"] != fingerprint(ours) or vocab not in vocabs:
        raise CheckpointError(
            f"{p}: this adapter was made for {acfg.get('base_model_name_or_path')} "
            f"({meta.get('family')}), not for this {model.family} model (config {_brief(model)}); "
            "load it on its own base"
        )


@torch.no_grad()
def _copy_in(model: nn.Module, parts: dict, whole: dict[str, torch.Tensor], p: Path) -> None:
    mods = lora_modules(model)
    for ours, ps in parts.items():
        A, B, scale = _fuse(ps, mods[ours].out_features)
        mods[ours].lora_A.copy_(A)
        mods[ours].lora_B.copy_(B * (scale / mods[ours].scaling))
    _load_saved(model, whole, p)


def _brief(model: nn.Module) -> str:
    cfg = _config_dict(model)
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool))


def _split_keys(tensors: dict[str, torch.Tensor], where: Path):
    """({HF module: {"A": tensor, "B": tensor}}, {HF tensor name: full tensor}) of a PEFT file."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full = {}
    for key, v in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            full[re.sub(r"\.modules_to_save(\.default)?\.", ".", name)] = v
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"{where}: {module} has no {missing}.weight; the adapter file is incomplete")
    return lora, full


def _parts_by_ours(acfg: dict, lora: dict, by_theirs: dict[str, list[_Link]], where: Path):
    """lmstack module -> the adapter parts that land on it, [(A, B rows, scale, rows)], after shape checks."""
    blocks = (acfg.get("lmstack") or {}).get("fused_blocks") or {}
    parts: dict[str, list] = {}
    for theirs, ab in lora.items():
        links = by_theirs[theirs]
        A, B = ab["A"].float(), ab["B"].float()
        rank = _pattern_value(acfg.get("rank_pattern") or {}, theirs, acfg.get("r"))
        alpha = _pattern_value(acfg.get("alpha_pattern") or {}, theirs, acfg.get("lora_alpha"))
        in_f, out_f = links[0].in_features, _out_rows(links, "theirs")
        if A.ndim != 2 or B.ndim != 2 or A.shape != (rank, in_f) or B.shape != (out_f, rank):
            raise CheckpointError(
                f"{where}: {theirs} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                f"rank {rank} on a [{out_f}, {in_f}] layer; the adapter belongs to another base"
            )
        scale = _scaling(float(alpha), rank, bool(acfg.get("use_rslora", False)))
        cols = {(a, b): slice(c, c + n) for (a, b, n), c in _starts(blocks.get(theirs, []))}
        for lk in links:
            col = cols.get((lk.theirs_rows.start, lk.theirs_rows.stop), slice(0, rank)) if theirs in blocks else slice(0, rank)
            if col.stop > col.start:
                parts.setdefault(lk.ours, []).append((A[col], B[lk.theirs_rows, col], scale, lk.ours_rows))
    return parts


def _starts(blocks: list) -> list:
    out, c = [], 0
    for a, b, n in blocks:
        out.append(((a, b, n), c))
        c += n
    return out


@torch.no_grad()
def _load_saved(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy modules_to_save matrices in; ones with more rows than the vocabulary grow it (new
    special tokens), every module holding that matrix (a tied head too) with it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    vocab = getattr(model.config, "vocab_size", None)
    for name, t in tensors.items():
        p = params.get(name)
        if p is None:
            raise CheckpointError(f"{where}: {name!r} is not a parameter of this {model.family} model")
        if p.shape == t.shape:
            p.copy_(t)
        elif p.shape[0] == vocab and p.shape[1:] == t.shape[1:] and t.shape[0] > vocab and model.family != "bert":
            _replace_param(model, p, nn.Parameter(t.to(p.dtype).to(p.device)))
        else:
            raise CheckpointError(f"{where}: {name!r} has shape {tuple(t.shape)} but the model needs {tuple(p.shape)}")
    grown = {t.shape[0] for n, t in tensors.items() if t.shape[0] != vocab and params[n].shape[0] == vocab}
    if grown:
        left = [n for n, p in model.named_parameters() if p.shape[0] == vocab and n.split(".")[0] in _vocab_modules(model)]
        if len(grown) > 1 or left:
            raise CheckpointError(
                f"{where}: the adapter grows the vocabulary to {sorted(grown)} rows but not {left}; "
                "save the embedding and the output head together (modules_to_save=('embeddings',))"
            )
        model.config.vocab_size = grown.pop()
        if hasattr(model, "vocab_size"):
            model.vocab_size = model.config.vocab_size


def _vocab_modules(model: nn.Module) -> tuple[str, ...]:
    return SAVE_GROUPS.get(model.family, {}).get("embeddings", ())


def _replace_param(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    for m in model.modules():
        for k, v in list(m._parameters.items()):
            if v is old:
                m._parameters[k] = new
                if k == "weight" and isinstance(m, nn.Embedding):
                    m.num_embeddings = new.shape[0]
                elif k == "weight" and isinstance(m, nn.Linear):
                    m.out_features = new.shape[0]


# --- adapter directories ------------------------------------------------------------------


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_path(adapter_dir: str | os.PathLike) -> Path:
    """The base checkpoint an adapter directory names (relative paths count from the adapter)."""
    p = Path(adapter_dir)
    acfg, _ = _read_adapter(p)
    name = acfg.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(
            f"{p / ADAPTER_CONFIG}: no base_model_name_or_path; load the base yourself and call "
            "lmstack.models.lora.load_adapter(model, adapter_dir)"
        )
    base = Path(name) if Path(name).is_absolute() else p / name
    if not (base / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{p}: its base {name!r} ({base}) is not a checkpoint directory; put the base there or "
            "edit base_model_name_or_path in its adapter_config.json"
        )
    return base


def load_base(adapter_dir: str | os.PathLike):
    """(base model, its tokenizer) of the adapter at `adapter_dir`: an lmstack checkpoint or, for
    an adapter PEFT wrote, the Hugging Face directory it names."""
    from lmstack.models import checkpoint
    from lmstack.models.hf import from_hf, hf_model_type

    base = base_path(Path(adapter_dir))
    return from_hf(base) if hf_model_type(base) else checkpoint.load(base)


def load_adapter_dir(adapter_dir: str | os.PathLike):
    """(base model with the adapter loaded, tokenizer): the adapter's own tokenizer.json (a grown
    vocabulary) if it has one, else the base's (see `load_base`)."""
    p = Path(adapter_dir)
    model, tokenizer = load_base(p)
    load_adapter(model, p)
    if (p / TOKENIZER_FILE).is_file():
        from lmstack.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(p / TOKENIZER_FILE)
    return model.eval(), tokenizer


def describe(adapter_dir: str | os.PathLike) -> dict:
    """What `lmstack lora show` prints: rank, alpha, targets, trainable parameters, base."""
    p = Path(adapter_dir)
    acfg, tensors = _read_adapter(p)
    name = acfg.get("base_model_name_or_path")
    base = None if not name else str(Path(name) if Path(name).is_absolute() else p / name)
    return {
        "r": acfg.get("r"),
        "alpha": acfg.get("lora_alpha"),
        "rslora": bool(acfg.get("use_rslora")),
        "dropout": acfg.get("lora_dropout", 0.0),
        "targets": acfg.get("target_modules"),
        "modules_to_save": acfg.get("modules_to_save") or [],
        "rank_pattern": acfg.get("rank_pattern") or {},
        "parameters": sum(t.numel() for t in tensors.values()),
        "base": base,
        "family": acfg["lmstack"].get("family"),
    }

"""The decoder-only Transformer (GPT), in one file: config, norms, positions, attention, MLP, blocks.

One model with a few switches covers the common variants, so GPT-2 and Llama are two settings of
the same class rather than two codebases:

- `prenorm`: norm before each sub-layer (GPT-2, Llama) or after the residual add (original 2017);
- `norm`: LayerNorm (GPT-2) or RMSNorm (Llama);
- `pos`: learned absolute (GPT-2), fixed sinusoidal (2017) or rotary, RoPE (Llama);
- `mlp`: GELU with the tanh approximation (GPT-2's "gelu_new") or SwiGLU (Llama);
- `n_kv_head < n_head`: grouped-query attention (Llama 2/3); equal means multi-head attention;
- `bias`, `dropout`, `tie_embeddings`;
- what Qwen and Mistral add: `qkv_bias` (Qwen2), `qk_norm` and a `head_dim` apart from
  n_embd/n_head (Qwen3), `sliding_window` (Mistral: a token sees only the last W positions).

Attention always goes through `F.scaled_dot_product_attention` (fused kernels where the device
has them) with one rule for what a query sees (`attention_mask`): keys of its own document, at
its position or before, within the sliding window. A plain causal prompt passes SDPA's causal
flag instead of a mask. `forward(..., segments=)` packs several documents in one row: each
attends only to itself and counts its positions from 0, as if it ran alone.

Incremental decoding keeps a `KVCache`: per-layer key/value tensors preallocated for the whole
context plus a position counter, so each new token attends to the cached prefix and RoPE /
learned positions use the token's absolute position. Prompts of different lengths share a batch
left-padded: the cache remembers each row's padding, which no real token attends to and which
does not count in the row's positions. The sliding window is a mask over the cache, which keeps
every token (it is not a ring buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError, ContextLengthError, InputError
from lmstack.models.base import LanguageModel, padding_mask
from lmstack.models.checkpoint import TorchCheckpoint
from lmstack.models.sizes import Presets

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope")
MLPS = ("gelu", "swiglu")
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


_LLAMA_STYLE = dict(norm="rmsnorm", norm_eps=1e-6, pos="rope", mlp="swiglu", bias=False, tie_embeddings=False)
PRESETS = {
    "tiny": dict(block_size=64, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **_LLAMA_STYLE),
    # The four GPT-2 sizes (Radford et al. 2019), with GPT-2's vocabulary and 1024-token context.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPTConfig(Presets):
    """Sizes and switches; `GPTConfig.preset(name)` gives a named size or `d<N>` = `sized(N)`."""

    FAMILY: ClassVar[str] = "gpt"
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    vocab_size: int = 50257
    block_size: int = 1024  # longest context, in tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: n_head (multi-head); fewer: grouped-query attention
    mlp_hidden: int | None = None  # None: 4·n_embd for GELU, ~8/3·n_embd (multiple of 64) for SwiGLU
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True
    pos: str = "learned"
    rope_theta: float = 10000.0
    # Llama 3.1's long-context RoPE: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: dict | None = None
    mlp: str = "gelu"
    bias: bool = True  # biases in every linear layer and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # the output head shares the token-embedding matrix
    head_dim: int | None = None  # None: n_embd / n_head; Qwen3 sets it apart (q·heads need not be n_embd)
    qkv_bias: bool = False  # biases on q, k, v even where `bias` is off (Qwen2)
    qk_norm: bool = False  # a norm (of `norm`'s kind) over each head of q and k, before RoPE (Qwen3)
    sliding_window: int | None = None  # a token attends to itself and the W-1 positions before it (Mistral)

    def __post_init__(self):
        for name, value, allowed in (("norm", self.norm, NORMS), ("pos", self.pos, POSITIONS), ("mlp", self.mlp, MLPS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ConfigError("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim < 1 or (self.sliding_window is not None and self.sliding_window < 1):
            raise ConfigError(f"head_dim and sliding_window must be positive, got {self.head_dim} and {self.sliding_window}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got head_dim = {self.head_dim}")
        if self.rope_scaling is not None and (self.pos != "rope" or set(self.rope_scaling) != set(LLAMA3_SCALING)):
            raise ConfigError(f"rope_scaling needs pos='rope' and exactly the keys {LLAMA3_SCALING}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def sized(cls, depth: int, **overrides) -> "GPTConfig":
        """One size dial, nanoGPT's shape: `depth` layers, width 64·depth, heads of 64 (d12 = GPT-2 124M)."""
        return cls(**{"n_layer": depth, "n_embd": 64 * depth, "n_head": depth, **overrides})


# --- positions ----------------------------------------------------------------------------


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s fixed encodings: sin on even features, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def rope_tables(length: int, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for RoPE in the "rotate half" layout Llama checkpoints use
    (feature i pairs with i + head_dim/2, not with i + 1). `scaling` is Llama 3.1's: frequencies
    whose wavelength exceeds the original context / low_freq_factor are slowed by `factor`, those
    shorter than it / high_freq_factor are kept, and the ones between are blended."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling:
        factor, low, high, original = (scaling[k] for k in LLAMA3_SCALING)
        wavelen = 2 * math.pi / inv_freq
        keep = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - keep) * inv_freq / factor + keep * inv_freq
    angles = torch.outer(torch.arange(length, dtype=torch.float), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair of x [B, H, T, hd] by its position's angle (cos/sin are [T, hd],
    or [B, 1, T, hd] per row): x·cos + rotate_half(x)·sin."""
    return _Rope.apply(x, cos, sin)


class _Rope(torch.autograd.Function):
    """RoPE in three passes (a product, then two half-width multiply-adds) instead of the six of
    `x * cos + cat(-x2, x1) * sin`; its gradient is the rotation by the opposite angle, the same
    three passes."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x·cos + sign · rotate_half(x)·sin, where rotate_half(x) = (-x2, x1)."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-sign)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:], value=sign)
    return out


# --- layers -------------------------------------------------------------------------------


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default n_embd)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim or cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(dim or cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameter, same function) whose float32/64 CPU pass runs `_RMSNormFn`:
    torch's CPU rms_norm is composed of elementwise operations, and autograd's backward through them
    reads and writes the activations about ten times. Elsewhere (CUDA has a fused kernel; half
    precision wants its float32 statistics) torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)
            or self.weight is None
            or self.weight.dtype != x.dtype
        ):
            return super().forward(x)
        return _RMSNormFn.apply(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


class _RMSNormFn(torch.autograd.Function):
    """y = x · r · w with r = 1/sqrt(mean(x²) + eps) per row; with x̂ = x·r and u = g·w, the
    gradient is dx = r · (u - x̂ · mean(u · x̂)) and dw = Σ g · x̂ over rows."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        xhat = x * r
        u = grad * weight
        dx = torch.addcmul(u, xhat, torch.linalg.vecdot(u, xhat).div_(x.shape[-1]).unsqueeze(-1), value=-1).mul_(r)
        dw = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


# --- which keys a query sees --------------------------------------------------------------


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """SDPA's boolean mask, the one rule of every attention call: a query sees the keys of its own
    document at its position or before, and with a sliding `window` W only the last W of them
    (itself included, as Mistral counts). Positions are [T] and [S], or [B, T] and [B, S] per
    row; documents are [B, T] and [B, S] ids. A query always sees itself, so no row is empty
    (an empty one would give NaNs). Returns [T, S], or [B, 1, T, S] to broadcast over heads."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask if mask.dim() == 2 else mask[:, None]


def forward_layout(T: int, device, segments: torch.Tensor | None, window: int | None):
    """Positions [T] or [B, T] and the mask (None: SDPA's causal flag will do) of a forward pass
    without a cache. With `segments`, a token's position is the number of earlier tokens of its
    document, so each document counts from 0 as if it ran alone; padding (0) is a document of its
    own that nothing else sees."""
    t = torch.arange(T, device=device)
    if segments is None:
        return t, attention_mask(t, t, window=window) if window is not None and T > window else None
    before = attention_mask(t, t, segments, segments)
    pos = before.sum(-1)[:, 0] - 1
    return pos, before if window is None else attention_mask(pos, pos, segments, segments, window)


@dataclass
class KVCache:
    """Keys and values of every layer, [B, n_kv_head, capacity, head_dim] each, plus `pos`, the
    number of slots filled, and `offset`, each row's left padding (see `GPT.start`).

    A growing cache doubles its capacity when full, so memory follows the tokens actually decoded
    rather than the context limit (128k for Llama 3.1). A static cache (`slot` set) is allocated
    once, keeps its fill on the device as well and attends over all its slots through a mask, so
    every one-token step has the same shapes and reads no Python value: a compiled step is
    replayed as it is (torch.compile; CUDA graphs on a GPU). `GPT.start` makes one; `extend`
    fills it in place."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0
    offset: torch.Tensor | None = None  # [B] padding slots before each row's prompt; None: no padding
    slot: torch.Tensor | None = None  # static caches only: `pos` as a device tensor, for compiled steps

    @classmethod
    def empty(
        cls, cfg: GPTConfig, batch: int, device, dtype, static_capacity: int | None = None, offset: torch.Tensor | None = None
    ) -> "KVCache":
        shape = (batch, cfg.n_kv_head, static_capacity or 0, cfg.head_dim)
        k, v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)] for _ in "kv")
        slot = torch.zeros((), dtype=torch.long, device=device) if static_capacity else None
        if static_capacity and offset is None:  # one layout for every static cache, so one compiled step
            offset = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(k, v, 0, offset, slot)._pinned()

    def _pinned(self) -> "KVCache":
        """A static cache's tensors keep their addresses for its whole life; telling the compiler
        lets a CUDA graph write into them instead of copying them in and out at every step."""
        if self.slot is not None:
            for t in (*self.k, *self.v, self.slot, *([self.offset] if self.offset is not None else [])):
                torch._dynamo.mark_static_address(t)
        return self

    def positions(self, T: int) -> torch.Tensor:
        """[T] slots of the next T tokens."""
        if self.slot is not None:
            return self.slot + torch.arange(T, device=self.slot.device)
        return torch.arange(self.pos, self.pos + T, device=self.k[0].device)

    def mask(self, slots: torch.Tensor, window: int | None) -> torch.Tensor | None:
        """Which keys the queries at `slots` may see (`attention_mask`, the padding of each row being
        a document of its own). None where SDPA needs no mask: an unpadded prompt (its causal flag)
        or one new token of a growing cache (it sees every key), both within the window."""
        T = slots.shape[0]
        if self.slot is None and self.offset is None and (self.pos == 0 or T == 1) and (window is None or self.pos + T <= window):
            return None
        keys = torch.arange(self.k[0].shape[2] if self.slot is not None else self.pos + T, device=slots.device)
        if self.offset is None:
            return attention_mask(slots, keys, window=window)
        real = self.offset[:, None]
        return attention_mask(slots, keys, slots >= real, keys >= real, window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v; return the keys and values to attend over."""
        if self.slot is not None:
            slots = self.positions(k.shape[2])
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        for store, new in ((self.k, k), (self.v, v)):
            if end > store[layer].shape[2]:
                old = store[layer]
                # uninitialised: only slots below `end` are ever attended to, and those are written
                store[layer] = old.new_empty(*old.shape[:2], max(end, 2 * old.shape[2]), old.shape[3])
                store[layer][:, :, : self.pos] = old[:, :, : self.pos]
            store[layer][:, :, self.pos : end] = new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T
        if self.slot is not None:
            self.slot += T

    def select(self, index: torch.Tensor) -> "KVCache":
        """The rows `index` (repeats allowed) as a new cache, without the padding slots every one of
        them starts with (rows that left may have been the longest ones), so the slots in use stay
        those of the longest remaining row and never run past the context while it fits."""
        offset = self.offset[index] if self.offset is not None else None
        slot = self.slot.clone() if self.slot is not None else None
        cache = KVCache([k[index] for k in self.k], [v[index] for v in self.v], self.pos, offset, slot)
        return cache._trimmed()._pinned()

    def _trimmed(self) -> "KVCache":
        """Drop the leading slots that are padding in every row (in place): a row's positions count
        from its own first token, so shifting every row left changes nothing it computes."""
        drop = int(self.offset.min()) if self.offset is not None and len(self.offset) else 0
        if drop == 0:
            return self
        if self.slot is None:
            self.k, self.v = ([t[:, :, drop:] for t in store] for store in (self.k, self.v))
        else:  # a static cache keeps its shape; the slots rolled past the fill are masked out
            self.k, self.v = ([t.roll(-drop, 2) for t in store] for store in (self.k, self.v))
            self.slot -= drop
        self.pos -= drop
        self.offset = self.offset - drop
        if self.slot is None and int(self.offset.max()) == 0:
            self.offset = None  # no row is padded: one new token attends without a mask
        return self

    @classmethod
    def concat(cls, caches: list["KVCache"]) -> "KVCache":
        """The rows of `caches`, in order, as one cache: a cache that has filled fewer slots is
        left-padded to the longest one's fill (more padding in its rows' offsets), as `GPT.start`
        pads a short prompt; the slots every row pads are then dropped."""
        pos, first = max(c.pos for c in caches), caches[0]
        capacity = first.k[0].shape[2] if first.slot is not None else pos

        def shifted(t: torch.Tensor, filled: int) -> torch.Tensor:
            out = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
            out[:, :, pos - filled : pos] = t[:, :, :filled]
            return out

        k, v = ([torch.cat([shifted(getattr(c, kv)[i], c.pos) for c in caches]) for i in range(len(first.k))] for kv in "kv")
        offset = torch.cat(
            [
                (c.offset if c.offset is not None else c.k[0].new_zeros(c.k[0].shape[0], dtype=torch.long)) + pos - c.pos
                for c in caches
            ]
        )
        slot = torch.full((), pos, dtype=torch.long, device=first.k[0].device) if first.slot is not None else None
        return cls(k, v, pos, offset, slot)._trimmed()._pinned()


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """`layer(x)` for each of `layers`, linear maps of the same input; layers that offer `joint`
    (LoRA adapters, `models.lora`: one low-rank product of x for all of them) compute together."""
    joint = getattr(layers[0], "joint", None)
    return joint(x, layers) if joint is not None else tuple(m(x) for m in layers)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q, self.k, self.v)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Without a mask, several queries are a whole prompt (causal) and one is a new token that
        # sees every key; the flag lets SDPA pick its fused kernels.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GELU: down(gelu(up x)). SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        gate, up = project(x, self.gate, self.up)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, layer, mask, keep=None):
        """`keep` [B, T] (bool): after attention, only those positions go on, as [N, n_embd]."""
        if self.prenorm:
            x = x + self.drop(self.attn(self.norm1(x), rope, cache, layer, mask))
            x = x if keep is None else x[keep]
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, cache, layer, mask)))
        x = x if keep is None else x[keep]
        return self.norm2(x + self.drop(self.mlp(x)))


# --- the model ----------------------------------------------------------------------------


class GPT(nn.Module, LanguageModel, TorchCheckpoint):
    family = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.block_size
        self.static_capacity: int | None = None  # set by `compile_decoding`
        self._compiled_step = None
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        # Fixed tables are buffers outside the state dict: they are recomputed, never saved.
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.norm = make_norm(cfg) if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02/sqrt(2·layers).
        for block in self.blocks:
            for proj in (block.attn.o, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _logits(self, idx: torch.Tensor, cache: KVCache | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits after each of [B, T] ids, following the cache's prefix (or packed as `segments`).
        Tensor work only: the callers check the context and advance the cache, so a compiled step
        reads no Python state."""
        return self.lm_head(self._hidden(idx, cache, segments))

    def hidden_states(
        self, idx: torch.Tensor, segments: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] ids -> [B, T, n_embd]: the last layer's states after the final norm, which the
        output head reads; task heads (classification, sentence embeddings) read them instead.
        `keep` [B, T] (bool) -> [N, n_embd], the states of those positions alone: a loss on some
        positions (answers) needs no others, so the last block's feed-forward runs on them only."""
        self.check_context(idx.shape[1])
        return self._hidden(idx, segments=segments, keep=keep)

    def _hidden(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T, window = idx.shape[1], self.config.sliding_window
        if cache is None:
            pos, mask = forward_layout(T, idx.device, segments, window)
        else:
            slots = cache.positions(T)
            mask = cache.mask(slots, window)
            # [B, T] with padding: rows count from their first token.
            pos = slots if cache.offset is None else (slots - cache.offset[:, None]).clamp(min=0)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[pos]
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[pos], self.rope_sin[pos])
            if pos.dim() == 2:  # [B, T, hd] -> [B, 1, T, hd], to broadcast over heads
                rope = (rope[0][:, None], rope[1][:, None])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, mask, keep if layer == len(self.blocks) - 1 else None)
        return self.norm(x)

    def _next_logprobs(self, idx: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        if not last_only:
            return F.log_softmax(self._logits(idx, cache).float(), dim=-1)
        # A prompt's earlier positions only fill the cache: no head, and no last feed-forward, for them.
        keep = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        keep[:, -1] = True
        return F.log_softmax(self.lm_head(self._hidden(idx, cache, keep=keep)).float(), dim=-1)[:, None]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """[B, T] ids -> logits [B, T, V] for the token after each position; with targets [B, T]
        also the mean cross-entropy (targets of -100 are ignored).

        `segments` [B, T] packs several documents in a row, so short examples fill a batch without
        padding each one: equal non-zero ids form one document, which attends only to itself with
        positions from 0, as if it ran alone. 0 is padding: its logits mean nothing and its targets
        are ignored. A document's last target (the next document's first token) is the caller's
        to set to -100."""
        self.check_context(idx.shape[1])
        if segments is not None and segments.shape != idx.shape:
            raise InputError(f"segments must have the shape of the ids, {tuple(idx.shape)}; got {tuple(segments.shape)}")
        logits = self._logits(idx, segments=segments)
        if targets is None:
            return logits
        if segments is not None:
            targets = targets.masked_fill(segments == 0, -100)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # --- the language-model contract ----------------------------------------------------
    # Token ids are range-checked here rather than in `forward`, so training never pays a sync.

    def _check_ids(self, idx: torch.Tensor) -> None:
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise InputError(
                f"token ids must be in [0, {self.vocab_size}); got range [{int(idx.min())}, {int(idx.max())}]; "
                "does the tokenizer belong to this model?"
            )

    def next_token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_ids(tokens)
        self.check_context(tokens.shape[1])
        return F.log_softmax(self._logits(tokens).float(), dim=-1)

    def start(self, prompt: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[KVCache, torch.Tensor]:
        if prompt.shape[1] == 0:
            raise InputError("a GPT prompt needs at least one token (e.g. the tokenizer's <|endoftext|>)")
        self.check_context(prompt.shape[1])
        pad = padding_mask(prompt, lengths)
        offset = pad.sum(1) if pad is not None else None
        cache = KVCache.empty(self.config, prompt.shape[0], prompt.device, self.wte.weight.dtype, self.static_capacity, offset)
        cache, lp = self.extend(cache, prompt if pad is None else prompt.masked_fill(pad, 0), last_only=True)
        return cache, lp[:, -1]

    def step(self, state: KVCache, tokens: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        state, lp = self.extend(state, tokens[:, None])
        return state, lp[:, -1]

    def reorder(self, state: KVCache, index: torch.Tensor) -> KVCache:
        """The cache rows `index` (repeats allowed), for beam search; a new cache, `state` is kept."""
        return state.select(index)

    def concat(self, states: list[KVCache]) -> KVCache:
        """The rows of several decoding states as one batch, in order (continuous batching: rows
        that started apart, at different lengths, decode together from here on)."""
        return KVCache.concat(states)

    def extend(self, state: KVCache, tokens: torch.Tensor, last_only: bool = False) -> tuple[KVCache, torch.Tensor]:
        """Append [B, k] tokens to the cache in one pass (a chat's next turn, speculative-decoding
        drafts); returns [B, k, V] next-token log-probs for each of them ([B, 1, V] after the last
        alone with `last_only`)."""
        self._check_ids(tokens)
        T = tokens.shape[1]
        self.check_context(state.pos + T)
        if state.slot is not None and state.pos + T > state.k[0].shape[2]:
            raise ContextLengthError(
                f"the static KV cache holds {state.k[0].shape[2]} tokens and {state.pos + T} were asked for; "
                "pass a larger capacity to compile_decoding (at most the model's context)"
            )
        compiled = self._compiled_step is not None and state.slot is not None and T == 1
        lp = self._compiled_step(tokens, state) if compiled else self._next_logprobs(tokens, state, last_only)
        state.advance(T)
        return state, lp

    def compile_decoding(self, capacity: int | None = None, mode: str | None = None) -> "GPT":
        """From now on, decode through a static KV cache of `capacity` slots (default: the whole
        context) and a one-token step compiled with `torch.compile`. The first steps pay the
        compile (tens of seconds: once for a batch of one row, once more for every larger batch
        size, the batch dimension then being symbolic); later ones run without Python overhead,
        and on a GPU (mode "reduce-overhead", the default there) replay as CUDA graphs, which is
        where the time of small-batch decoding goes. Prompts are read uncompiled."""
        if capacity is not None and not 1 <= capacity <= self.config.block_size:
            raise InputError(f"the static cache capacity must be in [1, {self.config.block_size}], got {capacity}")
        self.static_capacity = capacity or self.config.block_size
        if mode is None and self.wte.weight.is_cuda:
            mode = "reduce-overhead"
        self._compiled_step = torch.compile(self._next_logprobs, fullgraph=True, dynamic=None, mode=mode)
        return self

    # --- size ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once. `non_embedding`: only the blocks and final
        norm, Kaplan et al.'s N for scaling laws (no token or position embedding, no output head)."""
        if non_embedding:
            return sum(p.numel() for m in (self.blocks, self.norm) for p in m.parameters())
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token at context `seq_len` (default: block_size), as in PaLM (Chowdhery
        et al. 2022, app. B) and nanoGPT: forward = 2·N + 4·n_layer·n_embd·seq_len, where N is
        every weight matrix that multiplies activations (the output head included, tied or not;
        embedding lookups, norms and biases excluded) and the second term is QKᵀ and attention·V
        over the full square (the causal half is not discounted). Training (forward + backward)
        is 3× forward: 6·N + 12·n_layer·n_embd·seq_len."""
        T = self.config.block_size if seq_len is None else seq_len
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        forward = 2 * n + 4 * self.config.n_layer * self.config.n_head * self.config.head_dim * T
        return 3 * forward if training else forward

    # --- files --------------------------------------------------------------------------


def mfu(flops_per_token: float, tokens_per_s: float, device_peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of the device's peak that the model's matmuls use
    (PaLM's MFU; pass `flops_per_token(training=True)` while training)."""
    return flops_per_token * tokens_per_s / device_peak_flops

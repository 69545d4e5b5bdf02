"""Encoder-decoder Transformer in the T5 style (Raffel et al. 2020): p(y | x).

What makes it T5 rather than the 2017 Transformer: pre-norm blocks with RMS-style LayerNorm and
no biases anywhere; no absolute positions, but a learned bias per head added to the attention
scores, indexed by the bucketed relative distance (exact for near tokens, logarithmic up to
`max_distance`), computed in the first layer and shared by the others; unscaled dot-product
attention (the scale is folded into the initialisation); one embedding matrix shared by
encoder, decoder and (tied) output, whose input is then scaled by d_model^-0.5.

Layout and names follow `transformers.T5ForConditionalGeneration`, so `from_hf_t5` imports a
Hugging Face checkpoint. The decoder starts from `decoder_start_token_id` (the pad id in T5);
`start(src)` then `step` decode incrementally with a self-attention KV cache and cross-attention
keys/values computed once. Targets for span-corruption pretraining or any sequence-to-sequence
task use -100 for ignored positions, as in Hugging Face.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import CheckpointError, ConfigError, InputError
from lmstack.models.base import padding_mask
from lmstack.models.checkpoint import TorchCheckpoint, assign_weights
from lmstack.models.hf_dir import read_hf_dir, take_tensors
from lmstack.models.sizes import Presets

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}

PRESETS = {
    "tiny": dict(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, n_layers=2, n_decoder_layers=2, n_heads=4, num_buckets=8, max_distance=32
    ),
    # Raffel et al. 2020: t5-small (60M) and t5-base (220M), ReLU feed-forward, tied embeddings.
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, n_layers=6, n_decoder_layers=6, n_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, n_layers=12, n_decoder_layers=12, n_heads=12),
}


@dataclass
class T5Config(Presets):
    FAMILY: ClassVar[str] = "t5"
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width; heads · d_kv need not equal d_model
    d_ff: int = 2048
    n_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    activation: str = "relu"
    gated: bool = False  # T5 v1.1: act(x W0) * (x W1) instead of act(x W)
    tie_embeddings: bool = True
    scale_decoder_output: bool = True  # T5 1.0 scales the last hidden state by d_model^-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4:
            raise ConfigError("need num_buckets >= 4 and max_distance > num_buckets / 4 for relative position buckets")

    @classmethod
    def sized(cls, dial: int, **overrides) -> "T5Config":
        """One size dial = depth: `dial` encoder and decoder layers, width 64·dial, 64-wide heads."""
        d = 64 * dial
        return cls(
            **{"d_model": d, "d_kv": 64, "d_ff": 4 * d, "n_layers": dial, "n_decoder_layers": dial, "n_heads": dial, **overrides}
        )


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of (key position - query position): half the buckets hold exact small distances,
    the rest grow logarithmically up to `max_distance`, beyond which all share the last bucket.
    Bidirectional (encoder) attention spends half the buckets on keys after the query; causal
    attention folds everything onto distances into the past."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_bucket = (
        exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    )
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


class RelativeBias(nn.Module):
    """Learned per-head bias for each relative-distance bucket -> [1, heads, queries, keys]."""

    def __init__(self, c: T5Config, bidirectional: bool):
        super().__init__()
        self.c, self.bidirectional = c, bidirectional
        self.weight = nn.Parameter(torch.empty(c.num_buckets, c.n_heads))

    def forward(self, n_queries: int, n_keys: int, offset: int = 0) -> torch.Tensor:
        q = torch.arange(offset, offset + n_queries, device=self.weight.device)[:, None]
        k = torch.arange(n_keys, device=self.weight.device)[None, :]
        buckets = relative_position_bucket(k - q, self.bidirectional, self.c.num_buckets, self.c.max_distance)
        return self.weight[buckets].permute(2, 0, 1)[None]


class Attention(nn.Module):
    """Multi-head attention without biases or 1/sqrt(d) scaling; `bias` carries positions and masks."""

    def __init__(self, c: T5Config):
        super().__init__()
        inner = c.n_heads * c.d_kv
        self.h, self.p = c.n_heads, c.dropout
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)

    def split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.h, -1).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(x, self.k), self.split(x, self.v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = self.split(x, self.q)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.p if self.training else 0.0, scale=1.0
        )
        return self.o(a.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[c.activation]
        if c.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))
        return self.wo(self.drop(h))


class EncoderBlock(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps), Attention(c)
        self.ff_norm, self.ff = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps), FeedForward(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, *self.attn.kv(h), bias))
        return x + self.drop(self.ff(self.ff_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.self_norm, self.self_attn = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps), Attention(c)
        self.cross_norm, self.cross_attn = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps), Attention(c)
        self.ff_norm, self.ff = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps), FeedForward(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, self_kv, cross_kv, self_bias, cross_bias):
        """`self_kv` holds the keys/values of earlier positions (empty at the start); returns the
        output and the extended self-attention keys/values."""
        h = self.self_norm(x)
        k, v = self.self_attn.kv(h)
        k, v = torch.cat([self_kv[0], k], 2), torch.cat([self_kv[1], v], 2)
        x = x + self.drop(self.self_attn(h, k, v, self_bias))
        x = x + self.drop(self.cross_attn(self.cross_norm(x), *cross_kv, cross_bias))
        return x + self.drop(self.ff(self.ff_norm(x))), (k, v)


@dataclass
class DecoderState:
    """Incremental decoding state: encoder keys/values per layer (fixed), the growing
    self-attention cache per layer, the source padding bias and the number of decoded tokens."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_bias: torch.Tensor
    length: int = 0


class T5(nn.Module, TorchCheckpoint):
    family = "t5"
    config_class = T5Config
    max_context = None  # relative positions: no fixed context window

    def __init__(self, config: T5Config):
        super().__init__()
        c = self.config = config
        self.vocab_size = c.vocab_size
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.enc_pos = RelativeBias(c, bidirectional=True)
        self.dec_pos = RelativeBias(c, bidirectional=False)
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layers))
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_decoder_layers))
        self.enc_norm = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps)
        self.dec_norm = nn.RMSNorm(c.d_model, eps=c.layer_norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.drop = nn.Dropout(c.dropout)
        self._init()

    def _init(self) -> None:
        """Mesh TensorFlow's initialisation, which stands in for the missing 1/sqrt(d_kv) scale."""
        c, std = self.config, self.config.d_model**-0.5
        nn.init.normal_(self.embed.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, Attention):
                nn.init.normal_(m.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
                for w in (m.k.weight, m.v.weight):
                    nn.init.normal_(w, std=std)
                nn.init.normal_(m.o.weight, std=(c.n_heads * c.d_kv) ** -0.5)
            elif isinstance(m, FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(m, name):
                        nn.init.normal_(getattr(m, name).weight, std=std)
                nn.init.normal_(m.wo.weight, std=c.d_ff**-0.5)
            elif isinstance(m, RelativeBias):
                nn.init.normal_(m.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)

    # --- pieces -------------------------------------------------------------------------

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(
                f"{what} token ids must be in [0, {self.vocab_size}); got range [{int(ids.min())}, {int(ids.max())}]"
            )

    def _padding_bias(self, src: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, 1, S]: 0 for source tokens, a huge negative for padding (default: the pad id)."""
        keep = (src != self.config.pad_token_id) if src_mask is None else src_mask.bool()
        bias = torch.zeros(keep.shape, dtype=torch.float32, device=src.device)
        return bias.masked_fill(~keep, torch.finfo(torch.float32).min)[:, None, None]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] source ids -> [B, S, d_model] encoder states. Padding is where `src_mask` is 0,
        by default where src is the pad id (T5 never uses the pad id as a source token)."""
        self._check_ids(src, "source")
        S = src.shape[1]
        bias = self.enc_pos(S, S) + self._padding_bias(src, src_mask)
        x = self.drop(self.embed(src))
        for block in self.encoder:
            x = block(x, bias)
        return self.drop(self.enc_norm(x))

    def _new_state(self, enc: torch.Tensor, src: torch.Tensor, src_mask) -> DecoderState:
        B, dtype = enc.shape[0], enc.dtype
        empty = enc.new_zeros(B, self.config.n_heads, 0, self.config.d_kv, dtype=dtype)
        return DecoderState(
            cross_kv=[block.cross_attn.kv(enc) for block in self.decoder],
            self_kv=[(empty, empty)] * len(self.decoder),
            cross_bias=self._padding_bias(src, src_mask),
        )

    def _decode(self, state: DecoderState, tgt_in: torch.Tensor) -> torch.Tensor:
        """Run [B, T] decoder inputs after the `state.length` already decoded; returns logits [B, T, V]
        and extends the state's caches in place."""
        self._check_ids(tgt_in, "target")
        T, past = tgt_in.shape[1], state.length
        causal = torch.ones(T, past + T, dtype=torch.bool, device=tgt_in.device).tril(past)
        self_bias = self.dec_pos(T, past + T, offset=past).masked_fill(~causal, torch.finfo(torch.float32).min)
        x = self.drop(self.embed(tgt_in))
        for i, block in enumerate(self.decoder):
            x, state.self_kv[i] = block(x, state.self_kv[i], state.cross_kv[i], self_bias, state.cross_bias)
        state.length += T
        x = self.drop(self.dec_norm(x))
        if self.config.scale_decoder_output:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def shift_right(self, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder input: the start token, then the targets but the last (-100 -> pad)."""
        start = tgt.new_full((tgt.shape[0], 1), self.config.decoder_start_token_id)
        return torch.cat([start, tgt[:, :-1].masked_fill(tgt[:, :-1] == -100, self.config.pad_token_id)], 1)

    # --- training and scoring -----------------------------------------------------------

    def _teacher_forced(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, T, V] at every target position, the decoder fed `shift_right(tgt)`."""
        return self._decode(self._new_state(self.encode(src, src_mask), src, src_mask), self.shift_right(tgt))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None):
        """Teacher forcing: logits [B, T, V] for every target position and the mean cross-entropy
        over targets that are not -100 (span corruption: src = corrupted text, tgt = sentinels
        and the spans they replaced)."""
        logits = self._teacher_forced(src, tgt, src_mask)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
        return logits, loss

    def target_logprobs(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, V] float32: log p(tgt_t = v | tgt_<t, src) at every target position, the
        encoder-decoder's counterpart of a causal model's `next_token_logprobs` (scoring reads it).
        Targets are right-padded freely: position t never sees the targets after it."""
        return self._teacher_forced(src, tgt, src_mask).float().log_softmax(-1)

    def log_prob(
        self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B] log p(y | x) = sum over target tokens of log p(y_t | y_<t, x). Padding in `tgt` is
        where `tgt_mask` is 0, by default where tgt is the pad id (end targets with the eos id)."""
        keep = (tgt != self.config.pad_token_id) if tgt_mask is None else tgt_mask.bool()
        lp = self.target_logprobs(src, tgt, src_mask).gather(-1, tgt[..., None]).squeeze(-1)
        return (lp * keep).sum(-1)

    # --- incremental decoding (for generation) ------------------------------------------

    @torch.no_grad()
    def start(
        self,
        src: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        prompt: torch.Tensor | None = None,
        src_mask: torch.Tensor | None = None,
    ):
        """Encode the source once and feed the start token (+ an optional [B, P] decoder prompt);
        returns (state, [B, V] log-probs of the next target token). Sources of different lengths
        are left-padded with `lengths`, as for causal models, or marked by `src_mask` (1 = token);
        with neither, every source token is real (relative positions make the padding's place
        irrelevant)."""
        if src_mask is None:
            pad = padding_mask(src, lengths)
            src_mask = torch.ones_like(src, dtype=torch.bool) if pad is None else ~pad
        state = self._new_state(self.encode(src, src_mask), src, src_mask)
        start = src.new_full((src.shape[0], 1), self.config.decoder_start_token_id)
        tgt_in = start if prompt is None else torch.cat([start, prompt], 1)
        return state, self._decode(state, tgt_in)[:, -1].float().log_softmax(-1)

    @torch.no_grad()
    def step(self, state: DecoderState, tokens: torch.Tensor):
        """Append one [B] target token per row; returns (state, [B, V] next-token log-probs)."""
        return state, self._decode(state, tokens[:, None])[:, -1].float().log_softmax(-1)

    def reorder(self, state: DecoderState, index: torch.Tensor) -> DecoderState:
        """Rows `index` ([B'] ids, repeats allowed) of a decoding state, in that order: beam search
        keeps its best beams' caches (the contract's optional `reorder`)."""

        def rows(kv):
            return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]

        return DecoderState(rows(state.cross_kv), rows(state.self_kv), state.cross_bias.index_select(0, index), state.length)

    # --- size ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once; `non_embedding`: only the blocks, position
        biases and final norms (Kaplan et al.'s N, as for GPT)."""
        if non_embedding:
            return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("embed.", "lm_head.")))
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, src_len: int = 512, tgt_len: int = 114, training: bool = True) -> int:
        """Matmul FLOPs of one (src_len, tgt_len) example divided by its src_len + tgt_len tokens,
        the convention of `GPT.flops_per_token` (2 per weight per token it multiplies, QKᵀ and
        attention·V over the full square, training 3× forward). Cross-attention keys/values are
        projected once per source token; the output head runs on target tokens only. Defaults:
        T5's pretraining shape, 512 corrupted input tokens and 114 target tokens."""
        c, S, T = self.config, src_len, tgt_len
        inner = c.n_heads * c.d_kv
        attn_w, ff_w = 4 * c.d_model * inner, (3 if c.gated else 2) * c.d_model * c.d_ff
        enc = c.n_layers * (2 * (attn_w + ff_w) * S + 4 * inner * S * S)
        dec = c.n_decoder_layers * (
            2 * (attn_w + ff_w + 2 * c.d_model * inner) * T  # self-attn, ff, cross q and o
            + 2 * 2 * c.d_model * inner * S  # cross k and v over the source
            + 4 * inner * T * T
            + 4 * inner * T * S
        )
        forward = enc + dec + 2 * c.d_model * c.vocab_size * T
        return (3 if training else 1) * forward // (S + T)

    # --- files --------------------------------------------------------------------------


def from_hf_t5(hf_dir: str | os.PathLike):
    """Import a local Hugging Face `T5ForConditionalGeneration` directory -> (T5, tokenizer or None).

    T5 1.0 (ReLU, tied and scaled output) and 1.1 / Flan (gated-GELU) layouts are both read;
    the output head is untied when the file holds an `lm_head.weight` that differs from the
    shared embedding. The tokenizer is the directory's `tokenizer.json` (T5's SentencePiece
    Unigram, run by Hugging Face's tokenizers library), None without one."""
    from lmstack.models.hf import hf_tokenizer

    hf_dir = Path(hf_dir)
    cfg, tensors = read_hf_dir(hf_dir, "t5")
    proj = cfg.get("feed_forward_proj", "relu")
    gated, act = proj.startswith("gated-"), proj.removeprefix("gated-")
    act = cfg.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else act)  # as transformers does
    # Newer configs say whether to scale outputs; older ones tie it to tie_word_embeddings.
    scale = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True) is not False)
    shared = take_tensors(tensors, ["shared.weight"], hf_dir)["shared.weight"]
    untied = "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], shared)
    try:
        config = T5Config(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["d_model"],
            d_kv=cfg["d_kv"],
            d_ff=cfg["d_ff"],
            n_layers=cfg["num_layers"],
            n_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
            n_heads=cfg["num_heads"],
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            dropout=cfg.get("dropout_rate", 0.1),
            layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
            activation=act,
            gated=gated,
            tie_embeddings=not untied,
            scale_decoder_output=scale,
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=cfg.get("eos_token_id", 1),
            decoder_start_token_id=cfg.get("decoder_start_token_id", cfg.get("pad_token_id", 0)),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: cannot build a T5 config ({type(e).__name__}: {e})") from None
    names = hf_names(config)
    got = take_tensors(tensors, list(names), hf_dir)
    model = T5(config)
    assign_weights(model, {ours: got[theirs] for theirs, ours in names.items()}, str(hf_dir))
    return model.eval(), hf_tokenizer(hf_dir, config.vocab_size)


def hf_names(config: T5Config) -> dict[str, str]:
    """Hugging Face `T5ForConditionalGeneration` tensor name -> lmstack name, for every tensor of
    the model (the import reads them; LoRA adapters name their modules by them)."""
    ff = ["wi_0", "wi_1", "wo"] if config.gated else ["wi", "wo"]
    names = {
        "shared.weight": "embed.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "enc_pos.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "dec_pos.weight",
        "encoder.final_layer_norm.weight": "enc_norm.weight",
        "decoder.final_layer_norm.weight": "dec_norm.weight",
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for stack, n, sublayers in [
        ("encoder", config.n_layers, [("SelfAttention", "attn", "attn_norm")]),
        (
            "decoder",
            config.n_decoder_layers,
            [("SelfAttention", "self_attn", "self_norm"), ("EncDecAttention", "cross_attn", "cross_norm")],
        ),
    ]:
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer.", f"{stack}.{i}."
            for j, (theirs, attn, norm) in enumerate(sublayers):
                names |= {f"{hf}{j}.{theirs}.{p}.weight": f"{ours}{attn}.{p}.weight" for p in "qkvo"}
                names[f"{hf}{j}.layer_norm.weight"] = f"{ours}{norm}.weight"
            j = len(sublayers)
            names |= {f"{hf}{j}.DenseReluDense.{p}.weight": f"{ours}ff.{p}.weight" for p in ff}
            names[f"{hf}{j}.layer_norm.weight"] = f"{ours}ff_norm.weight"
    return names

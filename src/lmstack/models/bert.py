"""Encoder-only Transformer (BERT, Devlin et al. 2019): bidirectional attention over a padded batch,
with the masked-LM head, the next-sentence head and a pooled classification head.

Post-LayerNorm blocks, learned absolute positions, token-type (segment) embeddings and an MLM
decoder tied to the input embeddings, exactly as `transformers.BertForPreTraining`, so
`from_hf_bert` imports a Hugging Face checkpoint tensor for tensor. A masked LM is not a causal
LM: it scores a sentence by its pseudo-log-likelihood (Salazar et al. 2020), the sum over
positions of log p(x_i | x with position i masked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import CheckpointError, ConfigError, ContextLengthError, InputError
from lmstack.models.checkpoint import TorchCheckpoint, assign_weights
from lmstack.models.hf_dir import read_hf_dir, take_tensors
from lmstack.models.sizes import Presets

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


PRESETS = {
    "tiny": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_position=128),
    "bert-base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "bert-large": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
}


@dataclass
class BERTConfig(Presets):
    FAMILY: ClassVar[str] = "bert"
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    activation: str = "gelu"
    n_labels: int = 0  # > 0 adds a pooled classification head with this many classes
    # Ids the masked-LM contract needs; pseudo-log-likelihood skips cls/sep (Salazar et al.).
    mask_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    @classmethod
    def sized(cls, dial: int, **overrides) -> "BERTConfig":
        """One size dial = depth: `dial` layers of width 64·dial, 64-wide heads, 4× feed-forward."""
        d = 64 * dial
        return cls(**{"n_layers": dial, "d_model": d, "n_heads": dial, "d_ff": 4 * d, **overrides})


class Block(nn.Module):
    """Post-LN encoder block: x = LN(x + Attn(x)); x = LN(x + FF(x))."""

    def __init__(self, c: BERTConfig):
        super().__init__()
        self.n_heads, self.p = c.n_heads, c.dropout
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.attn_out = nn.Linear(c.d_model, c.d_model)
        self.attn_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.ff_in = nn.Linear(c.d_model, c.d_ff)
        self.ff_out = nn.Linear(c.d_ff, c.d_model)
        self.ff_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.act = ACTIVATIONS[c.activation]
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        x = self.attn_norm(x + self.drop(self.attn_out(a.transpose(1, 2).reshape(B, T, D))))
        return self.ff_norm(x + self.drop(self.ff_out(self.act(self.ff_in(x)))))


class BERT(nn.Module, TorchCheckpoint):
    family = "bert"
    config_class = BERTConfig

    def __init__(self, config: BERTConfig):
        super().__init__()
        c = self.config = config
        self.max_context = c.max_position
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_position, c.d_model)
        self.embed_types = nn.Embedding(c.type_vocab_size, c.d_model)
        self.embed_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        # masked-LM head: transform, then the (tied) embedding matrix as decoder
        self.mlm_dense = nn.Linear(c.d_model, c.d_model)
        self.mlm_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        # pooled heads read the first ([CLS]) position
        self.pooler = nn.Linear(c.d_model, c.d_model)
        self.nsp = nn.Linear(c.d_model, 2)
        self.classifier = nn.Linear(c.d_model, c.n_labels) if c.n_labels else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] ids (mask: 1 = token, 0 = padding) -> [B, T, d_model] contextual states."""
        B, T = ids.shape
        if T > self.config.max_position:
            raise ContextLengthError(
                f"sequence of {T} tokens is longer than the model's context of {self.config.max_position}; "
                "truncate or split the input"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise InputError(
                f"token ids must be in [0, {self.config.vocab_size}); got range [{int(ids.min())}, {int(ids.max())}]"
            )
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(T, device=ids.device)) + self.embed_types(types)
        x = self.drop(self.embed_norm(x))
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.mlm_norm(ACTIVATIONS[self.config.activation](self.mlm_dense(hidden)))
        return F.linear(h, self.embed_tokens.weight, self.mlm_bias)

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ):
        """Masked-LM logits [B, T, V] (+ mean cross-entropy over targets != -100)."""
        logits = self.mlm_logits(self.encode(ids, attention_mask, token_type_ids))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def pooled(self, ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """tanh(W h_[CLS] + b): the sentence vector both pooled heads read."""
        return torch.tanh(self.pooler(self.encode(ids, attention_mask, token_type_ids)[:, 0]))

    def nsp_logits(self, ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """[B, 2] logits: class 0 = segment B follows segment A, class 1 = random segment."""
        return self.nsp(self.pooled(ids, attention_mask, token_type_ids))

    def classify(self, ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """[B, n_labels] logits of the pooled classification head (fine-tuning)."""
        if self.classifier is None:
            raise InputError("this BERT has no classification head; build it with n_labels > 0")
        return self.classifier(self.drop(self.pooled(ids, attention_mask, token_type_ids)))

    @torch.no_grad()
    def pseudo_log_likelihood(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """[B, T] ids -> [B] PLL = sum_i log p(x_i | x_{\\i}) (Salazar et al. 2020).

        Each scored position is replaced by the mask token in its own copy of the sentence and the
        copies run in batches of `batch_size`. Padding and the cls/sep tokens are not scored."""
        c = self.config
        if c.mask_token_id is None:
            raise InputError("pseudo-log-likelihood needs config.mask_token_id (the id of the mask token)")
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        scored = mask.clone()
        for special in (c.cls_token_id, c.sep_token_id):
            if special is not None:
                scored &= tokens != special
        rows, cols = scored.nonzero(as_tuple=True)
        out = torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        for s in range(0, len(rows), batch_size):
            r, i = rows[s : s + batch_size], cols[s : s + batch_size]
            copies = tokens[r].clone()
            n = torch.arange(len(r), device=tokens.device)
            copies[n, i] = c.mask_token_id
            logits = self.mlm_logits(self.encode(copies, mask[r]))[n, i].float()
            out.index_add_(0, r, logits.log_softmax(-1)[n, tokens[r, i]])
        return out

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied decoder counted once; `non_embedding`: only the encoder blocks
        (Kaplan et al.'s N, as for GPT)."""
        return sum(p.numel() for p in (self.layers if non_embedding else self).parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token, the convention of `GPT.flops_per_token`: forward = 2 × the
        weight matrices every token passes through (blocks, MLM transform, tied decoder) +
        4·n_layers·d_model·seq_len for the attention products; training 3× forward. The pooled
        heads run once per sequence and are left out."""
        c = self.config
        T = c.max_position if seq_len is None else seq_len
        n = sum(m.weight.numel() for m in [*self.layers.modules(), self.mlm_dense] if isinstance(m, nn.Linear))
        forward = 2 * (n + c.vocab_size * c.d_model) + 4 * c.n_layers * c.d_model * T
        return 3 * forward if training else forward


def from_hf_bert(hf_dir: str | os.PathLike):
    """Import a local Hugging Face `BertForMaskedLM` (or `BertForPreTraining`) directory.

    Returns (BERT, tokenizer or None): the tokenizer is the directory's `tokenizer.json`
    (WordPiece, run by Hugging Face's tokenizers library). The mask/cls/sep ids come from it, or
    from `vocab.txt`. The pooler and next-sentence weights are imported when present
    (BertForPreTraining) and keep their fresh initialisation otherwise (BertForMaskedLM has none).
    """
    from lmstack.models.hf import hf_tokenizer
    from lmstack.tokenizers.hf_wrapped import HFTokenizer

    hf_dir = Path(hf_dir)
    cfg, tensors = read_hf_dir(hf_dir, "bert")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{hf_dir}: position_embedding_type {cfg['position_embedding_type']!r} is not supported (only 'absolute')"
        )
    if cfg.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{hf_dir}: untied BERT decoder weights are not supported")
    try:
        config = BERTConfig(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            d_ff=cfg["intermediate_size"],
            max_position=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            dropout=cfg.get("hidden_dropout_prob", 0.1),
            activation=cfg.get("hidden_act", "gelu"),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: cannot build a BERT config ({type(e).__name__}: {e})") from None
    tokenizer = hf_tokenizer(hf_dir, config.vocab_size)
    special = _vocab_ids(hf_dir / "vocab.txt", {"mask_token_id": "[MASK]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]"})
    if isinstance(tokenizer, HFTokenizer):
        roles = {f"{r}_id": tokenizer.role_id(r) for r in ("mask_token", "cls_token", "sep_token")}
        special |= {field: i for field, i in roles.items() if i is not None}
    config = replace(config, **special)
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    model = BERT(config)
    names = hf_names(config)
    for i in range(config.n_layers):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):  # q, k, v -> one fused projection
            qkv = [f"{hf}attention.self.{p}.{kind}" for p in ("query", "key", "value")]
            tensors[f"{hf}qkv.{kind}"] = torch.cat(list(take_tensors(tensors, qkv, hf_dir).values()))
    optional = {
        "pooler.dense.weight": "pooler.weight",
        "pooler.dense.bias": "pooler.bias",
        "cls.seq_relationship.weight": "nsp.weight",
        "cls.seq_relationship.bias": "nsp.bias",
    }
    got = take_tensors(tensors, list(names), hf_dir)
    state = {ours: got[theirs] for theirs, ours in names.items()}
    fresh = model.state_dict()
    state |= {ours: tensors.get(k, fresh[ours]) for k, ours in optional.items()}
    assign_weights(model, state, str(hf_dir))
    return model.eval(), tokenizer


def hf_names(config: BERTConfig) -> dict[str, str]:
    """Hugging Face tensor name (without BertForMaskedLM's `bert.` prefix) -> lmstack name, for
    every tensor the import needs; q, k and v appear as one `encoder.layer.N.qkv`, which
    `from_hf_bert` fuses from query, key and value (LoRA adapters split it the same way)."""
    names = {
        "embeddings.word_embeddings.weight": "embed_tokens.weight",
        "embeddings.position_embeddings.weight": "embed_positions.weight",
        "embeddings.token_type_embeddings.weight": "embed_types.weight",
        "embeddings.LayerNorm.weight": "embed_norm.weight",
        "embeddings.LayerNorm.bias": "embed_norm.bias",
        "cls.predictions.transform.dense.weight": "mlm_dense.weight",
        "cls.predictions.transform.dense.bias": "mlm_dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
        "cls.predictions.bias": "mlm_bias",
    }
    for i in range(config.n_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        for a, b in [
            ("attention.output.dense", "attn_out"),
            ("attention.output.LayerNorm", "attn_norm"),
            ("intermediate.dense", "ff_in"),
            ("output.dense", "ff_out"),
            ("output.LayerNorm", "ff_norm"),
            ("qkv", "qkv"),
        ]:
            names |= {f"{hf}{a}.weight": f"{ours}{b}.weight", f"{hf}{a}.bias": f"{ours}{b}.bias"}
    return names


def _vocab_ids(vocab: Path, wanted: dict[str, str]) -> dict[str, int]:
    """Field -> id of the named tokens in a WordPiece vocab.txt (empty if the file is absent)."""
    if not vocab.exists():
        return {}
    index = {line.rstrip("\n"): i for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines(True))}
    return {field: index[tok] for field, tok in wanted.items() if tok in index}

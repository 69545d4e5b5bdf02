"""Pretraining objectives as modules: `forward(batch) -> loss` around the model they train.

Wrapping the model lets the loop treat every objective alike, and lets DDP / FSDP wrap the
objective itself, so that one forward through the wrapper covers everything that gets a
gradient (ELECTRA's generator and discriminator head included). `self.model` is always the
model a checkpoint exports as a family directory; other submodules (ELECTRA's generator and
head) are training-only and saved beside it.

Batches come from `lmstack.data.batches.BatchMaker`; see there for what each holds.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.batches import CLS, SEP, span_counts
from lmstack.errors import InputError
from lmstack.tokenizers import EOT, MASK, PAD, Tokenizer

# Which families each objective can train.
FAMILIES = {"clm": ("gpt", "rnn", "ffn"), "mlm": ("bert",), "nsp": ("bert",), "span": ("t5",), "rtd": ("bert",)}


@dataclasses.dataclass
class MLMOptions:
    """[mlm]: BERT's masking (also used by nsp and rtd)."""

    probability: float = 0.15

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")


@dataclasses.dataclass
class SpanOptions:
    """[span]: T5's span corruption."""

    noise_density: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self):
        if not (0 < self.noise_density < 1 and self.mean_span >= 1):
            raise ValueError("need 0 < noise_density < 1 and mean_span >= 1")


@dataclasses.dataclass
class RTDOptions:
    """[rtd]: ELECTRA's discriminator weight and generator overrides."""

    weight: float = 50.0
    generator: dict = dataclasses.field(default_factory=dict)


def objective_options(cfg) -> tuple[MLMOptions, SpanOptions, RTDOptions]:
    """The objective tables of a TrainConfig, checked (an InputError names a bad key or value)."""
    from lmstack.training.config import table

    return table(MLMOptions, cfg.mlm, "mlm"), table(SpanOptions, cfg.span, "span"), table(RTDOptions, cfg.rtd, "rtd")


def special_overrides(family: str, tokenizer: Tokenizer) -> dict:
    """Model config fields that name special-token ids, filled from the tokenizer."""
    ids = tokenizer.special_tokens
    if family == "bert":
        names = {"mask_token_id": MASK, "cls_token_id": CLS, "sep_token_id": SEP}
        return {field: ids[token] for field, token in names.items() if token in ids}
    if family == "t5":
        return {"pad_token_id": ids[PAD], "decoder_start_token_id": ids[PAD], "eos_token_id": ids[EOT]}
    return {}


class CausalLM(nn.Module):
    """Next-token cross-entropy, for every causal family (GPT, RNN, feed-forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["idx"], batch["targets"])[1]

    def flops_per_token(self, block_size: int) -> float:
        return self.model.flops_per_token(block_size)


class MaskedLM(CausalLM):
    """BERT's masked-LM cross-entropy over the chosen positions."""

    def forward(self, batch):
        return self.model(batch["idx"], targets=batch["targets"])[1]


class MaskedLMWithNSP(CausalLM):
    """BERT's pretraining loss: masked LM plus next-sentence prediction, one encoder pass."""

    def forward(self, batch):
        m = self.model
        h = m.encode(batch["idx"], token_type_ids=batch["token_type"])
        mlm = F.cross_entropy(m.mlm_logits(h).flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
        nsp = F.cross_entropy(m.nsp(torch.tanh(m.pooler(h[:, 0]))).float(), batch["next_label"])
        return mlm + nsp


class SpanCorruption(CausalLM):
    """T5: the decoder reconstructs the corrupted spans, teacher-forced."""

    def __init__(self, model: nn.Module, block_size: int, noise_density: float, mean_span: float):
        super().__init__(model)
        noise, spans = span_counts(block_size, noise_density, mean_span)
        self.src_len, self.tgt_len = block_size - noise + spans, noise + spans + 1

    def forward(self, batch):
        return self.model(batch["idx"], batch["targets"])[1]

    def flops_per_token(self, block_size: int) -> float:
        # T5 counts FLOPs per source + target token; we count corpus tokens.
        per_example = self.model.flops_per_token(self.src_len, self.tgt_len) * (self.src_len + self.tgt_len)
        return per_example / block_size


class ReplacedTokenDetection(nn.Module):
    """ELECTRA (Clark et al. 2020): a small masked-LM generator fills the masked positions with
    samples, and the discriminator (`self.model`, a BERT encoder with a one-logit head) tells,
    for every token, whether it was replaced. Loss = generator MLM + weight × discriminator BCE.
    Samples are drawn with a generator seeded by the batch, so runs and resumes are exact."""

    def __init__(self, model: nn.Module, generator: nn.Module, weight: float):
        super().__init__()
        self.model, self.generator, self.weight = model, generator, weight
        self.head = nn.Linear(model.config.d_model, 1)

    def forward(self, batch):
        idx, targets, original = batch["idx"], batch["targets"], batch["original"]
        gen_logits, gen_loss = self.generator(idx, targets=targets)
        with torch.no_grad():
            rng = torch.Generator(device=idx.device).manual_seed(int(batch["sample_seed"].reshape(-1)[0]))
            u = torch.rand(gen_logits.shape, generator=rng, device=idx.device).clamp_(1e-9, 1 - 1e-9)
            sampled = (gen_logits.float() - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max sample
            corrupted = torch.where(targets != -100, sampled, original)
            replaced = (corrupted != original).float()
        disc_logits = self.head(self.model.encode(corrupted)).squeeze(-1)
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced)
        return gen_loss + self.weight * disc_loss

    def flops_per_token(self, block_size: int) -> float:
        return self.model.flops_per_token(block_size) + self.generator.flops_per_token(block_size)


def generator_config(disc_config, overrides: dict):
    """ELECTRA's generator: the discriminator's shape at a quarter of the width, unless overridden."""
    c = disc_config
    d = max(64, c.d_model // 4)
    base = {"d_model": d, "n_heads": max(1, d // 64), "d_ff": 4 * d}
    try:
        return dataclasses.replace(c, **{**base, **overrides})
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid generator config ({e}); check --generator KEY=VALUE") from None


def check_family(kind: str, family: str) -> None:
    if family not in FAMILIES[kind]:
        raise InputError(
            f"objective {kind!r} trains {'/'.join(FAMILIES[kind])} models, not {family!r}; "
            f"set --family {FAMILIES[kind][0]} or pick another --objective"
        )


def make_objective(kind: str, model: nn.Module, family: str, cfg) -> nn.Module:
    _, span, rtd = objective_options(cfg)
    check_family(kind, family)
    if kind == "clm":
        return CausalLM(model)
    if kind == "mlm":
        return MaskedLM(model)
    if kind == "nsp":
        return MaskedLMWithNSP(model)
    if kind == "span":
        return SpanCorruption(model, cfg.block_size, span.noise_density, span.mean_span)
    return ReplacedTokenDetection(model, type(model)(generator_config(model.config, rtd.generator)), rtd.weight)

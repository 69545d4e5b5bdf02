"""Pretraining, as one recipe that reads top to bottom (nanoGPT's train.py, in lmstack's terms).

`train(cfg)` first checks what it can without reading the corpus (data paths, the tokenizer's
source, the model's config: a typo costs a second, not a tokenized corpus), then prepares the
tokenizer and token shards (rank 0 tokenizes, the others wait),
builds the model and its objective (causal LM, masked LM, span corruption, ELECTRA), then runs
optimizer steps over windows drawn from the shards, validating every `eval_interval` steps and
checkpointing every `ckpt_interval`. The step itself (micro-batches, autocast, accumulation,
clipping, DDP/FSDP sync) is `training.step`; the run around it (metrics, time budget, signals,
checkpoints, exact resume) is `training.run`. Other stages are recipes of their own beside this
one (`training.finetune`), built on the same two pieces.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import torch

from lmstack.data.batches import VAL_STREAM, BatchMaker, required_specials
from lmstack.data.shards import MANIFEST, TokenShards, prepare_shards
from lmstack.errors import InputError
from lmstack.models.checkpoint import FAMILIES, family_class
from lmstack.tokenizers import EOT, load_tokenizer, registry
from lmstack.training import distributed
from lmstack.training.config import TrainConfig
from lmstack.training.objectives import check_family, make_objective, objective_options, special_overrides
from lmstack.training.optim import lr_at
from lmstack.training.run import Run

TOKENIZER_FILE = "tokenizer.json"


# --- setup ---------------------------------------------------------------------------------


def _given_shards(cfg: TrainConfig) -> Path | None:
    """--data names one already prepared shard directory."""
    if len(cfg.data) == 1 and (Path(cfg.data[0]) / MANIFEST).exists():
        return Path(cfg.data[0])
    return None


def _shard_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return _given_shards(cfg) or (Path(cfg.data_dir) if cfg.data_dir else run_dir / "data")


def _tokenizer_source(cfg: TrainConfig):
    """Where the tokenizer comes from: the file/directory --tokenizer names, else the one saved
    with prepared shards given as --data, else the class of the kind --tokenizer names (trained
    on the data: deterministic, so cached shards made with it are reused)."""
    if Path(cfg.tokenizer).exists():
        return Path(cfg.tokenizer)
    given = _given_shards(cfg)
    if given is not None and (given / TOKENIZER_FILE).exists():
        return given / TOKENIZER_FILE
    kinds = registry()
    if cfg.tokenizer not in kinds:
        raise InputError(f"--tokenizer {cfg.tokenizer!r} is neither a tokenizer file/directory nor a kind ({', '.join(kinds)})")
    return kinds[cfg.tokenizer]


def _base_tokenizer(cfg: TrainConfig):
    source = _tokenizer_source(cfg)
    if isinstance(source, Path):
        return load_tokenizer(source)
    from lmstack.data.corpus import corpus_files

    vocab = cfg.vocab_size or (8192 if cfg.tokenizer in ("bpe", "unigram") else None)
    return source.train_files(corpus_files(cfg.data), vocab_size=vocab, special_tokens=(EOT,))


def check(cfg: TrainConfig, resume: bool) -> None:
    """What can be checked before the run directory exists or the corpus is read: the data
    paths, the tokenizer's source and the model's config (no weights are built). The numbers
    that come from the tokenizer (vocabulary, special ids) are checked once it exists."""
    if not resume:
        if not cfg.data:
            raise InputError("no training data; pass --data FILE_OR_DIR (or a --config that sets data)")
        if _given_shards(cfg) is None:
            from lmstack.data.corpus import corpus_files

            corpus_files(cfg.data)
        _tokenizer_source(cfg)
    model_config(cfg)  # an unknown family is named first
    check_family(cfg.objective, cfg.family)


def prepare_data(cfg: TrainConfig, run_dir: Path, d: distributed.Dist, resume: bool):
    """Tokenizer (with the objective's special tokens) and the train / val shards. Rank 0 does
    any tokenizer training and tokenizing while the others wait."""
    shard_dir = _shard_dir(cfg, run_dir)
    if d.main and not resume:
        tok = _base_tokenizer(cfg)
        if not (shard_dir / MANIFEST).exists() or _stale(shard_dir, cfg, tok):
            prepare_shards(cfg.data, tok, shard_dir, val_fraction=cfg.val_fraction, text_field=cfg.text_field)
            tok.save(shard_dir / TOKENIZER_FILE)
        TokenShards.open(shard_dir, "train", tok)  # checks the tokenizer matches
        _, span, _ = objective_options(cfg)
        tok.add_special_tokens(required_specials(cfg.objective, cfg.block_size, span.noise_density, span.mean_span))
        tok.save(run_dir / TOKENIZER_FILE)
    distributed.barrier(d)
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    return tok, TokenShards.open(shard_dir, "train"), TokenShards.open(shard_dir, "val")


def _stale(shard_dir: Path, cfg: TrainConfig, tok) -> bool:
    """Cached shards made from other sources, split or tokenizer are made again."""
    from lmstack.data.corpus import corpus_files
    from lmstack.data.shards import read_manifest

    if _given_shards(cfg) == shard_dir:
        return False
    m = read_manifest(shard_dir)
    sources = [{"path": str(f), "bytes": f.stat().st_size} for f in corpus_files(cfg.data)]
    return (m["sources"], m["val_fraction"], m["text_field"], m["tokenizer"]) != (
        sources,
        cfg.val_fraction,
        cfg.text_field,
        tok.fingerprint(),
    )


def model_config(cfg: TrainConfig, tok=None):
    """The family's config, sized by --preset and --model overrides, with the tokenizer's
    vocabulary and special ids (and the training block size, for families that have one).
    Without a tokenizer, a check before tokenizing: the vocabulary is left at its default."""
    if cfg.family not in FAMILIES:
        raise InputError(f"--family {cfg.family!r}: not a model family; known: {', '.join(FAMILIES)}")
    config_cls = typing.get_type_hints(family_class(cfg.family).__init__)["config"]
    fields = {f.name for f in dataclasses.fields(config_cls)}  # not the ClassVars FAMILY and PRESETS
    overrides = {**(special_overrides(cfg.family, tok) if tok is not None else {}), **cfg.model}
    if tok is not None and overrides.setdefault("vocab_size", tok.vocab_size) < tok.vocab_size:
        raise InputError(f"--model vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {tok.vocab_size}")
    for name in ("block_size", "max_position"):
        if name in fields:
            overrides.setdefault(name, cfg.block_size)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"--model: {config_cls.__name__} has no fields {unknown}; known: {sorted(fields)}")
    try:
        return config_cls.preset(cfg.preset, **overrides) if cfg.preset else config_cls(**overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid {cfg.family} model config: {e}") from None


def build_model(cfg: TrainConfig, tok) -> torch.nn.Module:
    """The family's model for `tok` (see `model_config`)."""
    return family_class(cfg.family)(model_config(cfg, tok))


def batch_rows(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per optimizer step, micro-batches per process): the global batch is
    tokens_per_step / block_size rows, split over processes and accumulation steps in
    micro-batches of batch_size rows."""
    per_pass = cfg.batch_size * world
    rows = cfg.tokens_per_step // cfg.block_size if cfg.tokens_per_step else per_pass
    if rows < per_pass or rows % per_pass:
        raise InputError(
            f"--tokens-per-step {cfg.tokens_per_step} must be a multiple of batch_size × block_size × processes "
            f"= {per_pass * cfg.block_size}; change --tokens-per-step or --batch-size"
        )
    return rows, rows // per_pass


@torch.no_grad()
def _sample(model, tok, n_tokens: int, device, seed: int) -> str:
    """A short sample from the end-of-text token, for eyeballing progress (causal families)."""
    rng = torch.Generator(device=device).manual_seed(seed)
    state, logprobs = model.start(torch.tensor([[tok.eot_id]], device=device))
    out = []
    limit = n_tokens if model.max_context is None else min(n_tokens, model.max_context - 1)
    for _ in range(limit):
        nxt = torch.multinomial(logprobs.float().exp(), 1, generator=rng)[:, 0]
        out.append(int(nxt))
        state, logprobs = model.step(state, nxt)
    return tok.decode(out)


# --- the recipe ----------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Pretrain (or continue, with resume=True) the run in cfg.out_dir; returns the last metrics."""
    check(cfg, resume)
    with Run(cfg, resume) as run:
        d = run.d
        rows, accum = batch_rows(cfg, d.world)
        tok, train_shards, val_shards = prepare_data(cfg, run.dir, d, resume)
        run.keep_on_failure(train_shards.path, "the token shards")

        # Model and objective: the same initialisation on every rank (FSDP does not broadcast it).
        torch.manual_seed(cfg.seed)
        objective = make_objective(cfg.objective, build_model(cfg, tok), cfg.family, cfg)
        stepper = run.optimizer_step(objective)

        mlm, span, _ = objective_options(cfg)
        common = dict(
            tokenizer=tok,
            kind=cfg.objective,
            block_size=cfg.block_size,
            seed=cfg.seed,
            mlm_probability=mlm.probability,
            noise_density=span.noise_density,
            mean_span=span.mean_span,
        )
        train_batches = BatchMaker(train_shards, rows_per_step=rows, batch_size=cfg.batch_size, **common)
        val_batches = BatchMaker(val_shards, rows_per_step=cfg.batch_size, batch_size=cfg.batch_size, stream=VAL_STREAM, **common)
        has_val = val_shards.num_tokens > cfg.block_size + 1

        # a validation pass is a forward of one micro-batch: about a third of a training micro-batch
        eval_cost = math.ceil(cfg.eval_batches / d.world) / (3 * accum) if has_val else 0.0
        run.begin(
            objective.flops_per_token(cfg.block_size),
            eval_cost,
            banner=(
                f"{cfg.family} {objective.model.num_params():,} parameters, objective {cfg.objective}, "
                f"{rows} × {cfg.block_size} tokens per step ({accum} micro-batch(es) of {cfg.batch_size} on each of "
                f"{d.world} process(es))"
            ),
        )
        while not run.done:
            lr = lr_at(run.step, run.cfg)
            step = run.step
            result = stepper(lambda micro: train_batches.make(step, micro * d.world + d.rank), accum, lr, step)
            run.end_step(result, lr, tokens=rows * cfg.block_size)
            if has_val and run.eval_due:
                val_loss = stepper.mean_loss(lambda k: val_batches.make(k, 0), cfg.eval_batches)
                ppl = math.exp(val_loss) if cfg.objective in ("clm", "mlm", "span") and val_loss < 700 else None
                run.log_eval({"val_loss": val_loss, "val_ppl": ppl})
                if cfg.sample_interval and run.step % cfg.sample_interval == 0 and not stepper.fsdp and cfg.objective == "clm":
                    objective.eval()
                    run.write(
                        f"--- sample at step {run.step} ---\n"
                        f"{_sample(objective.model, tok, cfg.sample_tokens, run.device, cfg.seed)}\n---"
                    )
                    objective.train()
            if run.checkpoint_due:
                run.save(tok)
        return run.finish()

"""The training loop, written out in one place (nanoGPT style) so it can be read top to bottom.

`train(cfg)` sets up (processes, tokenizer, shards, model, objective, optimizer, possibly a
checkpoint to resume), then runs optimizer steps. Each step: set the scheduled learning rate;
run `accum` micro-batches, each forward under autocast and backward with the loss divided by
`accum` (gradients synchronise across processes only on the last one); stop on a NaN/inf loss
(or skip the step, by option); unscale (fp16), clip the gradient norm, step, zero the
gradients; log step, tokens, loss, lr, grad norm, tokens/s and MFU. Every `eval_interval`
steps it validates, every `ckpt_interval` steps it checkpoints, and on SIGINT / SIGTERM it
checkpoints and returns at the end of the current step. With `--max-minutes`, the first steps
are timed and max_steps lowered to what fits (see `budget`); the resolved max_steps goes back
into the run's train_config.json, so a resumed run keeps the plan.

tokens/s counts every process's tokens. MFU = flops_per_token × tokens/s ÷ (peak FLOP/s of one
device × processes). The peak is `--peak-flops` or, on known GPUs, their bf16 data-sheet figure;
on a CPU it is unknown, so MFU is logged as null.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
import typing
from pathlib import Path

import torch

from lmstack.data.batches import VAL_STREAM, BatchMaker, required_specials
from lmstack.data.shards import MANIFEST, TokenShards, prepare_shards
from lmstack.errors import InputError, LmstackError
from lmstack.models.checkpoint import family_class
from lmstack.progress import progress
from lmstack.tokenizers import EOT, load_tokenizer, registry
from lmstack.training import checkpoint, distributed
from lmstack.training import config as config_mod
from lmstack.training.budget import Budget, calibration_steps
from lmstack.training.config import TrainConfig
from lmstack.training.metrics import MetricsLog, peak_flops
from lmstack.training.objectives import make_objective, special_overrides
from lmstack.training.optim import lr_at, make_optimizer

TOKENIZER_FILE = "tokenizer.json"


class DivergenceError(LmstackError):
    """The loss became NaN or infinite."""


# --- setup ---------------------------------------------------------------------------------


def _given_shards(cfg: TrainConfig) -> Path | None:
    """--data names one already prepared shard directory."""
    if len(cfg.data) == 1 and (Path(cfg.data[0]) / MANIFEST).exists():
        return Path(cfg.data[0])
    return None


def _shard_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return _given_shards(cfg) or (Path(cfg.data_dir) if cfg.data_dir else run_dir / "data")


def _base_tokenizer(cfg: TrainConfig):
    """The tokenizer named by --tokenizer (a saved one), else the one saved with prepared
    shards given as --data, else a new one of the kind --tokenizer names, trained on the data
    (deterministic, so cached shards made with it are reused)."""
    if Path(cfg.tokenizer).exists():
        return load_tokenizer(cfg.tokenizer)
    given = _given_shards(cfg)
    if given is not None and (given / TOKENIZER_FILE).exists():
        return load_tokenizer(given / TOKENIZER_FILE)
    kinds = registry()
    if cfg.tokenizer not in kinds:
        raise InputError(f"--tokenizer {cfg.tokenizer!r} is neither a tokenizer file/directory nor a kind ({', '.join(kinds)})")
    from lmstack.data.corpus import corpus_files

    vocab = cfg.vocab_size or (8192 if cfg.tokenizer in ("bpe", "unigram") else None)
    return kinds[cfg.tokenizer].train_files(corpus_files(cfg.data), vocab_size=vocab, special_tokens=(EOT,))


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
        tok.add_special_tokens(required_specials(cfg.objective, cfg.block_size, cfg.noise_density, cfg.mean_span))
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
        sources, cfg.val_fraction, cfg.text_field, tok.fingerprint())


def build_model(cfg: TrainConfig, tok) -> torch.nn.Module:
    """The family's model, sized by --preset and --model overrides, with the tokenizer's
    vocabulary (and the training block size, for families that have one)."""
    cls = family_class(cfg.family)
    config_cls = typing.get_type_hints(cls.__init__)["config"]
    fields = {f for f in config_cls.__dataclass_fields__}
    overrides = {**special_overrides(cfg.family, tok), **cfg.model}
    if overrides.setdefault("vocab_size", tok.vocab_size) < tok.vocab_size:
        raise InputError(f"--model vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {tok.vocab_size}")
    for name in ("block_size", "max_position"):
        if name in fields:
            overrides.setdefault(name, cfg.block_size)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"--model: {config_cls.__name__} has no fields {unknown}; known: {sorted(fields)}")
    try:
        model_config = config_cls.preset(cfg.preset, **overrides) if cfg.preset else config_cls(**overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid {cfg.family} model config: {e}") from None
    return cls(model_config)


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(device.type, dtype=getattr(torch, dtype)), dtype


class _StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint and returns after the step."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


# --- the loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or continue, with resume=True) the run in cfg.out_dir; returns the last metrics."""
    d, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, d, device)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, resume: bool, d: distributed.Dist, device: torch.device) -> dict:
    start = time.perf_counter()
    run_dir = Path(cfg.out_dir)
    if resume:
        ckpt = checkpoint.latest(run_dir)
    elif checkpoint.list_checkpoints(run_dir):
        raise InputError(f"{run_dir} already holds checkpoints; continue it with `lmstack train --resume {run_dir}` "
                         "or pick another --out-dir")
    elif not cfg.data:
        raise InputError("no training data; pass --data FILE_OR_DIR (or a --config that sets data)")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, run_dir)
    tok, train_shards, val_shards = prepare_data(cfg, run_dir, d, resume)

    # Model and objective: the same initialisation on every rank (FSDP does not broadcast it).
    torch.manual_seed(cfg.seed)
    objective = make_objective(cfg.objective, build_model(cfg, tok), cfg.family, cfg)
    state = checkpoint.load_weights(ckpt, objective) if resume else {}
    objective.to(device)
    if cfg.compile:
        objective.compile()
    wrapped = distributed.wrap(objective, d, cfg.parallel, device)
    optimizer = make_optimizer(objective, cfg, device.type)
    autocast, dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if resume:
        checkpoint.load_optimizer(ckpt, wrapped, optimizer, state)
        checkpoint.load_rng(ckpt, d, device)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks

    # Batches: the global batch is tokens_per_step / block_size rows, split over ranks and
    # accumulation steps in micro-batches of batch_size rows.
    per_pass = cfg.batch_size * d.world
    rows = cfg.tokens_per_step // cfg.block_size if cfg.tokens_per_step else per_pass
    if rows < per_pass or rows % per_pass:
        raise InputError(
            f"--tokens-per-step {cfg.tokens_per_step} must be a multiple of batch_size × block_size × processes "
            f"= {per_pass * cfg.block_size}; change --tokens-per-step or --batch-size"
        )
    accum = rows // per_pass
    common = dict(tokenizer=tok, kind=cfg.objective, block_size=cfg.block_size, seed=cfg.seed,
                  mlm_probability=cfg.mlm_probability, noise_density=cfg.noise_density, mean_span=cfg.mean_span)
    train_batches = BatchMaker(train_shards, rows_per_step=rows, batch_size=cfg.batch_size, **common)
    val_batches = BatchMaker(val_shards, rows_per_step=cfg.batch_size, batch_size=cfg.batch_size, stream=VAL_STREAM, **common)
    has_val = val_shards.num_tokens > cfg.block_size + 1

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate() -> float:
        objective.eval()
        total = torch.zeros(2, device=device)
        for k in range(math.ceil(cfg.eval_batches / d.world)):  # equal counts per rank (FSDP collectives)
            with autocast:
                total[0] += wrapped(to_device(val_batches.make(k * d.world + d.rank, 0))).float()
            total[1] += 1
        objective.train()
        total = distributed.sum_(total, d)
        return float(total[0] / total[1])

    step, tokens = state.get("step", 0), state.get("tokens", 0)
    best = state.get("best_val_loss")
    elapsed = state.get("elapsed_s", 0.0)
    flops = objective.flops_per_token(cfg.block_size)
    peak = peak_flops(cfg.peak_flops, device)
    log = MetricsLog(run_dir, d.main, cfg.tensorboard, resume_step=step if resume else None)
    fsdp = d.enabled and cfg.parallel == "fsdp"
    # a validation pass is a forward of one micro-batch: about a third of a training micro-batch
    eval_cost = math.ceil(cfg.eval_batches / d.world) / (3 * accum) if has_val else 0.0
    budget = Budget(cfg.max_minutes, start, eval_cost) if cfg.max_minutes else None
    last: dict = {}
    stopped = None
    if d.main:
        print(f"{cfg.family} {objective.model.num_params():,} parameters, objective {cfg.objective}, "
              f"{rows} × {cfg.block_size} tokens per step ({accum} micro-batch(es) of {cfg.batch_size} on each of "
              f"{d.world} process(es)), device {device}, {dtype}; run dir {run_dir}", flush=True)
    objective.train()
    with _StopSignal() as stop, progress(total=cfg.max_steps, initial=step, desc="training", unit="step") as bar:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            try:
                for micro in range(accum):
                    batch = to_device(train_batches.make(step, micro * d.world + d.rank))
                    sync = micro == accum - 1
                    if fsdp:
                        wrapped.set_requires_gradient_sync(sync)
                    no_sync = wrapped.no_sync() if d.enabled and not fsdp and not sync else contextlib.nullcontext()
                    with no_sync:
                        with autocast:
                            loss = wrapped(batch)
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.detach().float()
            except torch.OutOfMemoryError:
                raise InputError(
                    f"out of memory with micro-batches of {cfg.batch_size} × {cfg.block_size} tokens; lower --batch-size "
                    "(gradient accumulation keeps --tokens-per-step) or --block-size"
                ) from None
            loss_val = float(distributed.mean(loss_sum / accum, d))
            finite = math.isfinite(loss_val)
            if not finite and not cfg.skip_nonfinite:
                raise DivergenceError(
                    f"loss is {loss_val} at step {step}; lower --lr, raise --warmup-steps, check the data, or "
                    f"resume from the last checkpoint in {run_dir / checkpoint.CHECKPOINTS} (--skip-nonfinite skips such steps)"
                )
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += rows * cfg.block_size
            dt = time.perf_counter() - t0
            elapsed += dt
            tps = rows * cfg.block_size / dt
            last = {"step": step, "tokens": tokens, "loss": loss_val, "lr": lr, "grad_norm": norm,
                    "tokens_per_s": tps, "mfu": flops * tps / (peak * d.world) if peak else None, "skipped": not finite}
            log.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
            if budget:
                budget.record(time.perf_counter() - t0)  # the step with its logging, without validation
                if step == calibration_steps(cfg.warmup_steps) and step < cfg.max_steps:
                    cfg = _plan(cfg, budget, step, d, device, bar)

            val_loss = None
            # the budget's hard stop, for steps slower than the plan assumed: end the run here
            out_of_time = budget is not None and step < cfg.max_steps and distributed.any_(budget.out_of_time(), d)
            at_end = step == cfg.max_steps or out_of_time
            if has_val and ((cfg.eval_interval and step % cfg.eval_interval == 0) or at_end):
                val_loss = evaluate()
                best = val_loss if best is None else min(best, val_loss)
                ppl = math.exp(val_loss) if cfg.objective in ("clm", "mlm", "span") and val_loss < 700 else None
                log.log({"step": step, "tokens": tokens, "val_loss": val_loss, "val_ppl": ppl})
                last.update(val_loss=val_loss, val_ppl=ppl)
                if d.main:
                    bar.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}")
                if cfg.sample_interval and step % cfg.sample_interval == 0 and d.main and not fsdp and cfg.objective == "clm":
                    objective.eval()
                    bar.write(f"--- sample at step {step} ---\n{_sample(objective.model, tok, cfg.sample_tokens, device, cfg.seed)}\n---")
                    objective.train()
            stopping = distributed.any_(stop.stop, d)
            if at_end or stopping or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0):
                trainer_state = {"tokens": tokens, "val_loss": val_loss, "best_val_loss": best, "elapsed_s": elapsed,
                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
                path = checkpoint.save(run_dir, step, wrapped, objective, optimizer, trainer_state, tok, d, device, cfg.keep_last)
                if stopping and d.main:
                    bar.write(f"stopped by signal at step {step}; checkpoint {path}; continue with `lmstack train --resume {run_dir}`")
                elif out_of_time and d.main:
                    bar.write(f"out of time ({cfg.max_minutes:g} min) at step {step} of {cfg.max_steps}; checkpoint {path}; "
                              f"finish the schedule with `lmstack train --resume {run_dir}`")
            if stopping or out_of_time:
                stopped = "signal" if stopping else "time"
                break
    log.close()
    if last:
        last["stopped"] = stopped  # None, "signal" or "time"
    return last


def _plan(cfg: TrainConfig, budget: Budget, step: int, d: distributed.Dist, device: torch.device, bar) -> TrainConfig:
    """The config with max_steps lowered to the steps that fit the budget, saved in the run
    directory. Every rank plans from the same numbers (averaged over ranks) so all agree."""
    agreed = distributed.mean(torch.tensor([budget.elapsed(), budget.step_seconds()], device=device), d).tolist()
    steps = budget.plan(step, cfg.max_steps, cfg.eval_interval, *agreed)
    if d.main:
        note = " (all of --max-steps fit)" if steps == cfg.max_steps else ""
        if steps <= cfg.warmup_steps:
            note += f"; the warm-up ({cfg.warmup_steps} steps) does not end in time, so the learning rate never decays: lower --warmup-steps"
        bar.write(f"budget {cfg.max_minutes:g} min: {steps} steps of ~{agreed[1]:.3g} s{note}")
    if steps == cfg.max_steps:
        return cfg
    cfg = dataclasses.replace(cfg, max_steps=steps)
    if d.main:
        config_mod.save(cfg, Path(cfg.out_dir))
    bar.total = steps
    bar.refresh()
    return cfg

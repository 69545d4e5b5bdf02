"""The decoding engine: a steppable scheduler over the model contract (continuous batching).

Requests are added (`add`), every active row advances one token per `step`, finished rows retire
between steps and queued requests join, so a server keeps its batch full instead of waiting for
its slowest row. A prompt is read once and its decoding state forked into the request's n samples
through the contract's `reorder`. Each row keeps its own sampler settings and seeded generator
(`Sampler`), so what it draws does not depend on what else shares the batch.

Rows live in cohorts, each decoding through one state. A family whose states join (`concat`: the
GPT's KV cache, which counts each row's positions from its own left padding) keeps one cohort that
new rows merge into; every other family (n-gram, RNN, T5) runs each admitted group as a cohort of
its own, retiring rows through `reorder` where it has one and otherwise feeding a finished row its
last token until its cohort is done, as a lockstep batch does.

LoRA adapters for the base (`load_adapter`) are stacked per layer (`models.multi_lora`): before
each forward the scheduler sets every row's adapter, so requests for different adapters, and for
none, share one batch.

Thread-safety: `add`, `cancel`, `busy` and the adapter methods may be called from any thread (a
server's event loop) while one worker thread calls `step`; a lock guards the queue and the
cancellations, and adapters change between steps, never during one.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmstack.errors import InputError
from lmstack.generation.config import GenerationConfig
from lmstack.generation.detok import StreamDecoder
from lmstack.generation.processors import Sampler


@dataclass
class Event:
    """What one step produced for one sample of one request."""

    request: int  # request id from `add`
    index: int  # sample number 0..n-1
    token: int | None  # the new token id (None on a finish-only event)
    text: str  # decoded text delta (whole characters only; stop strings never shown)
    logprob: float | None  # the model's log p of the token (before any sampling transform)
    top: list[tuple[int, float]]  # the most likely tokens and their log p, when the request asked for logprobs
    finish_reason: str | None  # None while running, then "stop" | "length" | "cancelled"


def model_device(model) -> torch.device:
    """Where the model's weights live (CPU for families without parameters, like the n-gram)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_generative(model) -> None:
    """Generation needs the contract's incremental view (`start`, `step`), which a masked LM lacks."""
    if not (hasattr(model, "start") and hasattr(model, "step")):
        raise InputError(
            f"a {getattr(model, 'family', type(model).__name__)} model does not generate text left to right "
            "(it has no start/step decoding); score it with `lmstack eval perplexity` (pseudo-perplexity "
            "for a masked LM), or generate with a causal model (n-gram, RNN, GPT) or T5"
        )


def cap_to_context(model, prompt_length: int, max_new_tokens: int) -> int:
    """How many tokens fit after a prompt of `prompt_length`: `max_new_tokens`, or less where the
    model's context ends first, which a Python warning says (one per message and place, so a batch
    or a run of calls with the same settings warns once); the output then ends with "length"."""
    limit = getattr(model, "max_context", None)
    if limit is None or prompt_length + max_new_tokens <= limit:
        return max_new_tokens
    warnings.warn(
        f"max_new_tokens={max_new_tokens} goes past the model's context of {limit} tokens: generation "
        f"stops when prompt + output reach {limit} (finish_reason 'length'); ask for fewer tokens "
        "or use a model with a longer context",
        stacklevel=4,
    )
    return max(0, limit - prompt_length)


class _Row:
    """One sequence being generated: its tokens, text and whether (and why) it has stopped."""

    def __init__(self, prompt: list[int], config: GenerationConfig, budget: int, tokenizer):
        self.prompt, self.config, self.budget = prompt, config, budget
        self.eot = tokenizer.eot_id if tokenizer is not None and config.stop_at_eot else None
        self.detok = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""
        self.logprob = 0.0
        self.streamed = 0  # characters already handed to a stream
        self.finish_reason: str | None = None if budget > 0 else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float) -> bool:
        """Take the next token; False when it ended the row without joining the output (end-of-text)."""
        if token == self.eot:
            self._finish("stop")
            return False
        self.tokens.append(token)
        self.logprob += logprob
        if self.detok is not None:
            old = len(self.text)
            self.text += self.detok.push(token)
            if self._cut_at_stop(old):
                self.finish_reason = "stop"
                return True
        if len(self.tokens) >= self.budget:
            self._finish("length")
        return True

    def _cut_at_stop(self, old: int) -> bool:
        hits = [i for s in self.config.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.detok is not None:
            self.text += self.detok.flush()

    def take_text(self) -> str:
        """Text not yet streamed, holding back a tail that could still become a stop string."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.config.stop), default=0)
        end = max(self.streamed, len(self.text) - hold)
        piece, self.streamed = self.text[self.streamed : end], end
        return piece

    def last_token(self) -> int:
        return self.tokens[-1] if self.tokens else self.prompt[-1]


@dataclass
class _Request:
    id: int
    prompt: list[int]
    rows: list[_Row]  # one per sample
    adapter: int  # adapter slot, -1 for the base
    logprobs: int  # how many top alternatives each event lists


@dataclass
class _Seat:
    """A row's place in a cohort."""

    request: _Request
    index: int
    row: _Row


@dataclass
class _Cohort:
    """Rows that decode through one decoding state: the state, every row's next-token
    log-probabilities [B, V] (from the last forward) and their sampler."""

    state: object
    logprobs: torch.Tensor
    seats: list[_Seat]
    sampler: Sampler
    reorderable: bool = field(default=True)


class Scheduler:
    """Continuous batching: `add` requests, call `step` until not `busy`, read the events."""

    def __init__(self, model, tokenizer, max_batch: int = 32):
        check_generative(model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = model_device(model)
        self._joins = callable(getattr(model, "concat", None))  # states of separate batches join
        self._lock = threading.Lock()  # the queue, cancellations and ids: touched from other threads
        self._step_lock = threading.Lock()  # one step at a time; adapters change between steps
        self._queue: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._next_id = 0
        self._cohorts: list[_Cohort] = []
        self._lora = None  # models.multi_lora.MultiLora, made by the first load_adapter
        self._slots: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._unloading: set[int] = set()  # slots freed once no request uses them

    # --- requests -----------------------------------------------------------------------

    def add(
        self,
        prompt: list[int],
        config: GenerationConfig | Sequence[GenerationConfig] | None = None,
        n: int = 1,
        adapter: str | None = None,
        logprobs: int = 0,
    ) -> int:
        """Queue a request and return its id; it joins the batch at a coming `step`. `config` is
        one GenerationConfig for every sample (a seeded one gives sample i the seed + i, so the n
        samples differ yet repeat) or one per sample. Bad input raises InputError here, never in
        `step`."""
        return self._submit(prompt, config, n, adapter, logprobs).id

    def _submit(self, prompt, config, n: int = 1, adapter: str | None = None, logprobs: int = 0) -> _Request:
        """`add`, returning the request itself (the batch APIs of `engine` read its rows)."""
        configs = _sample_configs(config, n)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("every prompt needs at least one token (e.g. <|endoftext|>)")
        vocab = self.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InputError(
                f"token ids must be in [0, {vocab}); got range [{min(prompt)}, {max(prompt)}]; "
                "does the tokenizer belong to this model?"
            )
        if self.tokenizer is None and any(c.stop for c in configs):
            raise InputError("stop strings need a tokenizer to decode the output; pass one or drop the stop strings")
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= vocab:
            raise InputError(f"logprobs must be an integer in [0, {vocab}] (top alternatives per token); got {logprobs!r}")
        if n > self.max_batch:
            raise InputError(f"n={n} samples do not fit in a batch of {self.max_batch} rows; ask for fewer")
        if getattr(self.model, "max_context", None) is not None:
            self.model.check_context(len(prompt))
        rows = [_Row(prompt, c, cap_to_context(self.model, len(prompt), c.max_new_tokens), self.tokenizer) for c in configs]
        with self._lock:
            slot = -1 if adapter is None else self._slot(adapter)
            request = _Request(self._next_id, prompt, rows, slot, logprobs)
            self._next_id += 1
            self._queue.append(request)
        return request

    def cancel(self, request: int) -> None:
        """Stop a request (a client went away): its rows end with "cancelled" and leave the batch
        at the next step. An id that already finished is ignored."""
        with self._lock:
            self._cancelled.add(request)

    @property
    def busy(self) -> bool:
        """Whether anything is queued or running."""
        with self._lock:
            return bool(self._queue or self._cohorts)

    @property
    def running(self) -> int:
        """Rows in the batch now (a server's batch-size gauge)."""
        return sum(len(c.seats) for c in self._cohorts)

    @property
    def queued(self) -> int:
        """Requests waiting for room in the batch."""
        with self._lock:
            return len(self._queue)

    # --- the step -----------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Feed the running rows their last tokens (one forward pass), admit queued requests that
        fit (their prompts read in one pass), choose the next token of every active row and retire
        the finished ones. The forward pass comes first, so a step returns its tokens as soon as
        they are chosen: a new request's first token costs its prefill, not a decoding step more."""
        with self._step_lock:
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
                dropped = [r for r in self._queue if r.id in cancelled]
                self._queue = deque(r for r in self._queue if r.id not in cancelled)
                admitted = self._take_admissible()
            for row in (row for r in dropped for row in r.rows):
                row.finish_reason = "cancelled"
            events = [_finish_event(r, i, row) for r in dropped for i, row in enumerate(r.rows)]
            events += self._cancel_running(cancelled)
            self._retire()
            self._free_unloaded()
            for cohort in self._cohorts:
                self._forward(cohort)
            events += self._admit(admitted)
            for cohort in self._cohorts:
                events += self._choose(cohort)
            self._retire()
            return events

    def _take_admissible(self) -> list[_Request]:
        room = self.max_batch - self.running
        taken = []
        while self._queue and len(self._queue[0].rows) <= room:
            room -= len(self._queue[0].rows)
            taken.append(self._queue.popleft())
        return taken

    def _cancel_running(self, cancelled: set[int]) -> list[Event]:
        events = []
        for cohort in self._cohorts:
            for seat in cohort.seats:
                if seat.request.id in cancelled and not seat.row.done:
                    seat.row.finish_reason = "cancelled"
                    events.append(_finish_event(seat.request, seat.index, seat.row))
        return events

    def _admit(self, requests: list[_Request]) -> list[Event]:
        """Prefill the admitted requests and put their rows in the batch; a row with no room to
        generate (max_new_tokens 0, or a prompt that fills the context) finishes at once."""
        events = [_finish_event(r, i, row) for r in requests for i, row in enumerate(r.rows) if row.done]
        requests = [r for r in requests if not all(row.done for row in r.rows)]
        for group in self._prefill_groups(requests):
            cohort = self._prefill(group)
            if self._joins and self._cohorts:
                cohort = self._join(self._cohorts.pop(), cohort)
            self._cohorts.append(cohort)
        return events

    def _prefill_groups(self, requests: list[_Request]) -> list[list[_Request]]:
        """Requests whose prompts are read in one left-padded pass. A family whose states cannot
        join may have to decode them in lockstep, so near its context limit each prompt length
        goes apart (see `_fits_lockstep`)."""
        if not requests:
            return []
        if self._joins or _fits_lockstep(self.model, requests):
            return [requests]
        lengths = sorted({len(r.prompt) for r in requests})
        return [[r for r in requests if len(r.prompt) == n] for n in lengths]

    def _prefill(self, group: list[_Request]) -> _Cohort:
        seats = [_Seat(r, i, row) for r in group for i, row in enumerate(r.rows)]
        self._set_adapters([r.adapter for r in group])
        state, logprobs = _start(self.model, [r.prompt for r in group], self.device)
        if len(seats) > len(group):  # fork each prompt's state into its samples
            index = torch.tensor([k for k, r in enumerate(group) for _ in r.rows], device=self.device)
            try:
                with torch.inference_mode():
                    state, logprobs = self.model.reorder(state, index), logprobs[index]
            except NotImplementedError:  # no reorder: read each sample's prompt (same result, more work)
                self._set_adapters([s.request.adapter for s in seats])
                state, logprobs = _start(self.model, [s.request.prompt for s in seats], self.device)
        sampler = Sampler([s.row.config for s in seats], [s.request.prompt for s in seats], self.model.vocab_size, self.device)
        return _Cohort(state, logprobs, seats, sampler)

    def _join(self, old: _Cohort, new: _Cohort) -> _Cohort:
        with torch.inference_mode():
            state = self.model.concat([old.state, new.state])
        return _Cohort(
            state, torch.cat([old.logprobs, new.logprobs]), old.seats + new.seats, Sampler.concat([old.sampler, new.sampler])
        )

    def _choose(self, cohort: _Cohort) -> list[Event]:
        """The next token of every active row of the cohort, as events."""
        active = [i for i, s in enumerate(cohort.seats) if not s.row.done]
        if not active:
            return []
        chosen = cohort.sampler.choose(cohort.logprobs, active)
        index = torch.tensor(active, device=cohort.logprobs.device)
        scores = cohort.logprobs[index, torch.tensor(list(chosen.values()), device=index.device)].tolist()
        tops = self._tops(cohort, active)
        events = []
        for i, token, score in zip(active, chosen.values(), scores):
            seat = cohort.seats[i]
            kept = seat.row.add(token, score)
            events.append(
                Event(
                    seat.request.id,
                    seat.index,
                    token if kept else None,
                    seat.row.take_text(),
                    score if kept else None,
                    tops.get(i, []) if kept else [],
                    seat.row.finish_reason,
                )
            )
        cohort.sampler.observe(chosen)
        return events

    def _tops(self, cohort: _Cohort, active: list[int]) -> dict[int, list[tuple[int, float]]]:
        """The top alternatives of the rows whose request asked for logprobs, in one topk."""
        wants = [i for i in active if cohort.seats[i].request.logprobs]
        if not wants:
            return {}
        k = max(cohort.seats[i].request.logprobs for i in wants)
        values, ids = cohort.logprobs[torch.tensor(wants, device=cohort.logprobs.device)].topk(k, dim=-1)
        out = {}
        for i, vs, ts in zip(wants, values.tolist(), ids.tolist()):
            n = cohort.seats[i].request.logprobs
            out[i] = list(zip(ts[:n], vs[:n]))
        return out

    def _retire(self) -> None:
        """Drop finished rows (through `reorder`; a family without it keeps feeding them until its
        cohort is done) and cohorts with nothing left to do."""
        cohorts = []
        for cohort in self._cohorts:
            keep = [i for i, s in enumerate(cohort.seats) if not s.row.done]
            if not keep:
                continue
            if len(keep) < len(cohort.seats) and cohort.reorderable:
                try:
                    with torch.inference_mode():
                        cohort.state = self.model.reorder(cohort.state, torch.tensor(keep, device=self.device))
                    cohort.logprobs = cohort.logprobs[keep]
                    cohort.seats = [cohort.seats[i] for i in keep]
                    cohort.sampler = cohort.sampler.select(keep)
                except NotImplementedError:
                    cohort.reorderable = False
            cohorts.append(cohort)
        self._cohorts = cohorts

    def _forward(self, cohort: _Cohort) -> None:
        feed = torch.tensor([s.row.last_token() for s in cohort.seats], device=self.device)
        self._set_adapters([s.request.adapter for s in cohort.seats])
        # inference_mode around each model call, not a loop: a generator must not leak it into the caller.
        with torch.inference_mode():
            cohort.state, cohort.logprobs = self.model.step(cohort.state, feed)

    def warm_up(self) -> None:
        """Decode a throwaway row alone, then two, so that a compiled step (`GPT.compile_decoding`)
        compiles now rather than at the first requests: torch.compile makes a graph for a row
        alone and, once the batch size has changed, one for every larger size. Call it with the
        adapters loaded and before requests arrive."""
        config = GenerationConfig(max_new_tokens=2, temperature=0, stop_at_eot=False)
        for rows in (1, 2):
            self.add([0], config, n=rows)
            while self.busy:
                self.step()

    # --- adapters -----------------------------------------------------------------------

    def load_adapter(self, name: str, adapter_dir) -> None:
        """Serve the LoRA adapter in `adapter_dir` (PEFT format, made for this base: another base's
        is refused with CheckpointError) to requests that name it; from the next step on."""
        from lmstack.models.multi_lora import MultiLora

        if not isinstance(name, str) or not name:
            raise InputError(f"an adapter needs a non-empty name, got {name!r}")
        with self._lock:
            if name in self._slots:
                raise InputError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        with self._step_lock:
            if self._lora is None:
                self._lora = MultiLora(self.model)
            slot = self._lora.install(self._lora.read(adapter_dir))
            with self._lock:
                self._slots[name], self._paths[name] = slot, Path(adapter_dir)

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests for it are refused at once; requests already
        queued or running finish with it, then its weights are freed."""
        with self._lock:
            if name not in self._slots:
                raise InputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._slots)})")
            self._unloading.add(self._slots.pop(name))
            del self._paths[name]

    @contextmanager
    def adapted(self, adapter: str | None = None) -> Iterator:
        """The model as requests for `adapter` (a loaded adapter's name; None: the base) see it,
        for a call of its batch view on one sequence (scoring a text: `evaluation.scoring`), between
        steps: the block holds the step lock, and the next step sets its rows' adapters again."""
        with self._step_lock:
            with self._lock:
                slot = -1 if adapter is None else self._slot(adapter)
            self._set_adapters([slot])
            yield self.model

    @property
    def adapters(self) -> dict[str, Path]:
        """The loaded adapters' names and directories."""
        with self._lock:
            return dict(self._paths)

    def _slot(self, name: str) -> int:
        if name not in self._slots:
            raise InputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._slots)}); load it first")
        return self._slots[name]

    def _set_adapters(self, slots: list[int]) -> None:
        if self._lora is not None:
            self._lora.set_rows(slots)

    def _free_unloaded(self) -> None:
        with self._lock:
            if not self._unloading:
                return
            used = {r.adapter for r in self._queue} | {s.request.adapter for c in self._cohorts for s in c.seats}
            free = self._unloading - used
            self._unloading -= free
        for slot in free:
            self._lora.remove(slot)


def _sample_configs(config, n: int) -> list[GenerationConfig]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"samples per prompt (n) must be an integer >= 1, got {n!r}")
    if config is None:
        config = GenerationConfig()
    if isinstance(config, GenerationConfig):
        if config.seed is None or config.greedy:
            return [config] * n
        return [replace(config, seed=config.seed + i) for i in range(n)]
    configs = list(config)
    if len(configs) != n or not all(isinstance(c, GenerationConfig) for c in configs):
        raise InputError(f"got {len(configs)} generation configs for n={n} samples; pass one, or one per sample")
    return configs


def _finish_event(request: _Request, index: int, row: _Row) -> Event:
    return Event(request.id, index, None, row.take_text(), None, [], row.finish_reason)


def _start(model, prompts: list[list[int]], device):
    """Read every prompt in one pass (left-padded when their lengths differ): (state, [B, V] log-probs)."""
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    with torch.inference_mode():
        if all(len(p) == width for p in prompts):
            return model.start(padded)
        return model.start(padded, torch.tensor([len(p) for p in prompts], device=device))


def _fits_lockstep(model, requests: list[_Request]) -> bool:
    """Whether the rows can decode in lockstep: left-padded, every row takes up the longest
    prompt's slots plus one per step, which must stay within the model's context for as long as
    any row is still generating."""
    limit = getattr(model, "max_context", None)
    if limit is None:
        return True
    width = max(len(r.prompt) for r in requests)
    return all(width + row.budget <= limit + 1 for r in requests for row in r.rows)

"""A wall-clock budget for a training run (`--max-minutes`): minutes turned into optimizer steps.

The cosine and warmup-stable-decay schedules decay to `max_steps`, so a time limit that merely
stopped the run would cut the schedule off before its decay. Instead the run times its first
steps (inside the warm-up where it can, as those learning rates do not depend on the run's
length), then lowers max_steps to the steps that fit in the time left, and the schedule
completes inside the budget. The plan counts the validations the run will make (a validation
batch is a forward pass, about a third of a training micro-batch's forward, backward and
update) and keeps 5% of the budget for what it cannot foresee: checkpoints, and steps slower
than the timed ones. If the time runs out anyway, the run ends early as if it had reached
max_steps.
"""

from __future__ import annotations

import statistics
import time

CALIBRATION_STEPS = (5, 10)  # steps timed before planning: at least, at most
MARGIN = 0.05  # of the budget, kept for checkpoints and steps slower than the timed ones


def calibration_steps(warmup_steps: int) -> int:
    """The step to plan at: the end of the warm-up, kept between 5 and 10 timed steps."""
    low, high = CALIBRATION_STEPS
    return min(max(warmup_steps, low), high)


class Budget:
    """One process's clock against `minutes` of wall time from `start` (a perf_counter reading)."""

    def __init__(self, minutes: float, start: float, eval_cost: float):
        self.seconds = 60.0 * minutes
        self.start = start
        self.eval_cost = eval_cost  # one validation, in training steps
        self.times: list[float] = []

    def record(self, step_seconds: float) -> None:
        self.times.append(step_seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step_seconds(self) -> float:
        """The mean timed step (a mean, not a median: the budget pays for the slow ones too). The
        first is left out when there are others, as it pays for lazy initialisation (and
        compilation, with --compile)."""
        return statistics.fmean(self.times[1:] or self.times)

    def plan(self, done: int, max_steps: int, eval_interval: int, elapsed: float, step_seconds: float) -> int:
        """max_steps lowered to the steps that fit: `done` so far in `elapsed` seconds, then
        steps of `step_seconds`, a validation every `eval_interval` steps and one at the end."""
        left = self.seconds * (1 - MARGIN) - elapsed
        eval_seconds = self.eval_cost * step_seconds
        per_step = step_seconds + (eval_seconds / eval_interval if eval_interval else 0.0)
        return min(max_steps, done + max(int((left - eval_seconds) / per_step), 0))

    def out_of_time(self) -> bool:
        """Whether one more step and the closing validation would overrun the budget."""
        return self.elapsed() + (1 + self.eval_cost) * self.step_seconds() > self.seconds

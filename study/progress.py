"""One live progress view per study: what ran, what it found so far, and how long is left.

On a terminal the view is one line redrawn in place (at most once a second); elsewhere (``ray
job logs``, a file) it is printed when a trial ends and otherwise at most once a minute, so a
log of hundreds of trials stays readable. A line reads::

    study s: 3/8 trials · running 2 · complete 2 · pruned 1 · diverged 0 · failed 0 · best
    accuracy 0.8123 · front 2 · 2m31s elapsed · ETA 4m10s
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO

from ray import tune

from study.pareto import Point, non_dominated
from study.searcher import ACCURACY, COMPUTE, trial_outcome

#: how a trial can end, in the order the view counts them
OUTCOMES = ("complete", "pruned", "diverged", "failed")


def _duration(seconds: float) -> str:
    """``1h02m``, ``2m31s`` or ``45s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressView(tune.Callback):
    """Counts trials by state, keeps the completed trials' (accuracy, head compute) for the best
    accuracy and the size of the non-dominated front, and estimates the time left as
    ``remaining × elapsed / finished`` over the trials finished since this process started
    (a resumed study's earlier trials count as done, not as speed)."""

    def __init__(self, study: str, num_trials: int, stream: TextIO | None = None,
                 refresh_seconds: float | None = None) -> None:
        self.study = study
        self.num_trials = num_trials
        self.stream = stream
        self.refresh_seconds = refresh_seconds
        self.outcomes: Counter[str] = Counter()
        self.points: list[Point] = []
        self.running = 0
        self.started = time.monotonic()
        self.finished_here = 0
        self.last_drawn = float("-inf")
        self.last_line = ""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A restored view (``--resume``) keeps its counts and restarts its clock."""
        self.__dict__.update(state, started=time.monotonic(), finished_here=0,
                             last_drawn=float("-inf"), last_line="")

    @property
    def _stream(self) -> TextIO:
        return self.stream or sys.stdout

    @property
    def _live(self) -> bool:
        """Redraw in place: the stream is a terminal."""
        return self._stream.isatty()

    def line(self) -> str:
        """The current view, one line."""
        finished = sum(self.outcomes.values())
        elapsed = time.monotonic() - self.started
        parts = [f"study {self.study}: {finished}/{self.num_trials} trials",
                 f"running {self.running}",
                 *(f"{outcome} {self.outcomes[outcome]}" for outcome in OUTCOMES)]
        if self.points:
            parts += [f"best accuracy {max(p.accuracy for p in self.points):.4f}",
                      f"front {len(non_dominated(self.points))}"]
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.finished_here and finished < self.num_trials:
            left = (self.num_trials - finished) * elapsed / self.finished_here
            parts.append(f"ETA {_duration(left)}")
        return " · ".join(parts)

    def draw(self, force: bool = False) -> None:
        """Print the view: redrawn in place on a terminal, else as a new line (not when it
        equals the last); not more often than ``refresh_seconds`` (1 s live, 60 s otherwise)
        unless ``force``."""
        refresh = self.refresh_seconds or (1.0 if self._live else 60.0)
        now = time.monotonic()
        if not force and now - self.last_drawn < refresh:
            return
        line = self.line()
        if not self._live and line == self.last_line:
            return
        self.last_drawn, self.last_line = now, line
        self._stream.write(f"\r\x1b[K{line}" if self._live else f"{line}\n")
        self._stream.flush()

    def _count(self, trials: list) -> None:
        self.running = sum(trial.status == "RUNNING" for trial in trials)

    def _finish(self, trials: list, outcome: str, result: dict[str, Any] | None) -> None:
        self.outcomes[outcome] += 1
        self.finished_here += 1
        if outcome == "complete" and result and ACCURACY in result and COMPUTE in result:
            self.points.append(Point(run_id="", trial_id=str(result.get("trial_id", "")),
                                     space=str(result.get("space_name", "")),
                                     accuracy=float(result[ACCURACY]),
                                     flops=float(result[COMPUTE]), metrics={}, params={}))
        self._count(trials)
        self.draw(force=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._count(trials)
        self.draw()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials)
        self.draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial_outcome(trial.last_result, False,
                                           trial.config["trial"]["epochs"]), trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, "failed", trial.last_result)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._count(trials)
        self.draw(force=True)
        if self._live:
            self._stream.write("\n")
            self._stream.flush()

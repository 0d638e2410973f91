"""A compact progress table: one line per trial result and per trial end, on stdout."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ray import tune

from study.searcher import ACCURACY, COMPUTE, trial_outcome


class ProgressTable(tune.Callback):
    """Prints ``trial  space  epoch  accuracy  head GFLOP/sample  status`` as results arrive."""

    HEADER = f"{'trial':<14} {'space':<13} {'epoch':>5} {'accuracy':>9} {'GFLOP/smp':>10}  status"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._printed_header = False

    def _line(self, trial: Any, result: dict[str, Any] | None, status: str) -> None:
        stream = self.stream or sys.stdout
        if not self._printed_header:
            stream.write(self.HEADER + "\n")
            self._printed_header = True
        result = result or {}
        accuracy = result.get(ACCURACY)
        flops = result.get(COMPUTE)
        stream.write(
            f"{trial.trial_id:<14} {result.get('space_name', '')!s:<13} "
            f"{int(result.get('epoch', -1)) + 1:>5} "
            f"{'' if accuracy is None else f'{accuracy:.4f}':>9} "
            f"{'' if flops is None else f'{flops / 1e9:.4f}':>10}  {status}\n")
        stream.flush()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._line(trial, result, "diverged" if result.get("diverged") else "running")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, trial.last_result, trial_outcome(
            trial.last_result, False, trial.config["trial"]["epochs"]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, trial.last_result, "failed")

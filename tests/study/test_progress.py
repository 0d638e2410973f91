"""The study's one progress view: counts by outcome, best accuracy, front size, ETA; one line
redrawn in place on a terminal, throttled lines elsewhere."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import pytest

from study.progress import ProgressView, _duration
from study.searcher import ACCURACY, COMPUTE


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trial(status: str, epoch: int = 1, accuracy: float | None = None, flops: float = 1e6,
           **extra: float) -> SimpleNamespace:
    result = {"epoch": epoch, **extra}
    if accuracy is not None:
        result.update({ACCURACY: accuracy, COMPUTE: flops})
    return SimpleNamespace(status=status, config={"trial": {"epochs": 2}}, last_result=result)


def _clock(monkeypatch: pytest.MonkeyPatch, now: list[float]) -> None:
    monkeypatch.setattr("study.progress.time.monotonic", lambda: now[0])


def test_counts_best_front_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    _clock(monkeypatch, now)
    stream = io.StringIO()
    view = ProgressView("s", 6, stream=stream)
    running = _trial("RUNNING")
    done = [_trial("TERMINATED", accuracy=0.8, flops=4e6),  # front
            _trial("TERMINATED", accuracy=0.7, flops=1e6),  # front: cheaper
            _trial("TERMINATED", accuracy=0.6, flops=2e6),  # dominated
            _trial("TERMINATED", epoch=0, accuracy=0.9, flops=1e6)]  # pruned: not a point
    diverged = _trial("TERMINATED", epoch=0, diverged=1.0)
    trials = [running, *done, diverged]
    now[0] = 160.0
    for trial in done:
        view.on_trial_complete(0, trials, trial)
    view.on_trial_complete(0, trials, diverged)
    assert stream.getvalue().splitlines()[-1] == (
        "study s: 5/6 trials · running 1 · complete 3 · pruned 1 · diverged 1 · failed 0 · "
        "best accuracy 0.8000 · front 2 · 1m00s elapsed · ETA 12s")
    now[0] = 170.0
    view.on_trial_error(0, trials, running)
    assert stream.getvalue().splitlines()[-1].endswith("failed 1 · best accuracy 0.8000 · "
                                                       "front 2 · 1m10s elapsed")


def test_off_a_terminal_lines_are_throttled_but_every_trial_end_prints(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    _clock(monkeypatch, now)
    stream = io.StringIO()
    view = ProgressView("s", 4, stream=stream)
    trials = [_trial("RUNNING")]
    view.on_step_end(0, trials)
    for second in (1.0, 30.0, 59.0):
        now[0] = second
        view.on_step_end(0, trials)
    assert len(stream.getvalue().splitlines()) == 1  # once a minute at most
    view.on_trial_complete(0, trials, _trial("TERMINATED", accuracy=0.5))  # forced
    now[0] = 100.0
    view.on_step_end(0, trials)  # 41 s after the last line: not yet
    now[0] = 120.0
    view.on_step_end(0, trials)
    view.on_experiment_end(trials)  # the same line again: not repeated
    assert len(stream.getvalue().splitlines()) == 3
    assert "\r" not in stream.getvalue()


def test_on_a_terminal_the_line_is_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    _clock(monkeypatch, now)
    stream = Terminal()
    view = ProgressView("s", 2, stream=stream)
    for second in (0.0, 0.5, 1.5):
        now[0] = second
        view.on_step_end(0, [_trial("RUNNING")])
    view.on_experiment_end([])
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.count("\n") == 1 and text.endswith("\n")


def test_a_restored_view_keeps_its_counts_and_restarts_its_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    _clock(monkeypatch, now)
    view = ProgressView("s", 4, stream=io.StringIO())
    now[0] = 600.0
    view.on_trial_complete(0, [], _trial("TERMINATED", accuracy=0.5))
    now[0] = 1000.0
    restored = pickle.loads(pickle.dumps(view))  # Tune pickles callbacks with its state
    restored.stream = io.StringIO()
    now[0] = 1030.0
    assert restored.line() == ("study s: 1/4 trials · running 0 · complete 1 · pruned 0 · "
                               "diverged 0 · failed 0 · best accuracy 0.5000 · front 1 · "
                               "30s elapsed")


@pytest.mark.parametrize(("seconds", "text"), [(45.4, "45s"), (151, "2m31s"),
                                               (3720, "1h02m")])
def test_duration(seconds: float, text: str) -> None:
    assert _duration(seconds) == text

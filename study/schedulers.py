"""Early stopping for a study: ``build_scheduler`` and a multi-objective ASHA.

``--scheduler asha`` is Ray's ASHA on verification accuracy alone: at its first rung it stops
a cheap trial that trails in accuracy, even when no other trial is both as accurate and as
cheap — the cheap end of the accuracy/compute front. ``mo-asha`` (``MultiObjectiveASHA``)
ranks each rung by both objectives instead; ``none`` runs every trial to its last epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from study.options import SCHEDULERS, StudyOptions
from study.searcher import ACCURACY, COMPUTE

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

#: the first rung, in epochs (Tune's ``training_iteration``: one report per epoch)
GRACE_PERIOD = 1
#: each rung is this many times later than the one before and keeps 1/this of its trials
REDUCTION_FACTOR = 2

#: a trial's (verification accuracy, head FLOPs per sample): the first maximised, the second
#: minimised
Objectives = tuple[float, float]


def dominates(p: Objectives, q: Objectives) -> bool:
    """``p`` is at least as accurate and at most as costly as ``q``, and differs from it."""
    return p[0] >= q[0] and p[1] <= q[1] and p != q


def nondominated_ranks(points: Sequence[Objectives]) -> list[int]:
    """Each point's non-dominated front (NSGA-II sorting): 0 when no point dominates it, else
    1 + the largest front among the points that dominate it.

    O(n log n) for two objectives: visited by compute ↑ (accuracy ↓ on ties), a point comes
    after every point that dominates it. The fronts dominating it are a prefix 0 … k−1 (a
    dominator in front j is dominated from front j−1), and front j dominates it exactly when
    the most recent point placed in j (the most accurate of j so far) does — so its front k is
    found by bisection.
    """
    ranks = [0] * len(points)
    latest: list[Objectives] = []  # per front, the point last placed in it
    for index in sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0])):
        point = points[index]
        rank = bisect.bisect_left(range(len(latest)), True,
                                  key=lambda front: not dominates(latest[front], point))
        if rank == len(latest):
            latest.append(point)
        else:
            latest[rank] = point
        ranks[index] = rank
    return ranks


def crowding_distances(front: Sequence[Objectives]) -> list[float]:
    """NSGA-II crowding distance of each point of one front: summed over the objectives, the
    gap between its two neighbours in that objective's order over the objective's range
    (max − min); the extreme points of an objective get ∞. An objective with no range adds 0."""
    distances = [0.0] * len(front)
    for objective in range(2):
        order = sorted(range(len(front)), key=lambda i: front[i][objective])
        low, high = front[order[0]][objective], front[order[-1]][objective]
        if high == low:
            continue
        distances[order[0]] = distances[order[-1]] = math.inf
        for k in range(1, len(order) - 1):
            gap = front[order[k + 1]][objective] - front[order[k - 1]][objective]
            distances[order[k]] += gap / (high - low)
    return distances


def survivors(recorded: Mapping[str, Objectives], reduction_factor: float) -> set[str]:
    """The trials of a rung that may continue: every one on the first non-dominated front, and
    any other among the top ``len(recorded) / reduction_factor`` in NSGA-II order — by front,
    then by crowding distance, larger first (ties in crowding distance share their place)."""
    trials, points = list(recorded), list(recorded.values())
    ranks = nondominated_ranks(points)
    fronts: dict[int, list[int]] = {}
    for index, rank in enumerate(ranks):
        fronts.setdefault(rank, []).append(index)
    crowding = [0.0] * len(points)
    for members in fronts.values():
        distances = crowding_distances([points[i] for i in members])
        for index, distance in zip(members, distances, strict=True):
            crowding[index] = distance
    keys = [(rank, -distance) for rank, distance in zip(ranks, crowding, strict=True)]
    ordered = sorted(keys)
    quota = len(points) / reduction_factor
    return {trial for trial, key in zip(trials, keys, strict=True)
            if key[0] == 0 or bisect.bisect_left(ordered, key) < quota}


def _objectives(result: Mapping[str, Any]) -> Objectives | None:
    """The result's (accuracy, compute), or None when either is missing or not finite."""
    values = result.get(ACCURACY), result.get(COMPUTE)
    if not all(isinstance(v, Real) and math.isfinite(v) for v in values):
        return None
    return float(values[0]), float(values[1])


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving on (verification accuracy ↑, head FLOPs per sample ↓).

    Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving"
    (https://arxiv.org/abs/2106.12639), keep ASHA's asynchronous promotion but replace its
    one-metric ranking with a multi-objective one. Here: rungs sit at ``grace_period`` ×
    ``reduction_factor``^k epochs below ``max_t``. The first result a trial reports at or past
    a rung is recorded there, and the trial continues only if ``survivors`` keeps it among the
    trials recorded at that rung so far, itself included: it is on their first non-dominated
    front, or among their top 1/``reduction_factor`` by non-dominated sorting, the last front
    filled by crowding distance (NSGA-II). A cheap trial no other trial beats on both
    objectives therefore always survives, however low its accuracy. Results without finite
    objectives (a diverged trial) are neither recorded nor stopped.

    A trial is judged when it arrives at a rung, against the trials that arrived before it,
    as in Ray's ASHA. The rungs are plain data: the scheduler pickles with the Tuner that
    ``--resume`` restores. Per decision: O(n log n) in the n trials at the rung.
    """

    def __init__(self, max_t: int, grace_period: int = GRACE_PERIOD,
                 reduction_factor: float = REDUCTION_FACTOR,
                 time_attr: str = "training_iteration") -> None:
        if grace_period <= 0:
            raise ValueError(f"`grace_period > 0` must hold, but got {grace_period=}.")
        if reduction_factor <= 1:
            raise ValueError(f"`reduction_factor > 1` must hold, but got {reduction_factor=}.")
        super().__init__()
        self.time_attr = time_attr
        self.reduction_factor = reduction_factor
        #: rung milestone (ascending) -> {trial id: its objectives when it reached the rung}
        self.rungs: dict[float, dict[str, Objectives]] = {}
        milestone: float = grace_period
        while milestone < max_t:
            self.rungs[milestone] = {}
            milestone *= reduction_factor
        self.num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accepts no single metric or mode from ``TuneConfig``: the objectives are fixed."""
        return metric is None and mode is None

    def on_trial_result(self, tune_controller: Any, trial: Trial,
                        result: dict[str, Any]) -> str:
        """STOP a trial that reached a new rung outside that rung's survivors, else CONTINUE."""
        time = result.get(self.time_attr)
        objectives = _objectives(result)
        reached = [milestone for milestone in self.rungs
                   if isinstance(time, Real) and milestone <= time]
        if objectives is None or not reached:
            return TrialScheduler.CONTINUE
        rung = self.rungs[reached[-1]]
        if trial.trial_id in rung:
            return TrialScheduler.CONTINUE
        rung[trial.trial_id] = objectives
        if trial.trial_id in survivors(rung, self.reduction_factor):
            return TrialScheduler.CONTINUE
        self.num_stopped += 1
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        sizes = ", ".join(f"{milestone:g}: {len(rung)}" for milestone, rung in self.rungs.items())
        return (f"Using multi-objective ASHA: num_stopped={self.num_stopped}; trials per rung "
                f"{{{sizes}}}")


def build_scheduler(options: StudyOptions) -> TrialScheduler:
    """The study's scheduler (``--scheduler``), its rungs from ``GRACE_PERIOD`` to the largest
    trial's epochs: ``asha`` (Ray's ASHA on accuracy), ``mo-asha`` (``MultiObjectiveASHA``), or
    ``none`` (FIFO). FIFO too when no trial runs more than one epoch: nothing to stop early."""
    if options.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler = {options.scheduler!r} is not one of {list(SCHEDULERS)}")
    max_epochs = options.max_epochs
    if options.scheduler == "none" or max_epochs <= GRACE_PERIOD:
        return FIFOScheduler()
    if options.scheduler == "asha":
        return ASHAScheduler(metric=ACCURACY, mode="max", max_t=max_epochs,
                             grace_period=GRACE_PERIOD, reduction_factor=REDUCTION_FACTOR)
    return MultiObjectiveASHA(max_t=max_epochs)

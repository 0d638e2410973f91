"""The Pareto front and the best-at-budget choice against hand-built points."""

from __future__ import annotations

import itertools
import random

from study.pareto import Point, best_at_budget, non_dominated


def _point(name: str, accuracy: float, flops: float) -> Point:
    return Point(name, name, "s", accuracy, flops, {}, {})


def test_front_by_hand() -> None:
    points = [_point("a", 0.70, 10), _point("b", 0.80, 20), _point("c", 0.75, 30),
              _point("d", 0.80, 25), _point("e", 0.60, 5), _point("f", 0.90, 40)]
    assert [p.run_id for p in non_dominated(points)] == ["e", "a", "b", "f"]


def test_front_is_exactly_the_undominated_set() -> None:
    rng = random.Random(0)
    points = [_point(str(i), rng.choice([0.5, 0.6, 0.7, 0.8]), rng.choice([1, 2, 3, 4]))
              for i in range(40)]
    front = {p.run_id for p in non_dominated(points)}
    for p, q in itertools.permutations(points, 2):
        dominates = (q.accuracy >= p.accuracy and q.flops <= p.flops
                     and (q.accuracy, q.flops) != (p.accuracy, p.flops))
        if dominates:
            assert p.run_id not in front
    for p in points:
        if p.run_id not in front:
            assert any(q.accuracy >= p.accuracy and q.flops <= p.flops
                       and (q.accuracy, q.flops) != (p.accuracy, p.flops) for q in points)


def test_best_at_budget() -> None:
    points = [_point("cheap", 0.7, 10), _point("mid", 0.8, 50), _point("full", 0.85, 100)]
    assert best_at_budget(points, 0.5).run_id == "mid"
    assert best_at_budget(points, 1.0).run_id == "full"
    assert best_at_budget(points, 0.05) is None
    assert best_at_budget([], 0.5) is None

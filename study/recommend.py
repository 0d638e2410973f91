"""The deployable answer of a study: the cheapest trial as good as the best at one FAR.

Over the completed trials (``study.pareto.completed_points``, their last epoch's metrics) that
report TAR at the target false-accept rate F (``tar_at_far_<F>``, held-out verification):

- the *reference* is the trial with the highest TAR@F (ties: higher verification accuracy,
  fewer head FLOPs, then run id);
- ε is the reference's own spread of TAR@F over the 10 verification folds
  (``tar_at_far_<F>_std``), or the ``epsilon`` given;
- the *recommendation* is, among the trials with TAR@F ≥ TAR@F(reference) − ε, the one with
  the fewest head FLOPs per sample (ties: higher TAR@F, higher accuracy, then run id).

Why that spread: ε must be a TAR difference the trial's own evaluation cannot tell from
noise. The LFW protocol's fold spread is that for accuracy; for TAR at FAR 1e-3 a fold holds
too few impostors to resolve the FAR by itself, so ``workers.evaluation`` fixes the threshold
on all the impostor pairs and takes the spread, over the folds, of the fraction of each fold's
genuine pairs it accepts.

``write_recommendation`` exports ``recommended.yaml`` — the trial's config, which
``python -m workers.train --config recommended.yaml`` runs, under a comment header holding the
operating point (the ``# recommendation:`` block: YAML once uncommented) — and
``recommended.md``, one paragraph on why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from study.pareto import Point, run_trial_config
from workers.config import TAR_AT_FAR, TAR_AT_FAR_STD, THRESHOLD_AT_FAR

#: the files ``write_recommendation`` writes
RECOMMENDED_FILES = ("recommended.yaml", "recommended.md")
_ACCURACY_STD = "verification_accuracy_std"
_THROUGHPUT = "samples_per_second"
#: ``Recommendation.epsilon_source`` when ε is the best trial's fold spread
FOLD_SPREAD = "the best trial's spread of TAR over its 10 verification folds"


class NoRecommendation(ValueError):
    """No trial can be recommended at this FAR; the message says why, in one line."""


@dataclass(frozen=True)
class Recommendation:
    """The chosen trial, the reference it was compared with and the rule's numbers."""

    point: Point
    #: the trial with the highest TAR at ``far``
    best: Point
    far: float
    epsilon: float
    #: where ε came from, in words
    epsilon_source: str
    #: how many trials reached TAR ≥ the best's − ε
    within: int

    def tar(self, point: Point | None = None) -> float:
        """TAR at ``far`` of ``point`` (default: the recommended one)."""
        return (point or self.point).metrics[TAR_AT_FAR.format(far=self.far)]

    def facts(self) -> dict[str, Any]:
        """The operating point and why, as plain values (``recommended.yaml``'s header)."""
        metrics = self.point.metrics
        return {
            "run_id": self.point.run_id, "trial_id": self.point.trial_id,
            "space": self.point.space, "target_far": self.far,
            "threshold": metrics[THRESHOLD_AT_FAR.format(far=self.far)],
            "accept": "cosine of the two embeddings > threshold",
            "tar": self.tar(), "tar_fold_std": metrics.get(TAR_AT_FAR_STD.format(far=self.far)),
            "verification_accuracy": self.point.accuracy,
            "verification_accuracy_std": metrics.get(_ACCURACY_STD),
            "head_flops_per_sample": self.point.flops,
            "samples_per_second": metrics.get(_THROUGHPUT),
            "epsilon": self.epsilon, "epsilon_source": self.epsilon_source,
            "trials_within_epsilon": self.within,
            "best_tar": {"run_id": self.best.run_id, "trial_id": self.best.trial_id,
                         "space": self.best.space, "tar": self.tar(self.best),
                         "verification_accuracy": self.best.accuracy,
                         "head_flops_per_sample": self.best.flops},
        }


def recommend(points: Sequence[Point], far: float, epsilon: float | None = None
              ) -> Recommendation:
    """The cheapest of ``points`` whose TAR at ``far`` is within ε of the best (module
    docstring); ``NoRecommendation`` when no point reports TAR and its threshold at ``far``,
    or when ε is the reference's fold spread and it does not report one."""
    name, threshold = TAR_AT_FAR.format(far=far), THRESHOLD_AT_FAR.format(far=far)
    scored = [p for p in points if name in p.metrics and threshold in p.metrics]
    if not scored:
        held = f"none of the {len(points)} completed trials reports {name} and {threshold}" \
            if points else "no trial completed"
        raise NoRecommendation(
            f"no recommendation at --target-far {far:g}: {held} (a FAR is reported when FAR × "
            f"impostor pairs ≥ 1; held-out pairs are half impostors, so evaluation.num_pairs ≥ "
            f"{math.ceil(2 / far - 1e-9)} resolves it), or pick a larger --target-far")
    best = min(scored, key=lambda p: (-p.metrics[name], -p.accuracy, p.flops, p.run_id))
    if epsilon is None:
        spread = TAR_AT_FAR_STD.format(far=far)
        if spread not in best.metrics:
            raise NoRecommendation(f"no recommendation at --target-far {far:g}: the best trial "
                                   f"(run {best.run_id}) does not report {spread}; give "
                                   "--epsilon")
        epsilon, source = best.metrics[spread], FOLD_SPREAD
    else:
        source = "--epsilon"
    within = [p for p in scored if p.metrics[name] >= best.metrics[name] - epsilon]
    chosen = min(within, key=lambda p: (p.flops, -p.metrics[name], -p.accuracy, p.run_id))
    return Recommendation(chosen, best, far, epsilon, source, len(within))


def explanation(recommendation: Recommendation) -> str:
    """One paragraph (Markdown): the operating point, and why this trial and not the one
    with the best TAR."""
    r, facts = recommendation, recommendation.facts()
    chosen, best = r.point, r.best
    noise = ", a difference that evaluation cannot tell from noise" \
        if r.epsilon_source == FOLD_SPREAD else ""
    measured = (f", and trained at {facts['samples_per_second']:.0f} samples/s"
                if facts["samples_per_second"] is not None else "")
    spread = (f" (± {facts['tar_fold_std']:.2%} over the verification folds)"
              if facts["tar_fold_std"] is not None else "")
    accuracy_spread = (f" ± {facts['verification_accuracy_std']:.2%}"
                       if facts["verification_accuracy_std"] is not None else "")
    opening = (
        f"**Recommended: {chosen.space} trial {chosen.trial_id}** (MLflow run "
        f"`{chosen.run_id}`). At FAR {r.far:g} on the held-out pairs it accepts "
        f"{r.tar():.2%} of genuine pairs{spread} at the cosine threshold "
        f"{facts['threshold']:.4f} (a pair is accepted when the cosine of its embeddings is "
        f"above it), with verification accuracy {chosen.accuracy:.2%}{accuracy_spread}; its "
        f"head costs {_si(chosen.flops)}FLOP per sample{measured}. ")
    if chosen.run_id == best.run_id:
        reason = (f"It is also the trial with the best TAR at this FAR: no trial with less "
                  f"head compute came within ε = {r.epsilon:.2%} of it (ε: {r.epsilon_source}).")
    else:
        reason = (
            f"It was chosen over the most accurate trial at this FAR, {best.space} trial "
            f"{best.trial_id} (TAR {r.tar(best):.2%}, accuracy {best.accuracy:.2%}, "
            f"{_si(best.flops)}FLOP per sample), because its TAR is within ε = {r.epsilon:.2%} "
            f"of that trial's (ε: {r.epsilon_source}{noise}) for "
            f"{best.flops / chosen.flops:.1f}× less head compute: it is the cheapest of the "
            f"{r.within} trials within ε.")
    return (opening + reason + " Train it with "
            "`python -m workers.train --config recommended.yaml`.\n")


def write_recommendation(client: MlflowClient, recommendation: Recommendation,
                         directory: Path) -> list[Path]:
    """``recommended.yaml`` (the trial's own config under a commented ``recommendation:``
    header, ``Recommendation.facts``) and ``recommended.md`` (``explanation``) in
    ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = run_trial_config(client, recommendation.point.run_id)
    header = yaml.safe_dump({"recommendation": recommendation.facts()}, sort_keys=False,
                            allow_unicode=True)
    yaml_path, markdown_path = (directory / name for name in RECOMMENDED_FILES)
    yaml_path.write_text(
        "# marginlab's recommended trial: python -m workers.train --config recommended.yaml\n"
        + "".join(f"# {line}\n" for line in header.splitlines()) + config.to_yaml())
    markdown_path.write_text(explanation(recommendation))
    return [yaml_path, markdown_path]


def export_recommendation(client: MlflowClient, points: Sequence[Point], far: float,
                          epsilon: float | None, directory: Path
                          ) -> tuple[dict[str, Any] | None, str]:
    """``recommend`` then ``write_recommendation``: ``(facts, "")``, the facts with the
    ``files`` written; or ``(None, why)`` with ``NoRecommendation``'s line, and no
    recommendation file left in ``directory``."""
    try:
        recommendation = recommend(points, far, epsilon)
    except NoRecommendation as error:
        for name in RECOMMENDED_FILES:
            (directory / name).unlink(missing_ok=True)
        return None, str(error)
    files = write_recommendation(client, recommendation, directory)
    return {**recommendation.facts(), "files": [str(path) for path in files]}, ""


def _si(value: float) -> str:
    """``value`` with an SI prefix and a trailing space, e.g. ``49.2 k``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def summary_lines(facts: dict[str, Any]) -> list[str]:
    """What ``study/run.py`` prints of a recommendation (``facts``: ``Recommendation.facts()``
    with its ``files``)."""
    best = facts["best_tar"]
    tar_std = "" if facts["tar_fold_std"] is None else f" ± {facts['tar_fold_std']:.4f}"
    accuracy_std = ("" if facts["verification_accuracy_std"] is None
                    else f" ± {facts['verification_accuracy_std']:.4f}")
    speed = ("" if facts["samples_per_second"] is None
             else f", {facts['samples_per_second']:.0f} samples/s")
    ratio = best["head_flops_per_sample"] / facts["head_flops_per_sample"]
    compared = ("also the best TAR: no trial with fewer head FLOPs came within ε"
                if best["run_id"] == facts["run_id"] else
                f"chosen over {best['space']} trial {best['trial_id']}: best TAR "
                f"{best['tar']:.4f}, {ratio:.1f}× the head FLOPs")
    return [
        f"recommended at FAR {facts['target_far']:g} (cheapest trial within ε = "
        f"{facts['epsilon']:.4f} of the best TAR; ε: {facts['epsilon_source']}):",
        f"  {facts['space']} trial {facts['trial_id']} (run {facts['run_id']}): threshold "
        f"{facts['threshold']:.4f} (accept cosine > threshold), TAR {facts['tar']:.4f}{tar_std}, "
        f"acc {facts['verification_accuracy']:.4f}{accuracy_std}, "
        f"{_si(facts['head_flops_per_sample'])}FLOP/sample{speed}",
        f"  {compared}",
        *(f"  {path}" for path in facts["files"]),
    ]

"""Where a study's trial time goes: run a study, then break each trial's wall time down from
MLflow and the workers' own timings (``study.analysis.time_breakdown``): start-up, setup
(data, model), training steps, evaluation, checkpoint writing, report delivery, teardown, and
what none of them measured.

The two budgets of issue 18, over all trials of the study:

* fixed share = (Σ wall − Σ train − Σ eval) / Σ wall  (target ≤ 15 %);
* eval / train = Σ eval / Σ train  (target ≤ 15 %).

Usage: ``python bench/study_overhead.py [--label after] [-- STUDY FLAGS...]``; with no study
flags it runs the default study (``python study/run.py`` as the README's quick start does) in a
temporary ``MARGINLAB_HOME``. Prints a table per trial and the totals; merges the result into
``bench/results/study_overhead.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from study.analysis import PHASES, load_study, time_breakdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "study_overhead.json"


def run_study(home: Path, flags: list[str]) -> tuple[str, float]:
    """Run ``study/run.py`` with ``flags`` under ``home``; returns its tracking URI and the
    study's wall seconds."""
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {**os.environ, "MARGINLAB_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), "--name", "overhead",
                    "--tracking-uri", tracking_uri, *flags], check=True, env=env, cwd=home)
    return tracking_uri, time.perf_counter() - started


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Totals over the trials, the two budget ratios and the largest unmeasured share."""
    totals = {name: float(table[name].sum()) for name in ("wall", *PHASES)}
    return {**totals,
            "trials": len(table),
            "fixed_share": (totals["wall"] - totals["train"] - totals["eval"]) / totals["wall"],
            "eval_over_train": totals["eval"] / totals["train"],
            "max_other_share": float((table["other"].abs() / table["wall"]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="default",
                        help="key of this run in bench/results/study_overhead.json")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="after --: flags for study/run.py (default: none)")
    args = parser.parse_args()
    flags = [flag for flag in args.flags if flag != "--"]
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as home:
        tracking_uri, study_wall = run_study(Path(home), flags)
        table = time_breakdown(load_study(tracking_uri, "overhead"))
    summary = {**summarise(table), "study_wall": study_wall}
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["run_id"]).round(2).to_string(index=False))
    print(f"\n{summary['trials']} trials, study {study_wall:.0f} s: fixed share "
          f"{summary['fixed_share']:.1%} (target ≤ 15 %), eval / train "
          f"{summary['eval_over_train']:.1%} (target ≤ 15 %), largest unmeasured share of a "
          f"trial {summary['max_other_share']:.1%}")
    shares = {phase: summary[phase] / summary["wall"] for phase in PHASES}
    print("share of trial wall time: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored[args.label] = {"date": datetime.datetime.now(datetime.UTC).isoformat(),
                          "flags": flags, "cpus": os.cpu_count(), "summary": summary,
                          "shares": shares, "trials": table.to_dict(orient="records")}
    RESULTS.write_text(json.dumps(stored, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

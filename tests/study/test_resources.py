"""What a study may run at once, and the trials no cluster can place: CPUs *and* GPUs, node by
node. GPUs cannot exist here: the GPU cases give the cap and the check resource dicts as Ray
reports them; the unplaceable-trial case runs a real two-node Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from study.driver import concurrency_limit, run_study
from study.options import StudyOptions
from study.run import build_parser, options_from_args
from workers.config import ConfigError
from workers.train import check_resources, workers_that_fit


def _options(tmp_path: Path, *flags: str, ray_address: str = "head:6379") -> StudyOptions:
    """Options for a study on the cluster at ``ray_address`` (not this machine: its CPUs do
    not bound the trials)."""
    return options_from_args(build_parser().parse_args([
        "--name", "res", "--storage", str(tmp_path / "studies"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--space", "cosface",
        "--ray-address", ray_address, *flags]))


@pytest.mark.parametrize(("flags", "cluster", "expected"), [
    # 0.1 + 2 × 0.45 = 1 CPU per trial: CPUs decide
    ((), {"CPU": 3.0}, 3),
    # 0.1 + 2 × 1 CPU and 2 × 1 GPU per trial: 8 GPUs hold 4 trials, 64 CPUs 30
    (("--cpus-per-worker", "1", "--gpus-per-worker", "1"), {"CPU": 64.0, "GPU": 8.0}, 4),
    # the same trials on 6 CPUs: CPUs decide again (2 trials), GPUs would allow 4
    (("--cpus-per-worker", "1", "--gpus-per-worker", "1"), {"CPU": 6.0, "GPU": 8.0}, 2),
    # half a GPU per worker: 1 GPU per trial
    (("--cpus-per-worker", "1", "--gpus-per-worker", "0.5"), {"CPU": 64.0, "GPU": 3.0}, 3),
    # never fewer than one (the resource check refuses what cannot run at all)
    (("--cpus-per-worker", "1", "--gpus-per-worker", "1"), {"CPU": 64.0, "GPU": 1.0}, 1),
])
def test_concurrency_counts_cpus_and_gpus(tmp_path: Path, flags: tuple[str, ...],
                                          cluster: dict[str, float], expected: int) -> None:
    options = _options(tmp_path, "--workers", "2", "--concurrent", "100", *flags)
    assert concurrency_limit(options, cluster) == expected


def test_concurrency_never_exceeds_the_flag(tmp_path: Path) -> None:
    options = _options(tmp_path, "--workers", "1", "--concurrent", "2")
    assert concurrency_limit(options, {"CPU": 64.0}) == 2


def test_workers_fit_node_by_node() -> None:
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 3.0}]
    assert workers_that_fit({"CPU": 2.0, "GPU": 1.0}, nodes) == 3
    assert workers_that_fit({"CPU": 2.0, "GPU": 0.0}, nodes) == 9
    assert workers_that_fit({"CPU": 9.0, "GPU": 0.0}, nodes) == 0


def test_a_worker_no_node_holds_is_refused_although_the_totals_suffice(tmp_path: Path) -> None:
    trial = _options(tmp_path, "--workers", "2", "--cpus-per-worker", "3").largest_trials[0]
    totals = {"CPU": 8.0}
    check_resources(trial, totals)  # 6.0 CPUs of 8: the totals alone let it through
    with pytest.raises(ConfigError) as error:
        check_resources(trial, totals, names={"resources.cpus_per_worker": "--cpus-per-worker"},
                        nodes=[{"CPU": 4.0}, {"CPU": 2.0}, {"CPU": 2.0}])
    assert error.value.lines == [
        "resources.num_workers = 2 workers of --cpus-per-worker = 3.0 and "
        "resources.gpus_per_worker = 0.0 each: only 1 fit on the cluster's 3 node(s) (a worker "
        "lives on one node; the largest has 4 CPUs, 0 GPUs)"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unplaceable_trial_is_refused_in_seconds_on_a_real_two_node_cluster(
        tmp_path: Path) -> None:
    """Two 1-CPU nodes (2 CPUs in all) and workers of 1.5 CPUs: the totals suffice, no node
    does. The study refuses before any trial starts instead of waiting for a placement group
    that can never be placed."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        options = _options(tmp_path, "--workers", "1", "--cpus-per-worker", "1.5",
                           ray_address=cluster.address)
        with pytest.raises(ConfigError, match=r"only 0 fit on the cluster's 2 node\(s\)"):
            run_study(options)  # returns at all: Tune would wait on the placement group
        assert not (tmp_path / "studies" / "res").exists(), "the study was opened"
    finally:
        ray.shutdown()
        cluster.shutdown()

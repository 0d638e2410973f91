"""``--warm-start``: each space's published setting as the study's first Optuna trials, never
enqueued twice, and refused up front where it cannot mean that; one real study end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.driver import enqueue_warm_start
from study.options import StudyOptions
from study.run import UsageError, build_parser, options_from_args
from study.searcher import MODES, TUNE_TRIAL_ATTR, SpaceSampler
from study.tracking import TRIAL_ID_TAG
from tests.services import study_env, tiny_study_command

#: the Optuna params of the published settings (LOSSES.md), as a normface + arcface study
#: samples them
NORMFACE = {"space": "normface", "normface.loss.scale": 64.0,
            "normface.head.sample_ratio": 1.0, "normface.head.sampling": "uniform",
            "normface.optim.lr": 0.1}
ARCFACE = {"space": "arcface", "arcface.loss.margin": 0.5, "arcface.loss.scale": 64.0,
           "arcface.loss.margin_grad": "true", "arcface.head.sample_ratio": 1.0,
           "arcface.head.sampling": "uniform", "arcface.optim.lr": 0.1}


def _options(tmp_path: Path, *flags: str) -> StudyOptions:
    return options_from_args(build_parser().parse_args([
        "--name", "warm", "--storage", str(tmp_path / "studies"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags]))


def _new_study(options: StudyOptions) -> optuna.Study:
    options.study_dir.mkdir(parents=True)
    return optuna.create_study(study_name=options.name, storage=options.optuna_url,
                               directions=["maximize" if m == "max" else "minimize"
                                           for m in MODES])


@pytest.mark.parametrize("spaces", [["normface", "arcface"], ["arcface"]])
def test_defaults_are_asked_first_and_enqueued_once(spaces: list[str], tmp_path: Path) -> None:
    options = _options(tmp_path, "--space", *spaces, "--warm-start")
    study = _new_study(options)
    assert enqueue_warm_start(options) == len(spaces)
    assert enqueue_warm_start(options) == 0  # a resumed study: they are there already
    sampler = SpaceSampler(options.spaces, options.base)
    for number, space in enumerate(options.spaces):
        trial = study.ask()
        config = sampler(trial)
        assert trial.number == number and config["space_name"] == space.name
        expected = space.trial_config(space.warm_start(), options.base)
        assert config["trial"]["loss"] == expected["loss"]
        assert config["trial"]["head"]["sample_ratio"] == 1.0
        assert config["trial"]["optim"]["lr"] == 0.1
    if len(spaces) == 2:
        assert [trial.params for trial in study.trials] == [NORMFACE, ARCFACE]
    else:
        assert study.trials[0].params == {key.removeprefix("arcface."): value
                                          for key, value in ARCFACE.items() if key != "space"}
    assert len(study.trials) == len(spaces)  # nothing else was enqueued


def test_without_the_flag_nothing_is_enqueued(tmp_path: Path) -> None:
    options = _options(tmp_path)
    study = _new_study(options)
    assert enqueue_warm_start(options) == 0 and study.trials == []


def test_warm_start_is_refused_where_it_cannot_mean_the_defaults(tmp_path: Path) -> None:
    def refusal(*flags: str) -> str:
        with pytest.raises(UsageError) as error:
            _options(tmp_path, "--warm-start", *flags)
        return str(error.value)

    assert refusal("--space", "normface", "arcface", "--trials", "1") == (
        "--trials = 1 must be ≥ 2 with --warm-start (one trial per space's published setting)")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"version": 1, "name": "g", "loss": "normface", "params": {
        "head.sampling": {"distribution": "categorical", "choices": ["uniform", "batch"]}}}))
    assert refusal("--space", str(grid), "--sampler", "grid", "--trials", "2") == (
        "--warm-start cannot be combined with --sampler grid (the grid runs each of its points "
        "once; drop --warm-start)")
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump({"version": 1, "name": "n", "loss": "cosface", "params": {
        "loss.margin": {"distribution": "uniform", "low": 0.1, "high": 0.3}}}))
    assert refusal("--space", str(narrow)) == (
        f"{narrow}: params.loss.margin: its default 0.35 is not a number in [0.1, 0.3]; give "
        "defaults.loss.margin to warm-start this space")


@pytest.mark.slow
def test_a_warm_started_study_runs_the_defaults_first(tmp_path: Path) -> None:
    """A real 2-trial study over normface and arcface: its trials are the published settings
    (that they come first: ``test_defaults_are_asked_first_and_enqueued_once``), and it ends
    with its recommendation at FAR 1e-2."""
    command = tiny_study_command("warm", tmp_path, "--space", "normface", "arcface",
                                 "--trials", "2", "--warm-start", "--target-far", "1e-2")
    process = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]

    study = optuna.load_study(study_name="warm",
                              storage=f"sqlite:///{tmp_path / 'studies' / 'warm' / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda trial: trial.number)
    assert [trial.params for trial in trials] == [NORMFACE, ARCFACE]
    # and the trials ran them: each child run's params are the defaults
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("warm").experiment_id
    children = {run.data.tags[TRIAL_ID_TAG]: run for run in client.search_runs([experiment])
                if MLFLOW_PARENT_RUN_ID in run.data.tags}
    for trial, loss in zip(trials, ("normface", "arcface"), strict=True):
        params = children[trial.user_attrs[TUNE_TRIAL_ATTR]].data.params
        assert (params["head.loss"], params["head.scale"], params["inter.sample_ratio"],
                params["optim.lr"]) == (loss, "64.0", "1.0", "0.1")
    assert children[trials[1].user_attrs[TUNE_TRIAL_ATTR]].data.params["intra.margin"] == "0.5"

    parent = next(iter(children.values())).data.tags[MLFLOW_PARENT_RUN_ID]
    assert {"recommended.yaml", "recommended.md"} <= {
        artifact.path for artifact in client.list_artifacts(parent)}
    assert "\nrecommended at FAR 0.01 (cheapest trial within ε = " in process.stdout
    assert "recommended.yaml\n" in process.stdout

"""The bad-input matrix: every field of a search space, a trial config, an exported config and
the CLI, pushed out of range, of the wrong type, missing or unknown, gives one line naming the
file or flag, the field and what is allowed, before any Ray or training starts.

Cases are built from the code where possible (every loss hyperparameter's domain, every
trial-config and data field's constraints); the file, flag and range texts expected are
written here. Tests run as root, so ``chmod`` cannot make a file unreadable: an "unreadable"
path is a folder where a file is expected, a path under a regular file or a corrupt file.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from pydantic import BaseModel

from search_spaces import SpaceError, load_space
from study import run as study_run
from tests.services import free_port
from workers import train as workers_train
from workers.config import ConfigError, TrialConfig, field_constraints, parse_trial_config
from workers.data import DataConfig, write_recordio
from workers.losses import Choice, Interval, get_loss_class, list_losses

ROOT = Path(__file__).resolve().parents[2]
TMP = "{tmp}"  # replaced by the case's tmp_path in inputs and expected texts
FLOOR = 150

Make = Callable[[Path], Any]


@dataclass(frozen=True)
class Case:
    """One bad input: ``entry`` (trial, space, export or cli), a maker building the input
    in a tmp dir, and the substrings its single error line must contain."""

    id: str
    entry: Literal["trial", "space", "export", "cli"]
    make: Make
    expected: tuple[str, ...]


def _value(value: Any) -> Make:
    return lambda tmp: value


def _file(name: str, content: Any) -> Make:
    """A maker writing ``content`` (text, bytes or YAML data) to ``tmp/name``."""
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str)
                            else yaml.safe_dump(content, sort_keys=False))
        return path
    return make


def _not_a_file(name: str) -> Make:
    """A folder where a file is expected (root reads every file, so this is 'unreadable')."""
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name
    return make


# --- trial-config fields, walked from the pydantic models ------------------------------------

FieldCase = tuple[str, Any, tuple[str, ...]]


def _field_cases(name: str, field: Any, wrap: Callable[[Any], dict[str, Any]],
                 where: str) -> list[FieldCase]:
    """``(label, bad value, expected)`` for one field: each bound crossed, wrong types."""
    annotation, constraints = field_constraints(field)
    key = f"{where}.{name}" if where else name
    cases = []
    if typing.get_origin(annotation) is Literal:
        options = typing.get_args(annotation)
        cases.append(("unknown", "bogus", (f"{key} = 'bogus'", *map(repr, options))))
    elif annotation is bool:
        cases.append(("type", "maybe", (f"{key} = 'maybe'", "true or false")))
    elif annotation in (int, float):
        kind = "an integer" if annotation is int else "a number"
        bounds = []
        for constraint in constraints:
            for attribute, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
                if isinstance(constraint, getattr(annotated_types, attribute.title())):
                    bound = getattr(constraint, attribute)
                    bounds.append(str(bound))
                    cases.append((attribute, bound + step, ()))
        cases = [(label, value, (f"{key} = {value!r}", kind, *bounds))
                 for label, value, _ in cases]
        cases.append(("string", "x", (f"{key} = 'x'", kind, *bounds)))
        cases.append(("bool", True, (f"{key} = True", kind, *bounds)))
        if annotation is int:
            cases.append(("float", 2.5, (f"{key} = 2.5", kind, *bounds)))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        cases.append(("scalar", 5, (f"{key} = 5", "mapping", *annotation.model_fields)))
    return [(label, wrap({name: value}), expected) for label, value, expected in cases]


def _trial_cases() -> list[Case]:
    cases = []
    sections: list[tuple[str, type[BaseModel]]] = [("", TrialConfig)]
    sections += [(name, typing.cast(type[BaseModel], field.annotation))
                 for name, field in TrialConfig.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                 and name != "loss"]
    sections.append(("data", DataConfig))
    for section, model in sections:
        def wrap(fields: dict[str, Any], section: str = section) -> dict[str, Any]:
            return {section: fields} if section else fields
        for name, field in model.model_fields.items():
            for label, data, expected in _field_cases(name, field, wrap, section):
                cases.append(Case(f"trial-{section or 'top'}.{name}-{label}", "trial",
                                  _value(data), ("trial.yaml", *expected)))
        cases.append(Case(f"trial-{section or 'top'}-unknown-key", "trial",
                          _value(wrap({"bogus_knob": 1})),
                          ("trial.yaml", "bogus_knob", "not a known field",
                           *sorted(model.model_fields)[:2])))
    for section in ("data", "loss.hyperparameters"):
        top, _, inner = section.partition(".")
        data: dict[str, Any] = {top: {inner: 3} if inner else 3}
        cases.append(Case(f"trial-{section}-scalar", "trial", _value(data),
                          ("trial.yaml", f"{section} = 3", "mapping")))
    cases += [
        Case("trial-not-a-mapping", "trial", _value([1, 2]), ("trial.yaml", "mapping", "list")),
        Case("trial-data-needs-path", "trial", _value({"data": {"source": "recordio"}}),
             ("trial.yaml", "data", "needs a path")),
        Case("trial-data-heldout-zero-without-pairs", "trial",
             _value({"data": {"source": "omniglot", "heldout_fraction": 0.0}}),
             ("trial.yaml", "data.heldout_fraction = 0.0", "(0.0, 1.0)", "pair_files")),
        Case("trial-accumulation", "trial",
             _value({"batch_size": 10, "optim": {"grad_accumulation": 3}}),
             ("trial.yaml", "batch_size = 10", "optim.grad_accumulation = 3")),
        Case("trial-unknown-loss", "trial", _value({"loss": {"name": "nope"}}),
             ("trial.yaml", "loss.name = 'nope'", "arcface", "virtual")),
        Case("trial-loss-name-type", "trial", _value({"loss": {"name": 5}}),
             ("trial.yaml", "loss.name = 5", "arcface")),
        Case("trial-unknown-backbone", "trial", _value({"model": {"backbone": "vit"}}),
             ("trial.yaml", "model.backbone = 'vit'", "small_cnn")),
    ]
    return cases


# --- loss hyperparameters: trial configs and search spaces -----------------------------------

def _bad_values(domain: Interval | Choice) -> list[tuple[str, Any]]:
    if isinstance(domain, Choice):
        return [("unknown", "bogus"), ("type", 7)]
    below = domain.low if domain.low_open else domain.low - 1
    values = [("below", below), ("above", domain.high + 1), ("string", "x"), ("bool", True)]
    return values + ([("fraction", domain.low + 0.5)] if domain.integer else [])


def _space(loss: str, params: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "name": "bad", "loss": loss, "params": params, **top}


def _loss_cases() -> list[Case]:
    cases = []
    for loss in list_losses():
        for spec in get_loss_class(loss).hyperparameters():
            allowed, key = str(spec.domain), f"{loss}.{spec.name}"
            for label, value in _bad_values(spec.domain):
                data = {"loss": {"name": loss, "hyperparameters": {spec.name: value}}}
                cases.append(Case(f"trial-{key}-{label}", "trial", _value(data),
                                  ("trial.yaml", f"{key} = {value!r}", allowed)))
            if isinstance(spec.domain, Choice):
                param = {"distribution": "categorical", "choices": [*spec.domain.options, "bogus"]}
            else:
                param = {"distribution": "int" if spec.domain.integer else "uniform",
                         "low": spec.domain.low, "high": spec.domain.high + 1}
                if spec.domain.integer:
                    param = {**param, "low": int(spec.domain.low), "high": int(param["high"])}
            cases.append(Case(f"space-{key}-outside", "space",
                              _file("bad.yaml", _space(loss, {f"loss.{spec.name}": param})),
                              (f"{TMP}/bad.yaml", f"params.loss.{spec.name}", key, allowed)))
        cases.append(Case(f"space-{loss}-unknown-hyperparameter", "space",
                          _file("bad.yaml", _space(loss, {"loss.bogus": {
                              "distribution": "uniform", "low": 0.1, "high": 0.2}})),
                          (f"{TMP}/bad.yaml", "params.loss.bogus", "allowed")))
    return cases


# --- search-space files ----------------------------------------------------------------------

_MARGIN = {"loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.5}}
_GOOD_SPACE = _space("arcface", _MARGIN)


def _space_case(label: str, content: Any, *expected: str) -> Case:
    return Case(f"space-{label}", "space", _file("bad.yaml", content),
                (f"{TMP}/bad.yaml", *expected))


def _param(label: str, spec: Any, *expected: str, key: str = "head.sample_ratio") -> Case:
    return _space_case(label, _space("arcface", {key: spec}), f"params.{key}", *expected)


def _space_cases() -> list[Case]:
    missing = [_space_case(f"missing-{key}", {k: v for k, v in _GOOD_SPACE.items() if k != key},
                           key, allowed)
               for key, allowed in (("version", "must be 1"), ("name", "identifier"),
                                    ("loss", "registered loss"), ("params", "non-empty"))]
    uniform = {"distribution": "uniform"}
    return [*missing,
            _space_case("list", "- a\n- b\n", "must be a mapping", "list"),
            _space_case("scalar", "just text\n", "must be a mapping", "str"),
            _space_case("empty", "", "must be a mapping", "NoneType"),
            _space_case("invalid-yaml", "params: [unclosed\n", "not valid YAML"),
            Case("space-missing-file", "space", lambda tmp: tmp / "absent.yaml",
                 (f"{TMP}/absent.yaml", "no such search-space file")),
            Case("space-folder", "space", _not_a_file("folder.yaml"),
                 (f"{TMP}/folder.yaml", "no such search-space file")),
            _space_case("unknown-top-key", {**_GOOD_SPACE, "bogus": 1}, "bogus",
                        "unknown top-level key", "params"),
            _space_case("version", {**_GOOD_SPACE, "version": 2}, "version = 2", "must be 1"),
            _space_case("name", {**_GOOD_SPACE, "name": "no spaces"}, "name = 'no spaces'",
                        "identifier"),
            _space_case("unknown-loss", {**_GOOD_SPACE, "loss": "nope"}, "loss", "'nope'",
                        "arcface"),
            _space_case("loss-type", {**_GOOD_SPACE, "loss": 3}, "loss = 3", "registered loss"),
            _space_case("fixed-type", {**_GOOD_SPACE, "fixed": [1]}, "fixed", "mapping"),
            _space_case("fixed-field", {**_GOOD_SPACE, "fixed": {"head": {"sample_ratio": 0}}},
                        "fixed", "head.sample_ratio = 0", "(0.0, 1.0]"),
            _space_case("fixed-data", {**_GOOD_SPACE, "fixed": {"data": {"source": "sql"}}},
                        "fixed", "data.source = 'sql'", "synthetic"),
            _space_case("params-type", {**_GOOD_SPACE, "params": [1]}, "params", "non-empty"),
            _param("spec-type", 0.5, "mapping", "distribution"),
            _param("distribution", {"distribution": "normal"}, "distribution = 'normal'",
                   "uniform", "categorical"),
            _param("spec-field", {**uniform, "low": 0.1, "high": 0.5, "step": 2},
                   "step", "unknown field", "allowed"),
            _param("low-type", {**uniform, "low": "a", "high": 0.5}, "low = 'a'",
                   "finite number"),
            _param("high-missing", {**uniform, "low": 0.1}, "high = None", "finite number"),
            _param("low-nan", {**uniform, "low": float("nan"), "high": 0.5}, "low = nan",
                   "finite number"),
            _param("low-above-high", {**uniform, "low": 0.5, "high": 0.1}, "low <= high"),
            _param("log-nonpositive", {"distribution": "log_uniform", "low": 0.0, "high": 0.5},
                   "low = 0.0", "> 0"),
            _param("int-step", {"distribution": "int", "low": 16, "high": 64, "step": 0},
                   "step = 0", "integer ≥ 1", key="model.width"),
            _param("int-float", {"distribution": "int", "low": 16.5, "high": 64},
                   "low = 16.5", "finite integer", key="model.width"),
            _param("choices-empty", {"distribution": "categorical", "choices": []},
                   "choices = []", "non-empty list"),
            _param("choices-duplicate", {"distribution": "categorical",
                                         "choices": ["batch", "batch"]}, "duplicates",
                   key="head.sampling"),
            _param("sample-ratio-zero", {**uniform, "low": 0.0, "high": 0.5},
                   "head.sample_ratio = 0.0", "(0.0, 1.0]"),
            _param("sample-ratio-above-one", {**uniform, "low": 0.5, "high": 1.5},
                   "head.sample_ratio = 1.5", "(0.0, 1.0]"),
            _param("unknown-key", {**uniform, "low": 0.1, "high": 0.5}, "head.bogus",
                   "not a known field", key="head.bogus"),
            ]


# --- exported configs through ``python -m workers.train`` ------------------------------------

def _export(label: str, content: Any, *expected: str, flags: tuple[str, ...] = ()) -> Case:
    def make(tmp: Path) -> list[str]:
        path = content(tmp) if callable(content) else _file("best.yaml", content)(tmp)
        return ["--config", str(path), "--output", str(tmp / "out"), *flags]
    return Case(f"export-{label}", "export", make, expected)


_SMALL_DATA = {"num_identities": 8, "samples_per_identity": 4, "heldout_identities": 4}


def _export_cases() -> list[Case]:
    exported = yaml.safe_load(TrialConfig().to_yaml())
    too_many = (os.cpu_count() or 1) + 1
    file = f"{TMP}/best.yaml"
    return [
        _export("list", "- 1\n- 2\n", file, "mapping", "list"),
        _export("scalar", "42\n", file, "mapping", "int"),
        _export("invalid-yaml", "head: [\n", file, "not valid YAML"),
        _export("missing-file", lambda tmp: tmp / "absent.yaml", f"{TMP}/absent.yaml",
                "no such config file"),
        _export("folder", _not_a_file("dir.yaml"), f"{TMP}/dir.yaml", "no such config file"),
        _export("unknown-key", {**exported, "extra": 1}, file, "extra", "not a known field"),
        _export("version", {**exported, "version": 2}, file, "version = 2", "[1]"),
        _export("sample-ratio-zero", {**exported, "head": {"sample_ratio": 0}}, file,
                "head.sample_ratio = 0", "(0.0, 1.0]"),
        _export("sample-ratio-above-one", {**exported, "head": {"sample_ratio": 1.5}}, file,
                "head.sample_ratio = 1.5", "(0.0, 1.0]"),
        _export("unknown-loss", {**exported, "loss": {"name": "nope"}}, file,
                "loss.name = 'nope'", "arcface"),
        _export("loss-range", {**exported, "loss": {"name": "arcface",
                                                    "hyperparameters": {"margin": 2.0}}},
                file, "arcface.margin = 2.0", "[0, 1.2]"),
        _export("negative-workers-field",
                {**exported, "resources": {"num_workers": -1}}, file,
                "resources.num_workers = -1", "[1, 4096]"),
        _export("negative-workers-flag", exported, "error: --workers = -1", "[1, 4096]",
                flags=("--workers", "-1")),
        _export("epochs-flag", exported, "error: --epochs = 0", "[1, 100000]",
                flags=("--epochs", "0")),
        _export("more-workers-than-cpus",
                {**exported, "data": _SMALL_DATA,
                 "resources": {"num_workers": too_many, "cpus_per_worker": 1.0}},
                file, f"resources.num_workers = {too_many}", "CPUs"),
        _export("fp16-on-cpu", {**exported, "data": _SMALL_DATA,
                                "resources": {"precision": "fp16"}},
                file, "resources.precision = 'fp16'", "needs GPUs"),
        _export("data-source", {**exported, "data": {"source": "sql"}}, file,
                "data.source = 'sql'", "synthetic"),
        _export("data-path-missing",
                {**exported, "data": {"source": "image_folder", "path": "/nonexistent/faces"}},
                "/nonexistent/faces", "not found"),
        _export("workers-flag-type", exported, "--workers", "'x'", "resources.num_workers",
                flags=("--workers", "x")),
        _export("unknown-flag", exported, "--bogus", "known flags", flags=("--bogus",)),
        _export("resume-from-missing", {**exported, "data": _SMALL_DATA}, "--resume-from",
                f"{TMP}/nope", "no such checkpoint directory", flags=("--resume-from", "nope")),
        _export("resume-from-not-a-checkpoint", {**exported, "data": _SMALL_DATA},
                "--resume-from", f"{TMP}/state.pt", "not a training checkpoint",
                flags=("--resume-from", ".")),
        Case("export-missing-config-flag", "export", _value(["--output", "out"]),
             ("--config", "trial config YAML")),
    ]


# --- the study CLI ---------------------------------------------------------------------------

_INT_FLAGS = {"--trials": "an integer ≥ 1", "--concurrent": "an integer ≥ 1",
              "--workers": "an integer ≥ 1", "--epochs": "an integer ≥ 1",
              "--batch-size": "an integer ≥ 2", "--seed": "an integer ≥ 0"}
_INT_BELOW = {"--trials": 0, "--concurrent": 0, "--workers": -1, "--epochs": 0,
              "--batch-size": 1, "--seed": -1}
_FLOAT_FLAGS = {"--cpus-per-worker": ("a number > 0", "0"),
                "--gpus-per-worker": ("a number ≥ 0", "-0.5"),
                "--budget-fraction": ("a number in (0, 1]", "0")}
_CHOICE_FLAGS = {"--sampler": "tpe", "--scheduler": "asha", "--data": "synthetic"}


def _cli(label: str, argv: list[str] | Make, *expected: str) -> Case:
    make = argv if callable(argv) else _value(argv)
    return Case(f"cli-{label}", "cli", make, expected)


def _data_file(name: str, content: bytes | str, data: str) -> Make:
    def make(tmp: Path) -> list[str]:
        path = _file(name, content)(tmp)
        return ["--data", data, "--data-path", str(path if data != "recordio" else path.parent)]
    return make


def _recordio(corrupt: Callable[[Path], None]) -> Make:
    """A valid 4-image RecordIO set in ``tmp/rec``, then ``corrupt`` applied to that folder."""
    def make(tmp: Path) -> list[str]:
        write_recordio(tmp / "rec", [b"\x89PNG\r\n\x1a\n" + bytes(8)] * 4, [0, 0, 1, 1], (8, 8))
        corrupt(tmp / "rec")
        return ["--data", "recordio", "--data-path", str(tmp / "rec")]
    return make


def _pairs(content: bytes | None) -> Make:
    def make(tmp: Path) -> list[str]:
        path = tmp / "lfw.bin"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return ["--set", f"data.pair_files=[{path}]"]
    return make


def _cli_cases() -> list[Case]:
    cases = []
    for flag, allowed in _INT_FLAGS.items():
        below = _INT_BELOW[flag]
        cases += [_cli(f"{flag}-below", [flag, str(below)], f"{flag} = {below}", allowed),
                  _cli(f"{flag}-type", [flag, "x"], flag, "'x'", allowed.split()[-1]),
                  _cli(f"{flag}-float", [flag, "2.5"], flag, "'2.5'", allowed.split()[-1]),
                  _cli(f"{flag}-missing-value", [flag], flag, "expected one argument")]
    for flag, (allowed, below) in _FLOAT_FLAGS.items():
        cases += [_cli(f"{flag}-below", [flag, below], f"{flag} = {float(below)}", allowed),
                  _cli(f"{flag}-type", [flag, "x"], flag, "'x'"),
                  _cli(f"{flag}-nan", [flag, "nan"], f"{flag} = nan", allowed)
                  if flag != "--gpus-per-worker" else
                  _cli(f"{flag}-inf", [flag, "inf"], "error: --gpus-per-worker = inf", "16")]
    for flag, good in _CHOICE_FLAGS.items():
        cases.append(_cli(f"{flag}-unknown", [flag, "bogus"], f"{flag} = 'bogus'", good))
    cpus = os.cpu_count() or 1
    tmp_file = _file("plain.txt", "x")
    cases += [
        _cli("--budget-fraction-above", ["--budget-fraction", "1.5"], "--budget-fraction = 1.5",
             "(0, 1]"),
        _cli("more-workers-than-cpus", ["--workers", str(4 * cpus), "--cpus-per-worker", "1"],
             f"--workers = {4 * cpus}", "--cpus-per-worker", f"the cluster has {cpus}"),
        _cli("--name", ["--name", "a b"], "--name = 'a b'", "letters, digits"),
        _cli("--resume-without-name", ["--resume"], "--resume", "--name"),
        _cli("unknown-flag", ["--bogus"], "--bogus", "known flags", "--trials"),
        _cli("--storage-relative", ["--storage", "rel/dir"], "--storage = 'rel/dir'",
             "absolute"),
        _cli("--storage-under-a-file", lambda tmp: ["--storage", str(tmp_file(tmp) / "s")],
             "--storage", f"{TMP}/plain.txt/s", "not writable"),
        _cli("--tracking-uri-scheme", ["--tracking-uri", "./mlruns"], "--tracking-uri",
             "sqlite:///ABSOLUTE/PATH.db"),
        _cli("--tracking-uri-relative", ["--tracking-uri", "sqlite:///x.db"], "--tracking-uri",
             "absolute"),
        _cli("--space-missing", ["--space", "nosuch"], "nosuch", "no such search-space file"),
        _cli("--space-not-a-mapping", lambda tmp: ["--space", str(_file("s.yaml", "[1]\n")(tmp))],
             f"{TMP}/s.yaml", "mapping", "list"),
        _cli("--space-folder", lambda tmp: ["--space", str(_not_a_file("s.yaml")(tmp))],
             f"{TMP}/s.yaml", "no such search-space file"),
        _cli("--space-duplicate", ["--space", "arcface", "arcface"], "'arcface'",
             "more than one file"),
        _cli("--set-no-equals", ["--set", "model.width"], "--set 'model.width'", "KEY=VALUE"),
        _cli("--set-loss", ["--set", "loss.margin=0.3"], "--set 'loss.margin=0.3'", "loss.*"),
        _cli("--set-not-a-section", ["--set", "seed.x=1"], "--set 'seed.x=1'", "not a section"),
        _cli("--set-unknown", ["--set", "head.bogus=1"], "error: --set head.bogus",
             "not a known field"),
        _cli("--set-sample-ratio-zero", ["--set", "head.sample_ratio=0"],
             "error: --set head.sample_ratio = 0", "(0.0, 1.0]"),
        _cli("--set-sample-ratio-above-one", ["--set", "head.sample_ratio=1.5"],
             "error: --set head.sample_ratio = 1.5", "(0.0, 1.0]"),
        _cli("--set-type", ["--set", "model.width=wide"], "error: --set model.width = 'wide'",
             "[4, 1024]"),
        _cli("--set-data-type", ["--set", "data.num_identities=many"],
             "error: --set data.num_identities = 'many'", "integer"),
        _cli("--set-data-misplaced", ["--data", "image_folder", "--data-path", "/x",
                                      "--set", "data.num_identities=9"], "command line: data",
             "num_identities", "'image_folder'"),
        _cli("--data-path-required", ["--data", "recordio"], "--data-path", "--data recordio"),
        _cli("--data-path-unused", ["--data-path", "/x"], "--data-path", "synthetic"),
        _cli("--data-path-missing", ["--data", "image_folder", "--data-path", "/nonexistent"],
             "/nonexistent", "not found", "data.source = 'image_folder'"),
        _cli("--data-path-file-for-folder", _data_file("faces.jpg", "x", "image_folder"),
             f"{TMP}/faces.jpg", "not a folder", "data.source = 'image_folder'"),
        _cli("--data-path-under-a-file", lambda tmp: [
            "--data", "parquet", "--data-path", str(tmp_file(tmp) / "f.parquet")],
             f"{TMP}/plain.txt/f.parquet", "not found"),
        _cli("--data-parquet-corrupt", _data_file("f.parquet", b"PAR1garbage", "parquet"),
             f"{TMP}/f.parquet", "not a Parquet file", "data.source = 'parquet'"),
        _cli("--data-parquet-columns", _data_file("f.parquet", b"", "parquet"),
             f"{TMP}/f.parquet", "not a Parquet file"),
        _cli("--data-omniglot-corrupt", _data_file("o.npz", b"garbage", "omniglot"),
             f"{TMP}/o.npz", "not an npz archive", "data.source = 'omniglot'"),
        _cli("--data-recordio-garbage",
             _data_file("rec/train.rec", b"garbage!garbage!", "recordio"),
             f"{TMP}/rec/train.idx", "RecordIO file not found"),
        _cli("--data-recordio-bad-magic", _recordio(
            lambda d: (d / "train.rec").write_bytes(b"\0" * 64)),
             f"{TMP}/rec/train.rec", "magic", "data.source = 'recordio'"),
        _cli("--data-recordio-truncated", _recordio(
            lambda d: (d / "train.rec").write_bytes((d / "train.rec").read_bytes()[:12])),
             f"{TMP}/rec/train.rec", "truncated", "data.source = 'recordio'"),
        _cli("--data-recordio-bad-index", _recordio(
            lambda d: (d / "train.idx").write_text("zero\tnought\n")),
             f"{TMP}/rec/train.idx", "key<TAB>offset"),
        _cli("--data-recordio-no-index", _recordio(lambda d: (d / "train.idx").unlink()),
             f"{TMP}/rec/train.idx", "not found"),
        _cli("--data-recordio-bad-property", _recordio(
            lambda d: (d / "property").write_text("many,8,8")),
             f"{TMP}/rec/property", "num_classes,height,width"),
        _cli("--data-bin-garbage", _pairs(b"garbage"), f"{TMP}/lfw.bin", "pickle",
             "data.pair_files"),
        _cli("--data-bin-truncated", _pairs(pickle.dumps(([b"\xff\xd8\xff"] * 2, [True]))[:20]),
             f"{TMP}/lfw.bin", "pickle", "data.pair_files"),
        _cli("--data-bin-odd-images", _pairs(pickle.dumps(([b"\xff\xd8\xff"] * 3, [True]))),
             f"{TMP}/lfw.bin", "2 images per pair", "data.pair_files"),
        _cli("--data-bin-not-images", _pairs(pickle.dumps(([b"text", b"text"], [True]))),
             f"{TMP}/lfw.bin", "not an encoded", "data.pair_files"),
        _cli("--data-bin-folder", _pairs(None), f"{TMP}/lfw.bin", "data.pair_files"),
        _cli("--data-bin-missing", ["--set", "data.pair_files=[/nonexistent/lfw.bin]"],
             "/nonexistent/lfw.bin", "not found", "data.pair_files"),
    ]
    return cases


# --- the pre-flight data check: the same for the study and ``python -m workers.train`` ----

def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(*counts: int) -> Callable[[Path], Path]:
    """``tmp/faces`` with one identity folder per entry of ``counts``, holding that many
    PNGs."""
    def make(tmp: Path) -> Path:
        for identity, count in enumerate(counts):
            (tmp / "faces" / f"id{identity}").mkdir(parents=True)
            for index in range(count):
                (tmp / "faces" / f"id{identity}" / f"{index}.png").write_bytes(_png(index))
        (tmp / "faces").mkdir(exist_ok=True)
        return tmp / "faces"
    return make


def _rec(corrupt: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A valid 8-image, 4-identity RecordIO set in ``tmp/rec``, then ``corrupt`` applied."""
    def make(tmp: Path) -> Path:
        write_recordio(tmp / "rec", [_png(v) for v in range(8)], [0, 0, 1, 1, 2, 2, 3, 3],
                       (8, 8))
        corrupt(tmp / "rec")
        return tmp / "rec"
    return make


def _offset(rec: Path, key: int) -> int:
    lines = (rec / "train.idx").read_text().split("\n")
    return next(int(line.split()[1]) for line in lines if line.split()[:1] == [str(key)])


def _overwrite(rec: Path, offset: int, data: bytes) -> None:
    with (rec / "train.rec").open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _parquet(labels: Any, embeddings: Any) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        pq.write_table(pa.table({"label": labels, "embedding": embeddings}),
                       str(tmp / "f.parquet"))
        return tmp / "f.parquet"
    return make


def _npz(images: tuple[int, ...], labels: tuple[int, ...]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.savez(tmp / "o.npz", images=np.zeros(images, bool), labels=np.zeros(labels, int))
        return tmp / "o.npz"
    return make


class _Shell:
    """Unpickling this runs ``touch ran`` in the working directory (a payload to refuse)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, ("touch ran",)


def _bin(content: bytes) -> Callable[[Path], Path]:
    return lambda tmp: _file("lfw.bin", content)(tmp)


#: a pickle naming a module that does not exist
_MISSING_MODULE = b"\x80\x02cnosuchmodule\nThing\nq\x00)\x81q\x01."

_DATA_CASES: list[tuple[str, str, Callable[[Path], Path], tuple[str, ...]]] = [
    # (label, data source, maker of the data path, expected)
    ("folder-empty", "image_folder", _folder(), ("faces", "no identity sub-folders")),
    ("folder-one-identity", "image_folder", _folder(3), ("faces", "1 identity", "≥ 2")),
    ("folder-identity-without-images", "image_folder", _folder(2, 0, 2),
     ("faces/id1", "no images")),
    ("folder-too-few-held-out", "image_folder", _folder(2, 2, 2),
     ("faces", "held-out identities", "≥ 2")),
    ("recordio-bad-index-line", "recordio",
     _rec(lambda d: (d / "train.idx").write_text(
         (d / "train.idx").read_text().replace("\n3\t", "\nthree\t"))),
     ("rec/train.idx:4", "key<TAB>offset", "'three")),
    ("recordio-corrupt-record", "recordio",
     _rec(lambda d: _overwrite(d, _offset(d, 5), b"\0" * 8)),
     ("rec/train.rec: record 5", "bad magic")),
    ("recordio-truncated-record", "recordio",
     _rec(lambda d: os.truncate(d / "train.rec", _offset(d, 8) + 20)),
     ("rec/train.idx", "past the end", "rec/train.rec")),
    ("parquet-float-labels", "parquet",
     _parquet([0.0, 1.0], [[0.5, 0.5], [0.1, 0.2]]), ("f.parquet", "'label'", "double")),
    ("parquet-text-embeddings", "parquet", _parquet([0, 1], [["a"], ["b"]]),
     ("f.parquet", "'embedding'", "list of floats")),
    ("npz-shapes", "omniglot", _npz((3, 20, 8, 8), (3, 20)),
     ("o.npz", "expected images (964, 20, H, W)", "(3, 20, 8, 8)")),
    ("npz-no-images", "omniglot", lambda tmp: (np.savez(tmp / "o.npz", labels=np.zeros(3)),
                                               tmp / "o.npz")[1],
     ("o.npz", "needs 'images' and 'labels'")),
]

_PAIR_CASES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("none", pickle.dumps(None), ("not a (bins, issame_list) pickle", "NoneType")),
    ("none-parts", pickle.dumps((None, None)), ("bins and issame_list must be lists",)),
    ("none-images", pickle.dumps(([None, None], [True])), ("image 0 is a NoneType",)),
    ("text-issame", pickle.dumps(([_png(1), _png(2)], ["yes"])),
     ("issame_list[0] = 'yes'", "boolean")),
    ("missing-module", _MISSING_MODULE, ("nosuchmodule.Thing", "may hold only")),
    ("code", pickle.dumps(([_Shell()], [True])), ("posix.system", "may hold only")),
    ("undecodable", pickle.dumps(([b"\x89PNG\r\n\x1a\n" + bytes(8)] * 2, [True])),
     ("image 0", "cannot decode")),
]


def _data_cases() -> list[Case]:
    """Each bad dataset through both command lines: one line, the same check."""
    cases = []
    for label, source, make, expected in _DATA_CASES:
        def cli(tmp: Path, source: str = source, make: Make = make) -> list[str]:
            return ["--data", source, "--data-path", str(make(tmp))]

        def export(tmp: Path, source: str = source, make: Make = make) -> list[str]:
            data = {"source": source, "path": str(make(tmp))}
            config = _file("best.yaml", {**yaml.safe_load(TrialConfig().to_yaml()),
                                         "data": data})(tmp)
            return ["--config", str(config), "--output", str(tmp / "out")]
        cases += [Case(f"cli-data-{label}", "cli", cli, (*expected, f"'{source}'")),
                  Case(f"export-data-{label}", "export", export, (*expected, f"'{source}'"))]
    for label, content, expected in _PAIR_CASES:
        def pairs(tmp: Path, content: bytes = content) -> list[str]:
            return ["--set", f"data.pair_files=[{_bin(content)(tmp)}]"]
        cases.append(Case(f"cli-data-bin-{label}", "cli", pairs,
                          (f"{TMP}/lfw.bin", *expected, "data.pair_files")))
    return cases


# --- driver inputs that used to fail late, after Ray started or after every trial ----------

class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """Any web server that is not MLflow: 404 with an HTML page."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not here</html>")

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def _web_server(tmp: Path) -> list[str]:
    """``--tracking-uri`` of a web server on a free port (a daemon thread, this process)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return ["--tracking-uri", f"http://127.0.0.1:{server.server_address[1]}"]


def _closed_port(tmp: Path) -> list[str]:
    return ["--tracking-uri", f"http://127.0.0.1:{free_port()}"]


def _space_file(name: str, content: Any) -> Make:
    return lambda tmp: ["--space", str(_file(name, content)(tmp))]


def _driver_cases() -> list[Case]:
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    big = {**_GOOD_SPACE, "fixed": {"resources": {"num_workers": 4 * cpus,
                                                  "cpus_per_worker": 1.0}}}
    wide = _space("arcface", {"resources.num_workers": {
        "distribution": "int", "low": 1, "high": 4 * cpus}})
    taken = _file("storage/taken/optuna.db", b"")
    return [
        _cli("--set-flag-field", ["--set", "epochs=5"], "--set 'epochs=5'", "--epochs"),
        _cli("--set-resources-field", ["--set", "resources.num_workers=1"],
             "resources.num_workers", "--workers"),
        _cli("--set-data-section", ["--set", "data={num_identities: 9}"],
             "--set 'data={num_identities: 9}'", "--data", "--data-path"),
        _cli("--set-duplicate-key", ["--set", "model={width: 16, width: 32}"],
             "--set 'model=", ":1: duplicate key 'width'"),
        _cli("space-fixed-resources-too-big", _space_file("big.yaml", big),
             f"{TMP}/big.yaml: fixed.resources.num_workers = {4 * cpus}",
             f"{TMP}/big.yaml: fixed.resources.cpus_per_worker = 1.0",
             f"the cluster has {cpus}"),
        _cli("space-sampled-workers-too-many", _space_file("wide.yaml", wide),
             f"{TMP}/wide.yaml: params.resources.num_workers = {4 * cpus}",
             "--cpus-per-worker", f"the cluster has {cpus}"),
        _cli("--gpus-per-worker-missing-gpus", ["--gpus-per-worker", str(gpus + 1),
                                                "--workers", "1"],
             f"--gpus-per-worker = {float(gpus + 1)}", "--workers = 1", "GPUs",
             f"the cluster has {gpus}"),
        _cli("--set-fp16-on-cpu", ["--set", "resources.precision=fp16"],
             "--set resources.precision = 'fp16'", "--gpus-per-worker > 0"),
        _cli("--ray-address-empty", ["--ray-address", ""], "--ray-address = ''",
             "HOST:PORT"),
        _cli("--ray-address-garbage", ["--ray-address", "not an address"],
             "--ray-address = 'not an address'", "ray://HOST:PORT"),
        _cli("--ray-address-port", ["--ray-address", "10.0.0.1:99999"],
             "--ray-address = '10.0.0.1:99999'", "HOST:PORT"),
        _cli("--ray-address-http", ["--ray-address", "http://10.0.0.1:8265"],
             "--ray-address = 'http://10.0.0.1:8265'", "auto"),
        _cli("--output-file", lambda tmp: ["--output", str(_file("out.txt", "x")(tmp))],
             f"--output: {TMP}/out.txt", "a file, not a folder"),
        _cli("--output-under-a-file", lambda tmp: [
            "--output", str(_file("out.txt", "x")(tmp) / "artifacts")],
             f"--output: {TMP}/out.txt/artifacts", "not writable"),
        _cli("--tracking-uri-folder", lambda tmp: [
            "--tracking-uri", f"sqlite:///{_not_a_file('m.db')(tmp)}"], "--tracking-uri",
             f"{TMP}/m.db", "a folder, not a sqlite database"),
        _cli("--tracking-uri-not-a-database", lambda tmp: [
            "--tracking-uri", f"sqlite:///{_file('m.db', b'garbage' * 200)(tmp)}"],
             f"--tracking-uri: {TMP}/m.db", "not a sqlite database"),
        _cli("--tracking-uri-other-database", lambda tmp: [
            "--tracking-uri", f"sqlite:///{_sqlite(tmp / 'optuna.db')}"],
             f"--tracking-uri: {TMP}/optuna.db", "not an MLflow store"),
        _cli("--tracking-uri-port", ["--tracking-uri", "http://127.0.0.1:port"],
             "--tracking-uri = 'http://127.0.0.1:port'", "not a valid URL"),
        _cli("--tracking-uri-port-range", ["--tracking-uri", "http://127.0.0.1:99999"],
             "--tracking-uri = 'http://127.0.0.1:99999'", "not a valid URL"),
        _cli("--tracking-uri-ipv6", ["--tracking-uri", "http://[::1:5000"],
             "--tracking-uri = 'http://[::1:5000'", "not a valid URL"),
        _cli("--tracking-uri-closed-port", _closed_port, "--tracking-uri", "unreachable"),
        _cli("--tracking-uri-not-mlflow", _web_server, "--tracking-uri",
             "not as an MLflow server", "HTTP 404"),
        _cli("--name-too-long", ["--name", "n" * 300], "--name", "300 characters",
             "at most 128"),
        _cli("--resume-never-started", ["--resume", "--name", "nope"],
             "--resume --name nope", "no study 'nope'", f"{TMP}/storage"),
        _cli("--name-taken", lambda tmp: (taken(tmp), ["--name", "taken"])[1],
             "--name taken", "exists", "--resume"),
        _cli("--space-not-utf8", _space_file("latin1.yaml", "name: caf\xe9\n".encode("latin-1")),
             f"{TMP}/latin1.yaml", "not UTF-8", "offset 9"),
        _space_case("duplicate-key", "version: 1\nname: a\nloss: arcface\nname: b\n",
                    ":4: duplicate key 'name'"),
        _space_case("fixed-loss-name", {**_GOOD_SPACE, "fixed": {"loss": {"name": "cosface"}}},
                    "fixed", "unknown hyperparameter(s) ['name']"),
        Case("trial-loss-hyperparameter-name", "trial",
             _value({"loss": {"name": "arcface", "hyperparameters": {"name": "cosface"}}}),
             ("trial.yaml", "arcface", "unknown hyperparameter(s) ['name']")),
        _export("not-utf8", "epochs: 2 # \xff\n".encode("latin-1"), f"{TMP}/best.yaml",
                "not UTF-8", "byte 0xff"),
        _export("duplicate-key", "epochs: 2\nseed: 1\nepochs: 3\n", f"{TMP}/best.yaml:3",
                "duplicate key 'epochs'"),
    ]


def _sqlite(path: Path) -> Path:
    """A sqlite database of some other program (a table, no MLflow schema)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("create table studies (id integer)")
        connection.commit()
    return path


CASES: list[Case] = [*_trial_cases(), *_loss_cases(), *_space_cases(), *_export_cases(),
                     *_cli_cases(), *_data_cases(), *_driver_cases()]


def _errors(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The error lines ``case`` produces (the stderr lines of the two command lines)."""
    made = case.make(tmp)
    if case.entry == "trial":
        with pytest.raises(ConfigError) as config_error:
            parse_trial_config(made, "trial.yaml")
        return config_error.value.lines
    if case.entry == "space":
        with pytest.raises(SpaceError) as space_error:
            load_space(made)
        return space_error.value.lines
    main = workers_train.main if case.entry == "export" else study_run.main
    defaults = [] if case.entry == "export" else [
        "--storage", str(tmp / "storage"), "--tracking-uri", f"sqlite:///{tmp / 'm.db'}"]
    try:
        code = main([*defaults, *made])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert out == ""
    return err.splitlines()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_naming_file_field_and_range(
        case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, record_property: Callable[[str, Any], None]) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    lines = _errors(case, tmp_path, capsys)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in line
    if case.entry in ("export", "cli"):
        assert line.startswith("error: ")
    for expected in case.expected:
        assert expected.replace(TMP, str(tmp_path)) in line, (expected, line)
    assert not ray.is_initialized()
    record_property("bad_input_case", True)


def test_matrix_size(record_property: Callable[[str, Any], None]) -> None:
    entries = {entry: sum(case.entry == entry for case in CASES)
               for entry in ("trial", "space", "export", "cli")}
    print(f"bad-input matrix: {len(CASES)} cases {entries}")
    record_property("bad_input_cases", len(CASES))
    assert len({case.id for case in CASES}) == len(CASES)
    assert len(CASES) >= FLOOR and min(entries.values()) >= 20


def _run_in(command: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``command`` run in ``tmp``, without ``RAY_ADDRESS``."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=tmp)


@pytest.mark.parametrize(("module", "args", "expected"), [
    ("study/run.py", ["--trials", "x"], "error: argument --trials: invalid int value: 'x'"),
    ("study/run.py", ["--set", "head.sample_ratio=1.5"], "head.sample_ratio = 1.5"),
    ("workers.train", ["--config", "absent.yaml"], "absent.yaml: no such config file"),
])
def test_command_lines_fail_without_ray(module: str, args: list[str], expected: str,
                                        tmp_path: Path) -> None:
    command = ([sys.executable, str(ROOT / module)] if module.endswith(".py")
               else [sys.executable, "-m", module])
    if module == "study/run.py":
        args = [*args, "--storage", str(tmp_path / "s"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    process = _run_in([*command, *args], tmp_path)
    assert process.returncode == 2, process.stderr[-2000:]
    assert process.stderr.count("\n") == 1 and expected in process.stderr, process.stderr
    assert "Traceback" not in process.stderr and "ray" not in process.stderr.lower()


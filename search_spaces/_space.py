"""Search-space files: load, validate (every error at once), convert to Optuna.

A space file (schema version 1)::

    version: 1
    name: arcface              # the family; unique per study
    loss: arcface              # a registered loss (workers.losses)
    description: ...           # optional
    fixed:                     # trial-config values every trial of this space shares
      loss: {scale: 64}        # loss hyperparameters
      head: {chunk_size: 4096} # any other trial-config section
    params:                    # what the searcher samples, by dotted trial-config key
      loss.margin:       {distribution: uniform, low: 0.2, high: 0.6}
      head.sample_ratio: {distribution: log_uniform, low: 0.05, high: 1.0}
      head.sampling:     {distribution: categorical, choices: [uniform, batch]}
      model.width:       {distribution: int, low: 16, high: 64, step: 16}
    defaults:                  # optional: where --warm-start starts, by searched key
      loss.margin: 0.45

``loss.*`` ranges must lie inside the loss's allowed domain; every other key is checked by
validating trial configs built from the range's end points (or each choice).

Warm start (``SearchSpace.warm_start``) starts from the published setting, kept once: each
loss's own defaults (the papers', ``workers.losses``) and the trial config's for the rest
(full softmax ``head.sample_ratio = 1``, ``optim.lr = 0.1``, …). A ``defaults`` entry replaces
one; it must name a searched key and lie inside its range (or be one of its choices).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from workers.config import ConfigError, parse_trial_config, read_yaml
from workers.losses import Choice, Interval, get_loss_class

SPACE_VERSION = 1
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "categorical")
_TOP_LEVEL = {"version", "name", "loss", "description", "fixed", "params", "defaults"}
_SPEC_KEYS = {
    "uniform": {"distribution", "low", "high"},
    "log_uniform": {"distribution", "low", "high"},
    "int": {"distribution", "low", "high", "step", "log"},
    "categorical": {"distribution", "choices"},
}


class SpaceError(ValueError):
    """Every problem of one space file, one line each."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Parameter:
    """One searched trial-config key and its distribution."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: int = 1
    log: bool = False
    choices: tuple[Any, ...] = ()

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        """The equivalent Optuna distribution (bounds inclusive, as in Optuna)."""
        if self.distribution == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.distribution == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        log=self.log, step=self.step)
        return optuna.distributions.FloatDistribution(
            float(self.low), float(self.high), log=self.distribution == "log_uniform")

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Ask ``trial`` for this parameter under ``name``."""
        if self.distribution == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=self.step,
                                     log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high),
                                   log=self.distribution == "log_uniform")

    def contains(self, value: Any) -> bool:
        """Whether Optuna can hand out ``value``: one of the choices, or a number in
        ``[low, high]`` (for ``int`` an integer on the step grid from ``low``)."""
        if self.distribution == "categorical":
            return any(isinstance(value, bool) == isinstance(choice, bool) and value == choice
                       for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.distribution == "int":
            return isinstance(value, int) and self.low <= value <= self.high \
                and (value - self.low) % self.step == 0
        return self.low <= value <= self.high

    def describe(self) -> str:
        """The values ``contains`` accepts, in words."""
        if self.distribution == "categorical":
            return f"one of {list(self.choices)}"
        if self.distribution == "int":
            step = f" in steps of {self.step}" if self.step != 1 else ""
            return f"an integer in [{self.low}, {self.high}]{step}"
        return f"a number in [{self.low}, {self.high}]"

    def end_points(self) -> list[Any]:
        """The values a range can reach at its extremes (or every choice)."""
        if self.distribution == "categorical":
            return list(self.choices)
        if self.distribution == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """A validated space: the loss, the shared values and the searched parameters."""

    name: str
    loss: str
    fixed: Mapping[str, Any]
    params: tuple[Parameter, ...]
    path: str
    description: str = ""
    #: the file's ``defaults``: warm-start values by searched key (validated)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def distributions(self, prefix: str = "") -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions by parameter name (``prefix + key``)."""
        return {prefix + p.key: p.to_optuna() for p in self.params}

    def suggest(self, trial: optuna.Trial, prefix: str = "") -> dict[str, Any]:
        """Sample every parameter on ``trial`` (define-by-run); returns ``{key: value}``."""
        return {p.key: p.suggest(trial, prefix + p.key) for p in self.params}

    def warm_start(self, prefix: str = "") -> dict[str, Any]:
        """Where a warm-started study starts this space, as ``{prefix + key: value}`` over the
        searched keys: ``defaults.<key>`` when the file gives it, else the value a trial of this
        space has when the key is not searched (the loss's own default for ``loss.*``, the
        trial config's for the rest). ``SpaceError``: one line per such value outside its
        range, or the trial config's own lines when the values do not build one."""
        unsearched = parse_trial_config(self.trial_config({}), self.path).model_dump(mode="json")
        unsearched["loss"]["hyperparameters"] = {
            **{spec.name: spec.default for spec in get_loss_class(self.loss).hyperparameters()},
            **unsearched["loss"]["hyperparameters"]}
        values, errors = {}, []
        for parameter in self.params:
            found, value = (True, self.defaults[parameter.key]) if parameter.key in \
                self.defaults else _get_dotted(unsearched, parameter.key)
            if found and parameter.contains(value):
                values[parameter.key] = value
                continue
            shown = f"its default {value!r} is not {parameter.describe()}" if found \
                else "it has no default"
            errors.append(f"{self.path}: params.{parameter.key}: {shown}; give "
                          f"defaults.{parameter.key} to warm-start this space")
        if errors:
            raise SpaceError(errors)
        try:
            parse_trial_config(self.trial_config(values), f"{self.path}: warm start")
        except ConfigError as error:
            raise SpaceError(error.lines) from None
        return {prefix + key: value for key, value in values.items()}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the categorical choices as ``{key: value}`` (the Cartesian
        product, the last parameter varying fastest); ``SpaceError`` naming each parameter that
        is not categorical."""
        ranged = [p for p in self.params if p.distribution != "categorical"]
        if ranged:
            raise SpaceError([f"{self.path}: params.{p.key}: distribution {p.distribution}; "
                              "--sampler grid needs categorical params" for p in ranged])
        keys = [p.key for p in self.params]
        return [dict(zip(keys, values, strict=True))
                for values in itertools.product(*(p.choices for p in self.params))]

    def trial_config(self, values: Mapping[str, Any], base: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
        """A trial-config mapping: ``base``, then ``fixed``, then the sampled ``values``."""
        config = _deep_merge(dict(base or {}), _fixed_as_config(self.loss, self.fixed))
        for key, value in values.items():
            _set_dotted(config, key, value)
        return config

    def largest(self, keys: Iterable[str], base: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """``trial_config`` with each of the dotted ``keys`` this space samples at its largest
        value (the others as ``fixed`` or ``base`` set them): the most of each any of its
        trials can have."""
        keys = set(keys)
        return self.trial_config({p.key: max(p.end_points()) for p in self.params
                                  if p.key in keys}, base)

    def source_of(self, key: str) -> str | None:
        """Where this space sets the dotted trial-config ``key``: ``<file>: params.<key>``,
        ``<file>: fixed.<key>``, or None when it leaves it to the study."""
        if any(p.key == key for p in self.params):
            return f"{self.path}: params.{key}"
        node: Any = self.fixed
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return f"{self.path}: fixed.{key}"


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate one space file; raises ``SpaceError`` listing every problem."""
    try:
        data = read_yaml(path, "search-space file")
    except ConfigError as error:
        raise SpaceError(error.lines) from None
    return parse_space(data, str(path))


def load_spaces(paths: Iterable[str | Path]) -> list[SearchSpace]:
    """Load several spaces; all their errors together, and family names must be unique."""
    spaces, lines = [], []
    for path in paths:
        try:
            spaces.append(load_space(path))
        except SpaceError as error:
            lines += error.lines
    names = [space.name for space in spaces]
    for name in sorted({n for n in names if names.count(n) > 1}):
        lines.append(f"space name {name!r} is used by more than one file")
    if lines:
        raise SpaceError(lines)
    return spaces


def study_grid(spaces: Sequence[SearchSpace]) -> list[tuple[SearchSpace, dict[str, Any]]]:
    """The grid of a study: every space's ``grid_points()`` in order, concatenated; the
    ``SpaceError`` lists the non-categorical parameters of every space."""
    grid, lines = [], []
    for space in spaces:
        try:
            grid += [(space, values) for values in space.grid_points()]
        except SpaceError as error:
            lines += error.lines
    if lines:
        raise SpaceError(lines)
    return grid


def shipped_space_files() -> list[Path]:
    """Every space file shipped with marginlab."""
    return sorted(Path(__file__).parent.glob("*.yaml"))


def parse_space(data: Any, source: str) -> SearchSpace:
    """Validate a space mapping; every problem is one line ``source: key: problem``."""
    if not isinstance(data, dict):
        raise SpaceError([f"{source}: must be a mapping, got {type(data).__name__}"])
    errors: list[str] = []
    for key in sorted(set(data) - _TOP_LEVEL):
        errors.append(f"{source}: {key}: unknown top-level key; allowed: {sorted(_TOP_LEVEL)}")
    if data.get("version") != SPACE_VERSION:
        errors.append(f"{source}: version = {data.get('version')!r} must be {SPACE_VERSION}")
    name, loss = data.get("name"), data.get("loss")
    if not isinstance(name, str) or not name.isidentifier():
        errors.append(f"{source}: name = {name!r} must be an identifier (letters, digits, _)")
    try:
        loss_class = get_loss_class(loss) if isinstance(loss, str) else None
        if loss_class is None:
            errors.append(f"{source}: loss = {loss!r} must be a registered loss name")
    except KeyError as error:
        errors.append(f"{source}: loss: {error.args[0]}")
        loss_class = None
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        errors.append(f"{source}: fixed must be a mapping, got {type(fixed).__name__}")
        fixed = {}
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict) or not raw_params:
        errors.append(f"{source}: params must be a non-empty mapping of key: distribution")
        raw_params = {}
    params = []
    for key, spec in raw_params.items():
        parameter, spec_errors = _parse_parameter(str(key), spec, source)
        errors += spec_errors
        if parameter is not None:
            params.append(parameter)
    if loss_class is not None:
        errors += _check_against_trial_config(loss_class.name, fixed, params, source)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        errors.append(f"{source}: defaults must be a mapping of searched key: value, got "
                      f"{type(defaults).__name__}")
        defaults = {}
    errors += _check_defaults(defaults, params, source)
    if errors:
        raise SpaceError(errors)
    space = SearchSpace(name, loss, fixed, tuple(params), source, data.get("description", ""),
                        defaults)
    if defaults:  # together too (a filter threshold needs cosine logits): a valid trial config
        try:
            parse_trial_config(space.trial_config(defaults), f"{source}: defaults")
        except ConfigError as error:
            raise SpaceError(error.lines) from None
    return space


def _check_defaults(defaults: Mapping[str, Any], params: Sequence[Parameter],
                    source: str) -> list[str]:
    """Each ``defaults`` entry names a searched key and is a value its range can hand out."""
    by_key = {parameter.key: parameter for parameter in params}
    errors = []
    for key, value in defaults.items():
        parameter = by_key.get(key)
        if parameter is None:
            errors.append(f"{source}: defaults.{key}: not a searched key; allowed: "
                          f"{sorted(by_key)}")
        elif not parameter.contains(value):
            errors.append(f"{source}: defaults.{key} = {value!r} must be "
                          f"{parameter.describe()} (params.{key})")
    return errors


def _parse_parameter(key: str, spec: Any, source: str) -> tuple[Parameter | None, list[str]]:
    where = f"{source}: params.{key}"
    if not isinstance(spec, dict):
        return None, [f"{where}: must be a mapping with a 'distribution'"]
    kind = spec.get("distribution")
    if kind not in DISTRIBUTIONS:
        return None, [f"{where}.distribution = {kind!r} is not one of {list(DISTRIBUTIONS)}"]
    errors = [f"{where}.{extra}: unknown field for {kind}; allowed: {sorted(_SPEC_KEYS[kind])}"
              for extra in sorted(set(spec) - _SPEC_KEYS[kind])]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            return None, [*errors, f"{where}.choices = {choices!r} must be a non-empty list"]
        if len({repr(c) for c in choices}) != len(choices):
            errors.append(f"{where}.choices = {choices!r} has duplicates")
        return (None if errors else Parameter(key, kind, choices=tuple(choices))), errors
    low, high = spec.get("low"), spec.get("high")
    integer = kind == "int"
    for bound, value in (("low", low), ("high", high)):
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            errors.append(f"{where}.{bound} = {value!r} must be a finite "
                          f"{'integer' if integer else 'number'}")
    if errors:
        return None, errors
    if low > high:
        errors.append(f"{where}: low <= high must hold, but got low = {low}, high = {high}")
    log = kind == "log_uniform" or bool(spec.get("log", False))
    if log and low <= 0:
        errors.append(f"{where}.low = {low} must be > 0 for a log scale")
    step = spec.get("step", 1)
    if integer and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        errors.append(f"{where}.step = {step!r} must be an integer ≥ 1")
    elif integer and log and step != 1:
        errors.append(f"{where}: step = {step} cannot be combined with log: true")
    if errors:
        return None, errors
    return Parameter(key, kind, low=low, high=high, step=step, log=log), []


def _check_against_trial_config(loss: str, fixed: Mapping[str, Any],
                                params: list[Parameter], source: str) -> list[str]:
    """Check ``loss.*`` against the loss's domains and everything else via trial configs."""
    errors: list[str] = []
    loss_class = get_loss_class(loss)
    domains = {spec.name: (spec.domain, spec.unit) for spec in loss_class.hyperparameters()}
    base = _fixed_as_config(loss, fixed)
    try:
        parse_trial_config(base, f"{source}: fixed")
    except ConfigError as error:
        return list(error.lines)
    for parameter in params:
        where = f"{source}: params.{parameter.key}"
        section, _, field = parameter.key.partition(".")
        if section == "loss":
            if field not in domains:
                errors.append(f"{where}: {loss} has no hyperparameter {field!r}; "
                              f"allowed: {sorted(domains)}")
                continue
            domain, unit = domains[field]
            unit = f" {unit}" if unit else ""
            for value in parameter.end_points():
                if not _in_domain(domain, value):
                    errors.append(f"{where}: {value!r}{unit} is outside {loss}.{field}'s "
                                  f"allowed range {domain}")
            if isinstance(domain, Interval) and domain.integer and parameter.distribution in (
                    "uniform", "log_uniform"):
                errors.append(f"{where}: {loss}.{field} is an integer; use distribution: int")
            continue
        for value in parameter.end_points():
            config = _deep_merge(dict(base), {})
            _set_dotted(config, parameter.key, value)
            try:
                parse_trial_config(config, where)
            except ConfigError as error:
                errors += [line for line in error.lines if line not in errors]
    return errors


def _in_domain(domain: Interval | Choice, value: Any) -> bool:
    if isinstance(domain, Choice):
        return domain.contains(value)
    return not isinstance(value, bool) and isinstance(value, int | float) and domain.contains(value)


def _fixed_as_config(loss: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``fixed`` as a trial-config mapping (``fixed.loss`` holds hyperparameters)."""
    config = {key: value for key, value in fixed.items() if key != "loss"}
    config["loss"] = {"name": loss, "hyperparameters": dict(fixed.get("loss") or {})}
    return config


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b`` in a nested mapping; ``loss.x`` lands in the loss's hyperparameters."""
    parts = key.split(".")
    if parts[0] == "loss":
        parts = ["loss", "hyperparameters", *parts[1:]]
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _get_dotted(config: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """``(True, value)`` of ``a.b`` in a nested mapping (``loss.x``: the loss's
    hyperparameters), ``(False, None)`` when absent; ``_set_dotted``'s inverse."""
    parts = key.split(".")
    if parts[0] == "loss":
        parts = ["loss", "hyperparameters", *parts[1:]]
    node: Any = config
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: (_deep_merge({}, v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = _deep_merge({}, value) if isinstance(value, Mapping) else value
    return merged

"""The trial config: the versioned, validated object a study hands to every worker.

The same YAML format is what a study exports and what ``python -m workers.train --config``
runs. Validation collects every error at once; each is one line naming the source, the field,
the value and the allowed range, e.g.
``trial.yaml: head.sample_ratio = 0 is outside (0, 1]``.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.backbones import BACKBONES
from workers.data import DataConfig
from workers.head.head import DEFAULT_LOGIT_BUDGET_MB
from workers.losses import MarginLoss, build_loss, list_losses

CONFIG_VERSION = 1

Probability = Annotated[float, Field(gt=0.0, le=1.0)]


class ConfigError(ValueError):
    """Every problem of a config, one line each."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    # strict: a YAML ``true`` or ``2.0`` is not an integer, ``"0.5"`` not a number
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LossSpec(_Strict):
    """A registered loss and its hyperparameters (validated by the loss itself)."""

    name: str = "arcface"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        if value not in list_losses():
            raise ValueError(f"not one of {list_losses()}")
        return value

    @model_validator(mode="after")
    def _build(self) -> LossSpec:
        build_loss(self.name, **self.hyperparameters)
        return self

    def build(self) -> MarginLoss:
        """The loss object."""
        return build_loss(self.name, **self.hyperparameters)


class HeadSpec(_Strict):
    """The distributed sampled-softmax head."""

    sample_ratio: Probability = 1.0
    sampling: Literal["uniform", "batch"] = "uniform"
    #: classes per chunk of the log-sum-exp; None = auto (a fixed logit budget per chunk)
    chunk_size: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    unsampled_rows: Literal["dense", "frozen", "sparse"] = "dense"
    #: Partial FC's inter-class filter τ: negatives with cos θ_j > τ count as cos θ_j = 0 (0: off)
    filter_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    #: MiB per rank of chunk logits kept from forward for backward, which then skips their
    #: products; the other chunks are recomputed (0: all, memory O(B·chunk) whatever C). The
    #: default, 256 MiB, holds 2²⁶ float32 logits (2²⁷ bf16), e.g. B = 1024 × 64k sampled
    #: classes. CPU: the recompute is a quarter of the step's products; at B = 1024, D = 512,
    #: C = 100k this keeps every chunk at r = 0.1 and 2/3 at r = 1 (1.39× → 1.13× the
    #: three-product floor) and the step's peak stays < ¼ of a naive head's. Accelerators:
    #: 0.2–0.3 % of an 80–141 GB card, beside a shard, its gradient and optimizer state of GBs.
    logit_budget_mb: Annotated[int, Field(ge=0, le=1 << 20)] = DEFAULT_LOGIT_BUDGET_MB


class ModelSpec(_Strict):
    """The backbone and its embedding."""

    backbone: str = "small_cnn"
    embedding_dim: Annotated[int, Field(ge=2, le=8192)] = 128
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    width: Annotated[int, Field(ge=4, le=1024)] = 32

    @field_validator("backbone", mode="before")
    @classmethod
    def _known_backbone(cls, value: Any) -> Any:
        if value not in BACKBONES:
            raise ValueError(f"not one of {list(BACKBONES)}")
        return value


class OptimSpec(_Strict):
    """Optimizer, schedule and step mechanics."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    head_lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 5e-4
    schedule: Literal["cosine", "polynomial"] = "cosine"
    poly_power: Annotated[float, Field(gt=0.0, le=10.0)] = 2.0
    warmup_epochs: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.0
    grad_clip_norm: Annotated[float, Field(gt=0.0, le=1e6)] | None = 5.0
    grad_accumulation: Annotated[int, Field(ge=1, le=1024)] = 1


class ResourcesSpec(_Strict):
    """How a trial is scaled."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] = 2
    cpus_per_worker: Annotated[float, Field(gt=0.0, le=1024.0)] = 0.45
    gpus_per_worker: Annotated[float, Field(ge=0.0, le=16.0)] = 0.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


#: the false-accept rates at which evaluation reports TAR and its threshold (those a pair
#: set's impostor count resolves)
FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
#: metric names at one FAR (``.format(far=far)``): TAR, its fold spread, the threshold
TAR_AT_FAR = "tar_at_far_{far:.0e}"
TAR_AT_FAR_STD = "tar_at_far_{far:.0e}_std"
THRESHOLD_AT_FAR = "threshold_at_far_{far:.0e}"


class EvaluationSpec(_Strict):
    """Open-set verification on held-out identities (and ``data.pair_files``), every epoch.

    The held-out images evaluated are a seeded subset chosen once per run, the same on every
    rank (``workers.evaluation.select_heldout``): ``max_identities`` identities and
    ``images_per_identity`` images of each (``None``: all). The defaults keep an epoch's
    evaluation at most 20k images (LFW embeds 12k) whatever the dataset — 20% of WebFace42M
    would be 8.4M — while leaving the metrics limited by ``num_pairs``, not by the cap:
    2000 × C(10, 2) = 90k distinct genuine pairs and ~2M identity pairs for the 1500 of each
    that the default 3000 pairs draw, and 2000 class means have 1,999,000 ≤ 2M pairs, so the
    held-out separation p99 stays exact. The ranks split the embedding work.
    """

    num_pairs: Annotated[int, Field(ge=20, le=10_000_000)] = 3000
    flip: bool = False
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 512
    max_identities: Annotated[int, Field(ge=2, le=100_000_000)] | None = 2000
    images_per_identity: Annotated[int, Field(ge=2, le=1_000_000)] | None = 10


class CheckpointSpec(_Strict):
    """What a run keeps of its checkpoints (each holds the sharded head and its optimizer)."""

    #: the most recent checkpoints kept in storage (``ray.train.CheckpointConfig(num_to_keep)``)
    keep: Annotated[int, Field(ge=1, le=1000)] = 2


class TrialConfig(_Strict):
    """Everything one trial (or one production training run) needs."""

    version: Literal[1] = CONFIG_VERSION
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 2
    batch_size: Annotated[int, Field(ge=2, le=1 << 20)] = 128
    loss: LossSpec = Field(default_factory=LossSpec)
    head: HeadSpec = Field(default_factory=HeadSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    data: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        accumulation = self.optim.grad_accumulation
        if self.batch_size % accumulation:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by "
                             f"optim.grad_accumulation = {accumulation}")
        if self.batch_size // accumulation < 2:
            raise ValueError(f"batch_size / optim.grad_accumulation = "
                             f"{self.batch_size // accumulation} must be ≥ 2 (BatchNorm)")
        if self.head.filter_threshold > 0 and not self.loss.build().cosine_logits:
            raise ValueError(f"head.filter_threshold = {self.head.filter_threshold} needs a loss "
                             f"with cosine logits; {self.loss.name} does not normalise both")
        return self

    def to_yaml(self) -> str:
        """The YAML text ``load_trial_config`` reads back unchanged."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_trial_config(data: Any, source: str = "trial config",
                       flags: Mapping[str, str] | None = None) -> TrialConfig:
    """Validate a mapping (its ``data`` section against ``DataConfig`` too); every problem
    becomes one line of a ``ConfigError``. ``flags`` maps dotted fields (or sections) to the
    command-line flag that set them: a problem there names the flag instead of ``source``."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: must be a mapping of fields, got {type(data).__name__}"])
    lines = []
    if isinstance(data.get("data"), dict):
        try:
            DataConfig.model_validate(data["data"])
        except ValidationError as error:
            lines = format_validation_error(error, DataConfig, source, "data", flags)
    try:
        config = TrialConfig.model_validate(data)
    except ValidationError as error:
        lines = format_validation_error(error, TrialConfig, source, flags=flags) + lines
    if lines:
        raise ConfigError(lines)
    return config


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        self.key, self.line = key, line
        super().__init__(f"duplicate key {key!r}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter and closer to YAML 1.2: a duplicate key is an error (not
    last-wins) and ``1e-3`` / ``5E+2`` are floats (YAML 1.1 wants ``1.0e-3``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed by the one YAML reader of configs, spaces and ``--set`` values; a
    problem is a one-line ``ConfigError`` naming ``source`` (and the line)."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except _DuplicateKey as error:
        raise ConfigError([f"{source}:{error.line}: duplicate key {error.key!r} (each key "
                           "may appear once per mapping)"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{source}: not valid YAML ({str(error).splitlines()[0]})"]) \
            from None


def read_yaml(path: str | Path, kind: str) -> Any:
    """The parsed content of a UTF-8 YAML file (``parse_yaml``); a missing, undecodable or
    unparsable one is a one-line ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such {kind}"])
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read {kind} ({error.strerror})"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                           f"at offset {error.start}); save the {kind} as UTF-8"]) from None
    return parse_yaml(text, str(path))


def load_trial_config(path: str | Path) -> TrialConfig:
    """Read and validate a trial config YAML file."""
    return parse_trial_config(read_yaml(path, "config file"), str(path))


def format_validation_error(error: ValidationError, model: type[BaseModel],
                            source: str, prefix: str = "",
                            flags: Mapping[str, str] | None = None) -> list[str]:
    """One line per pydantic error: ``source: field = value <what is allowed>`` (field names
    after ``prefix.`` when ``model`` is a section); a field a flag set (``flags``, see
    ``parse_trial_config``) reads ``--flag = value <what is allowed>``."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        subject = flag_subject(location, source, flags or {})
        field = _field_info(model, item["loc"])
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            parent = _model_at(model, item["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"{subject} is not a known field; allowed: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{subject} is required")
        elif field is not None and item["type"] != "value_error" and (allowed := _allowed(field)):
            lines.append(f"{subject} = {value!r} {allowed}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            where = subject if location else f"{source}: config"
            if not isinstance(value, dict | list):
                where = f"{where} = {value!r}"
            lines.append(f"{where}: {message}")
    return lines


def flag_subject(location: str, source: str, flags: Mapping[str, str]) -> str:
    """How an error names the dotted field ``location``: the flag that set it (``--epochs``),
    ``--set a: a.b`` when a flag set a section above it, else ``source: location``."""
    if location in flags:
        return flags[location]
    parents = [key for key in flags if location.startswith(f"{key}.")]
    if parents:
        return f"{flags[max(parents, key=len)]}: {location}"
    return f"{source}: {location}"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = _model_type(field.annotation)
        if current is None:
            return None
    return current


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    parent = _model_at(model, loc[:-1]) if loc else None
    if parent is None or not isinstance(loc[-1], str):
        return None
    return parent.model_fields.get(loc[-1])


def field_constraints(field: Any) -> tuple[Any, list[Any]]:
    """A pydantic field's base annotation (inside ``X | None`` and ``Annotated``) and its
    constraints (``Ge``, ``Lt``, ...)."""
    annotation, constraints = field.annotation, list(field.metadata)
    options = () if typing.get_origin(annotation) is Literal else typing.get_args(annotation)
    for option in options:
        if typing.get_origin(option) is Annotated:
            annotation = typing.get_args(option)[0]
            for extra in option.__metadata__:
                constraints += getattr(extra, "metadata", [extra])
    return annotation, constraints


def _allowed(field: Any) -> str:
    """'must be a number in (0, 1]' / 'is not one of [...]' / 'must be a mapping ...': what a
    field allows, from its annotation and constraints ("" when nothing useful is known)."""
    low, high, low_open, high_open = None, None, False, False
    annotation, constraints = field_constraints(field)
    declared = field.annotation
    options = () if typing.get_origin(declared) is Literal else typing.get_args(declared)
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Gt):
            low, low_open = constraint.gt, True
        elif isinstance(constraint, annotated_types.Ge):
            low = constraint.ge
        elif isinstance(constraint, annotated_types.Lt):
            high, high_open = constraint.lt, True
        elif isinstance(constraint, annotated_types.Le):
            high = constraint.le
    kind = "an integer" if annotation is int else "a number"
    if low is None and high is None and annotation in (int, float):
        return f"must be {kind}"
    if low is not None or high is not None:
        left = f"{'(' if low_open else '['}{low if low is not None else '-inf'}"
        right = f"{high if high is not None else 'inf'}{')' if high_open else ']'}"
        return f"must be {kind} in {left}, {right}"
    if typing.get_origin(field.annotation) is Literal:
        return f"is not one of {list(typing.get_args(field.annotation))}"
    if annotation is bool:
        return "must be true or false"
    if (model := _model_type(annotation)) is not None:
        return f"must be a mapping with fields {sorted(model.model_fields)}"
    if typing.get_origin(annotation) is dict:
        return "must be a mapping"
    if typing.get_origin(annotation) is tuple:
        return "must be a list"
    if str in (annotation, *options):
        return "must be a string"
    return ""

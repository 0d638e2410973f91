"""The data surface of the train loop: a validated ``DataConfig`` and ``load_dataset``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._dataset import LabelledDataset
from ._image_folder import load_image_folder
from ._omniglot import alphabet_of_class, check_omniglot, load_omniglot, resolve_omniglot_path
from ._pairs import PairSet, read_pairs_bin
from ._parquet import check_parquet_features, read_parquet_features
from ._recordio import check_recordio, load_recordio
from ._shards import PackedShards, check_shards, heldout_dataset, open_shards
from ._split import split_dataset, split_identities
from ._synthetic import synthetic_identities

Source = Literal["synthetic", "image_folder", "recordio", "omniglot", "parquet", "shards"]
_SYNTHETIC_ONLY = ("num_identities", "samples_per_identity", "difficulty", "heldout_identities")
#: fixed by a packed folder's manifest (size, split) or not used by Ray Data ingest
_NOT_FOR_SHARDS = ("image_size", "channels", "heldout_fraction", "loader_workers")


class DataConfig(BaseModel):
    """Where the identities come from and how they are split.

    ``synthetic`` (default, no path): ``num_identities`` train and ``heldout_identities``
    held-out identities of ``samples_per_identity`` images at ``difficulty`` (0 = clean,
    1 = tuned default). Other sources split their identities with ``heldout_fraction``
    (omniglot holds out whole alphabets); 0 (every identity trains) only with ``pair_files``,
    whose first set then gives the objective ``verification_accuracy``.
    ``image_size``/``channels`` are the decoded size of image sources; ``flip`` turns on random
    horizontal flips of training images; ``pair_files`` are ``.bin`` verification sets loaded
    beside the split.

    ``shards`` (``path``: a packed folder or its ``manifest.json``, see
    ``python -m workers.data.pack``): the split, image size and channels come from the
    manifest; Ray Data streams the train shards, decoding on at most ``ray_data_cpus`` CPUs
    per trial.
    """

    # strict, as the trial config: a YAML ``true`` or ``32.0`` is not an integer
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: Source = "synthetic"
    path: str | None = None
    seed: int = 0
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    flip: bool = False
    num_identities: int = Field(500, ge=2)
    samples_per_identity: int = Field(20, ge=2)
    heldout_identities: int = Field(200, ge=2)
    difficulty: float = Field(1.0, ge=0.0, le=4.0)
    pair_files: tuple[str, ...] = Field((), strict=False)  # a YAML list
    #: data-loader processes per Train worker that decode ahead of training (0: in the
    #: training process); None = auto from ``resources.cpus_per_worker``
    loader_workers: int | None = Field(None, ge=0, le=64)
    #: source ``shards``: logical CPUs one trial's Ray Data ingest (read, decode, flip) may use
    #: at once, on any nodes; the study counts them in each trial's share of the cluster
    ray_data_cpus: float = Field(1.0, gt=0.0, le=4096.0)
    #: after ``pair_files``, which its validator reads
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)

    @field_validator("heldout_fraction")
    @classmethod
    def _heldout_needs_pairs(cls, value: float, info: ValidationInfo) -> float:
        if value == 0.0 and not info.data.get("pair_files"):
            raise ValueError("must be a number in (0.0, 1.0) without pair_files (0 holds out "
                             "no identities and needs pair files)")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source in ("image_folder", "recordio", "parquet", "shards") and not self.path:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.source == "synthetic" and self.path:
            raise ValueError("source 'synthetic' takes no path")
        if self.source in ("synthetic", "omniglot", "parquet") and self.channels != 1:
            raise ValueError(f"source {self.source!r} has one channel; got channels = "
                             f"{self.channels}")
        if self.source == "parquet" and self.flip:
            raise ValueError("flip needs images; source 'parquet' holds feature vectors")
        misplaced = (sorted(set(_SYNTHETIC_ONLY) & self.model_fields_set)
                     if self.source != "synthetic" else
                     sorted({"heldout_fraction"} & self.model_fields_set))
        if self.source == "shards":
            misplaced += sorted(set(_NOT_FOR_SHARDS) & self.model_fields_set)
        elif "ray_data_cpus" in self.model_fields_set:
            misplaced.append("ray_data_cpus")
        if misplaced:
            hint = " (its manifest fixes them)" if self.source == "shards" else ""
            raise ValueError(f"{misplaced} do not apply to source {self.source!r}{hint}")
        return self


@dataclass(frozen=True)
class DatasetSplit:
    """Identity-disjoint ``train`` (labels in ``[0, num_classes)``) and ``heldout`` parts.

    Source ``shards``: ``train`` is None (Ray Data streams it from ``shards``, the packed
    folder) and ``heldout`` reads the held-out shards.
    """

    train: LabelledDataset | None
    heldout: LabelledDataset
    num_classes: int
    input_shape: tuple[int, ...]
    pairs: tuple[PairSet, ...] = field(default=())
    shards: PackedShards | None = None


def parse_data_config(data: dict[str, Any], source: str = "data") -> DataConfig:
    """Validate a plain dict; a bad one raises ``ValueError`` with one line per problem,
    ``<source>.<field>: <message> (got <value>)``."""
    try:
        return DataConfig.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            field = ".".join(str(part) for part in (source, *problem["loc"]))
            message = problem["msg"].removeprefix("Value error, ")
            got = f" (got {problem['input']!r})" if problem["loc"] else ""
            lines.append(f"{field}: {message}{got}")
        raise ValueError("\n".join(lines)) from None


def check_data_config(data: dict[str, Any], source: str = "data") -> DataConfig:
    """``parse_data_config`` plus every check of the data that reads no pixel and no feature
    value: the one check a driver (``study/run.py``, ``python -m workers.train``) runs before
    Ray starts, so a trial never fails on what it can find. Every pair file loads (restricted
    unpickling, every image's signature, the first image decodes); the data path's index is
    built as ``load_dataset`` builds it — an image folder's listing (every identity holds an
    image), a RecordIO set's header, every ``.idx`` line and every record's header (the label
    scan, cached per ``.rec`` version), a Parquet schema and its label column, an npz's array
    headers and labels, a shard manifest and every shard's size and footer — and the
    identities split as training splits them, into ≥ 2 training identities and (held out)
    ≥ 2 identities with a pair of images. Cost: O(N) listing, index and label work, cached
    for RecordIO; no image is decoded beyond each pair file's first. A problem is one line
    naming the file and the field."""
    config = parse_data_config(data, source)
    checks: list[tuple[Path, str, Callable[[Path], object]]] = [
        (Path(path), f"{source}.pair_files", read_pairs_bin) for path in config.pair_files]
    if config.source == "omniglot":
        checks.append((resolve_omniglot_path(config.path), f"{source}.source = 'omniglot'",
                       _CONTENT_CHECKS["omniglot"]))
    elif config.path:
        checks.append((Path(config.path), f"{source}.source = {config.source!r}",
                       _CONTENT_CHECKS[config.source]))
    for path, where, check in checks:
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found ({where})")
        try:
            found = check(path)
            if isinstance(found, _Labels):
                _check_split(found, config, path)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{str(error).splitlines()[0]} ({where})") from None
    if config.source == "shards":
        _check_evaluable(open_shards(config.path or ""), config)
    return config


def _check_evaluable(shards: PackedShards, config: DataConfig) -> None:
    """Something to evaluate on: held-out shards, or pair files."""
    if shards.manifest.heldout.rows == 0 and not config.pair_files:
        raise ValueError(f"{shards.root}: packed with --heldout-fraction 0, it holds out no "
                         "identities; evaluation needs data.pair_files")


@dataclass(frozen=True)
class _Labels:
    """A source's identity label per sample and, when identities go together (omniglot's
    alphabets), the group of each label."""

    labels: torch.Tensor
    groups: torch.Tensor | None = None


def _check_split(found: _Labels, config: DataConfig, path: Path) -> None:
    """The identities split as ``load_dataset`` splits them leave ≥ 2 to train on and, with
    ``heldout_fraction > 0``, ≥ 2 held out, one of them with ≥ 2 images (a genuine pair)."""
    present, counts = torch.unique(found.labels, return_counts=True)
    if len(present) < 2:
        raise ValueError(f"{path}: {len(present)} identity; training needs ≥ 2 identities")
    groups = present if found.groups is None else found.groups[present]
    if config.heldout_fraction > 0 and len(torch.unique(groups)) < 2:
        raise ValueError(f"{path}: its identities form 1 group; holding some out needs ≥ 2")
    train, heldout = split_identities(groups, config.heldout_fraction, config.seed)
    if len(train) < 2:
        raise ValueError(f"{path}: {len(present)} identities leave {len(train)} to train on "
                         f"after data.heldout_fraction = {config.heldout_fraction}; training "
                         "needs ≥ 2")
    if config.heldout_fraction > 0 and (len(heldout) < 2 or counts[heldout].max() < 2):
        raise ValueError(f"{path}: the {len(heldout)} held-out identities need ≥ 2 identities "
                         "and one with ≥ 2 images for verification pairs")


def _index_folder(path: Path) -> _Labels:
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder (image_folder needs root/<identity>/<image>)")
    return _Labels(load_image_folder(path).labels)


def _index_recordio(path: Path) -> _Labels:
    check_recordio(path)  # the header first: its problems have the clearest messages
    return _Labels(load_recordio(path).labels)


_CONTENT_CHECKS: dict[str, Callable[[Path], object]] = {
    "image_folder": _index_folder, "recordio": _index_recordio,
    "parquet": lambda path: _Labels(check_parquet_features(path)),
    "omniglot": lambda path: _Labels(torch.from_numpy(check_omniglot(path).reshape(-1)),
                                     alphabet_of_class()),
    "shards": check_shards}


def dataset_key(config: DataConfig) -> str | None:
    """What identifies ``load_dataset(config)``'s result for sharing: the validated config as
    JSON (defaults included), or None for source ``shards`` (its loading reads a manifest and
    the held-out shards; Ray Data streams the rest). A study loads each key once and hands the
    split to every trial's workers instead of each worker loading, indexing and splitting."""
    return None if config.source == "shards" else config.model_dump_json()


def load_dataset(config: DataConfig) -> DatasetSplit:
    """Load, validate and split the configured data; every input error is raised here
    (source ``shards``: the manifest and the held-out shards; ``check_data_config`` checks
    the train shards' footers once, on the driver)."""
    if config.source == "shards":
        return _load_shards(config)
    pairs = tuple(read_pairs_bin(path, config.image_size, config.channels)
                  for path in config.pair_files)
    if config.source == "synthetic":
        common = {"difficulty": config.difficulty, "image_size": config.image_size,
                  "seed": config.seed}
        train = synthetic_identities(config.num_identities, config.samples_per_identity,
                                     role="train", flip=config.flip, **common)
        heldout = synthetic_identities(config.heldout_identities, config.samples_per_identity,
                                       role="heldout", **common)
    else:
        groups = None
        if config.source == "omniglot":
            full = load_omniglot(resolve_omniglot_path(config.path), config.image_size)
            groups = alphabet_of_class()
        elif config.source == "image_folder":
            full = load_image_folder(Path(config.path or ""), config.image_size,
                                     config.channels)
        elif config.source == "recordio":
            full = load_recordio(Path(config.path or ""), config.image_size, config.channels)
        else:
            full = read_parquet_features(Path(config.path or ""))
        train, heldout = split_dataset(full, config.heldout_fraction, config.seed, groups,
                                       config.flip)
    num_classes = int(torch.unique(train.labels).numel())
    return DatasetSplit(train, heldout, num_classes, train.input_shape, pairs)


def _load_shards(config: DataConfig) -> DatasetSplit:
    """The held-out side and the sizes of a packed folder; no train image is read here."""
    shards = open_shards(config.path or "")
    _check_evaluable(shards, config)
    size, channels = shards.manifest.image_size, shards.manifest.channels
    pairs = tuple(read_pairs_bin(path, size, channels) for path in config.pair_files)
    return DatasetSplit(None, heldout_dataset(shards), shards.manifest.train.classes,
                        shards.input_shape, pairs, shards)

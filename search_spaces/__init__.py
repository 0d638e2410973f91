"""Search spaces: one YAML file per loss family and the loader that validates them."""

from ._space import (
    DISTRIBUTIONS,
    SPACE_VERSION,
    Parameter,
    SearchSpace,
    SpaceError,
    load_space,
    load_spaces,
    parse_space,
    shipped_space_files,
    study_grid,
)

__all__ = [
    "DISTRIBUTIONS",
    "SPACE_VERSION",
    "Parameter",
    "SearchSpace",
    "SpaceError",
    "load_space",
    "load_spaces",
    "parse_space",
    "shipped_space_files",
    "study_grid",
]

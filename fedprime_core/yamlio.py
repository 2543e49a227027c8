"""Reading the project's small YAML files (run configs, grids, missing tables) with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception]) -> dict[Any, Any]:
    """Parse ``path`` as YAML that must hold a mapping (an empty file gives ``{}``).

    Args:
        path: the file.
        what: how messages name the file, e.g. ``"grid file"``.
        error: the exception class raised (``ConfigError``, ``DataError``, ...).

    Raises:
        error: the file does not exist, is not valid YAML, or does not hold a mapping;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data

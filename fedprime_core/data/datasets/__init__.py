"""The datasets a run can name, one module each, behind one interface (:class:`DatasetSpec`).

A dataset's module holds its facts: its name, tokens per text, where its files are in each
on-disk layout, its headline metric and its task protocols. Everything that differs between
datasets is read from here; nothing else tests a dataset's name. The config schema takes its
``dataset`` choices and text lengths from :data:`DATASETS`.

Adding a dataset: a module here with its ``SPEC``, one line in :data:`DATASETS`, then
``python scripts/sync_config_docs.py`` (docs/architecture.md, "Where to change things").

Light: no numpy, no torch, no pyarrow (the schema and the torch-free records import it).
"""

from __future__ import annotations

from . import embedded, fashion, food101, mmimdb
from .spec import DATA_LAYOUTS, JSONL_FILES, SPLITS, DatasetSpec

__all__ = [
    "DATASETS",
    "DATA_LAYOUTS",
    "JSONL_FILES",
    "SPLITS",
    "DatasetSpec",
    "dataset",
    "headline_metric",
    "text_lengths",
]

#: Every dataset, by name, in the order the schema lists them.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        embedded.SPEC,
        food101.SPEC,
        mmimdb.SPEC,
        fashion.SPEC,
    )
}


def dataset(name: str, registry: dict[str, DatasetSpec] | None = None) -> DatasetSpec:
    """The spec of dataset ``name`` (case, ``-`` and ``_`` ignored).

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    registry = DATASETS if registry is None else registry
    key = str(name).lower().replace("-", "").replace("_", "")
    for spec in registry.values():
        if spec.name.replace("-", "").replace("_", "") == key:
            return spec
    raise KeyError(name)


def text_lengths() -> dict[str, int]:
    """Tokens per text of each dataset when ``text-max-length`` is 0."""
    return {name: spec.text_length for name, spec in DATASETS.items()}


def headline_metric(name: str) -> str:
    """What results report first for dataset ``name`` (its :attr:`DatasetSpec.metric`)."""
    return dataset(name).metric

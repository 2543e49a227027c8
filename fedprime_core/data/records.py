"""Plain records that every loader produces, whatever the layout on disk."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

import numpy as np

from .datasets import headline_metric

#: An image: a file path, encoded bytes (arrow layout), a ``(H, W, 3)`` uint8 array
#: (generated data), or ``None`` when the dataset has no image for the sample.
ImageSource = str | bytes | np.ndarray | None


class DataError(ValueError):
    """A dataset file, row or field is missing or unreadable. The message names it."""


class Pattern(enum.IntEnum):
    """Missing-modality pattern of one sample (the order of missing-aware prompt sets)."""

    COMPLETE = 0
    TEXT_MISSING = 1
    IMAGE_MISSING = 2


#: Names of the patterns, in :class:`Pattern` order (the keys of pattern counts).
PATTERN_NAMES = ("complete", "text-missing", "image-missing")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One (image, text, label) example.

    A sample can miss a modality *for real*: ``text == ""`` (the row has no text) or no
    image at all (``image is None`` and ``image_features is None``); see
    :attr:`natural_pattern`. Loaders never produce a sample that misses both.

    Attributes:
        text: the caption / title / plot ("" if the row has none: text-missing).
        image: where the image comes from (see :data:`ImageSource`); ``None`` when the
            row has no image.
        label: class index (single-label) or sorted tuple of class indices (multi-label).
        uid: ``"<file>:<row>"``, used in every error message about this sample.
        image_features: precomputed frozen image features: a ``.npy`` path or an array
            ``(F, d_img)`` / ``(d_img,)``; used by feature-based backbones instead of pixels.
    """

    text: str
    image: ImageSource
    label: int | tuple[int, ...]
    uid: str = ""
    image_features: str | np.ndarray | None = None

    @property
    def natural_pattern(self) -> Pattern:
        """The pattern the data itself has: text-missing, image-missing or complete."""
        if not self.text:
            return Pattern.TEXT_MISSING
        if self.image is None and self.image_features is None:
            return Pattern.IMAGE_MISSING
        return Pattern.COMPLETE


def natural_patterns(samples: Sequence[Sample]) -> np.ndarray:
    """``(N,)`` int8 pattern each sample has in the data itself (see :attr:`Sample.natural_pattern`)."""
    return np.fromiter((int(s.natural_pattern) for s in samples), dtype=np.int8, count=len(samples))


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """A dataset with one label space shared by every split.

    Attributes:
        train, dev, test: samples per split (``dev`` may be empty: a validation split is
            then carved out of train by the caller).
        classes: class names; a label ``i`` means ``classes[i]``.
        multilabel: labels are tuples and training uses BCE (MM-IMDB genres).
        text_max_length: default tokens per text for this dataset.
        name: dataset name, for reports.
        skipped_empty: per split, rows skipped because they had neither text nor image.
        bad_rows: per split, the reasons of the rows skipped as bad (``skip_bad_rows``): one
            line each, naming the file, the row and the field.
    """

    train: Sequence[Sample]
    dev: Sequence[Sample]
    test: Sequence[Sample]
    classes: tuple[str, ...]
    multilabel: bool
    text_max_length: int
    name: str
    skipped_empty: Mapping[str, int] = dataclasses.field(default_factory=dict)
    bad_rows: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def headline_metric(self) -> str:
        """What results report first: :func:`~fedprime_core.data.datasets.headline_metric` of the dataset."""
        return headline_metric(self.name)


def primary_labels(samples: Sequence[Sample]) -> np.ndarray:
    """One int label per sample (a multi-label sample's first label), ``(N,)``; for partitioning."""
    return np.array(
        [s.label if isinstance(s.label, int) else (s.label[0] if s.label else -1) for s in samples], dtype=np.int64
    )

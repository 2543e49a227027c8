"""Loaders for the real benchmarks: UPMC Food-101 and MM-IMDB, from disk, no downloads.

Two on-disk layouts are understood (see :func:`load_dataset` for the exact files and fields),
each read by its own module:

* ``"jsonl"``: the MMBT layout (Kiela et al. 2019), ``train.jsonl`` / ``dev.jsonl`` /
  ``test.jsonl`` with one JSON object per line and image files next to them
  (:mod:`fedprime_core.data.jsonl`);
* ``"arrow"``: the pyarrow IPC *file* format tables written by ``make_arrow.py`` of the
  missing-aware-prompts code (Lee et al., CVPR 2023; ``vilt/utils/write_food101.py`` and
  ``vilt/utils/write_mmimdb.py``), images stored as encoded bytes (:mod:`fedprime_core.data.arrow`).

This module finds the files (layout detection, the class list) and assembles the splits; the
datasets' facts are :mod:`fedprime_core.data.datasets`, the label-space protocol
:mod:`fedprime_core.data.labels`.

Whatever the layout, the result is a :class:`~fedprime_core.data.records.DatasetSplits` with
**one** label space computed from the train split only and reused for dev and test (the
reference code recomputes MM-IMDB's top-8 genres per split, so the same index can mean a
different genre in train and test; this loader cannot do that). Images are not decoded into
memory: a jsonl image stays an absolute path, an arrow image stays its encoded bytes; both
are opened later by :func:`fedprime_core.data.processing.open_image`.

Real missing modalities are data, not errors: a row without an image becomes an
image-missing sample, a row without text a text-missing one, a row with neither is skipped
and counted (see :func:`load_dataset`). A *named* file that does not exist stays an error.

Bad input never passes silently and is never mislabelled: every unreadable row raises a
:class:`~fedprime_core.data.records.DataError` naming the file, the row and the field, or,
with ``skip_bad_rows=True``, is skipped and counted in a logged warning.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from . import labels
from .arrow import read_arrow
from .datasets import DATA_LAYOUTS, DATASETS, JSONL_FILES, SPLITS, DatasetSpec, dataset
from .jsonl import read_jsonl
from .records import DataError, DatasetSplits, Sample
from .rows import RawRow, SplitRows

logger = logging.getLogger(__name__)

#: The shared class list a data folder may hold: one class name per line.
CLASSES_FILE = "classes.txt"

#: How many bad-row reasons a ``skip_bad_rows`` warning quotes.
_REASONS_SHOWN = 5


_JSONL_FILES = JSONL_FILES
_SPLITS = SPLITS


def split_files(name: str, layout: str) -> dict[str, str]:
    """File name of each split of dataset ``name`` in ``layout`` (``"jsonl"`` or ``"arrow"``)."""
    return _spec(name).split_files(layout)


def dataset_traits(name: str, mmimdb_protocol: str = "paper") -> tuple[bool, str, int]:
    """``(multilabel, headline metric, default text length)`` of a dataset under a protocol."""
    spec = _spec(name)
    _check_protocol(spec, mmimdb_protocol)
    return spec.is_multilabel(mmimdb_protocol), spec.metric, spec.text_length


def read_class_list(path: str | Path) -> tuple[str, ...]:
    """Class names of a ``classes.txt``: one per line, blank lines and ``#`` comments ignored.

    Raises:
        DataError: unreadable file, a name given twice (naming the line), or no names.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class list {str(path)!r}: {exc}") from None
    names: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in names:
            raise DataError(f"class list {str(path)!r}, line {lineno}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise DataError(f"class list {str(path)!r} names no class (one class name per line)")
    return tuple(names)


def write_class_list(path: str | Path, classes: Sequence[str]) -> None:
    """Write ``classes.txt``: one class name per line, in label-index order."""
    Path(path).write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")


def check_dataset_root(name: str, root: str | Path, layout: str = "auto") -> str:
    """Whether ``root`` can hold dataset ``name`` in ``layout``, without reading a row.

    What :func:`load_dataset` checks first, for a quick check at the edge (``cli check``):
    the layout is known, the root is a folder, and it holds a split file of that layout
    (under ``"auto"``, of either).

    Returns:
        The layout, ``"jsonl"`` or ``"arrow"`` (detected under ``"auto"``).

    Raises:
        DataError: an unknown layout, a root that is not a folder, or no split file; the
            message names the files expected.
    """
    spec = _spec(name)
    root = Path(os.path.abspath(os.fspath(root)))
    if layout not in DATA_LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(DATA_LAYOUTS)}")
    if not root.is_dir():
        raise DataError(
            f"dataset root {str(root)!r} does not exist or is not a folder; expected it to hold "
            f"{_expected(spec, layout)}"
        )
    if layout == "auto":
        return _detect_layout(spec, root)
    if not any((root / f).is_file() for f in spec.split_files(layout).values()):
        raise DataError(f"{spec.name}: {str(root)!r} holds no split file; expected {_expected(spec, layout)}")
    return layout


def load_dataset(
    name: str,
    root: str | Path,
    layout: str = "auto",
    num_classes: int = 0,
    skip_bad_rows: bool = False,
    verify_images: bool = True,
    classes: Sequence[str] | None = None,
    mmimdb_protocol: str = "paper",
    required: Sequence[str] = ("train", "test"),
) -> DatasetSplits:
    """Load UPMC Food-101, MM-IMDB or the fashion benchmark from ``root`` with one label space for all splits.

    The fashion benchmark (``docs/datasets/fashion.md``) is single-label and read as Food-101
    is: its ``label`` is the article type, its ``text`` the product name.

    Layouts (``root`` is the folder holding the files):

    * ``"jsonl"`` (MMBT style): ``train.jsonl``, ``dev.jsonl`` (optional: an empty dev split
      if absent) and ``test.jsonl``, one JSON object per line (blank lines are ignored) with

      - ``text`` (str): the recipe title (Food-101) or plot (MM-IMDB); absent, ``null`` or
        empty: the row has no text (a text-missing sample);
      - ``img`` (str): image path, relative to ``root`` (an absolute path is kept); absent,
        ``null`` or empty: the row has no image (an image-missing sample, unless
        ``img_features`` gives its features: a feature backbone never opens the image);
      - the label: Food-101 ``label``, a class-name string; MM-IMDB a list of genre-name
        strings in ``label``, or, when ``label`` is absent, ``labels``, or else ``genres``;
      - optional ``img_features`` (str): a ``.npy`` of precomputed image features, relative
        to ``root``, stored as an absolute path in :attr:`Sample.image_features`.

    * ``"arrow"`` (pyarrow IPC file format, as written by the missing-aware-prompts
      ``make_arrow.py``): Food-101 ``food101_train.arrow``, ``food101_val.arrow`` (dev,
      optional), ``food101_test.arrow``; MM-IMDB ``mmimdb_train.arrow``, ``mmimdb_dev.arrow``
      (optional), ``mmimdb_test.arrow``. Columns read:

      - ``image``: the encoded image bytes (kept as ``bytes``); ``null`` or empty bytes: the
        row has no image (image-missing);
      - text: Food-101 ``text``, MM-IMDB ``plots``; a list of strings (a plain string is
        accepted too). The reference dataset class turns every list entry into its own
        example; here a row stays one sample and its entries are joined with a space
        (Food-101 rows hold exactly one title, so that is the title itself); ``null``, an
        empty list or only empty strings: the row has no text (text-missing);
      - ``label``: an int class index, named through ``root/class_idx.json``
        (``{"apple_pie": 71, ...}``, the reference mapping) when present, else ``str(index)``;
        a string ``label`` column is taken as the class name. MM-IMDB: either a multi-hot
        list of the 23 genres of :data:`MMIMDB_GENRES` (when a ``genres`` column is present
        it must agree with it, restricted to those 23 genres, else the row is bad), or an
        int class index as the reference FedPrime code writes it (single-genre movies); its
        genre is then the one MM-IMDB genre of the ``genres`` column when that column is
        present (the reference ranks its indices per split, so the index alone cannot be
        trusted), else ``class_idx.json`` or ``str(index)``.

      Other columns (``image_id``, ``split``) are ignored.

    * ``"auto"``: ``"jsonl"`` if any of ``train.jsonl`` / ``dev.jsonl`` / ``test.jsonl``
      exists in ``root``, else ``"arrow"`` if one of the arrow split files exists.

    Missing modalities in the data: a row without text and/or image is kept as a sample
    with ``text == ""`` and/or ``image is None`` (its
    :attr:`~fedprime_core.data.records.Sample.natural_pattern`); a row with **neither** is
    skipped, counted in :attr:`DatasetSplits.skipped_empty` and in a logged warning. A path
    to an image or feature file that does not exist is an error, as is an undecodable image.

    Labels: one mapping for every split. With a class list (``classes``, or
    ``root/classes.txt``; both given must agree) that list is the mapping, in its order:
    every site and the server of a federation share it. A Food-101 row whose class is not in
    the list is a bad row (an error naming the row); for MM-IMDB the list selects genres
    (others are removed from a row, and a row left with none is dropped, as below). Without
    a class list the mapping comes from the **train** split: classes by decreasing train
    frequency (number of train samples carrying the class), ties by name; ``num_classes=K>0``
    keeps the K most frequent. Food-101 samples of another class are dropped from every
    split; MM-IMDB labels are restricted to the kept genres and samples left without any are
    dropped. A dev/test sample whose class never occurs in train is dropped the same way.
    Kept and dropped counts are logged per split.

    MM-IMDB protocols (``mmimdb_protocol``): ``"paper"`` (the FedPrime paper and its
    reference code) keeps only *single-genre* movies (exactly one of the 23 MM-IMDB genres;
    other names such as 'News' are ignored, as the reference's multi-hot does) in every
    split, then the ``num_classes`` (default 8) most frequent genres **of train** (the
    reference ranks them per split); labels are ``int`` and the headline metric is macro-F1.
    ``"multilabel"``: every genre, labels sorted ``tuple[int, ...]``, BCE. Food-101 labels
    are ``int``.

    Every sample's ``uid`` is ``"<file path>:<row>"``: the 1-based line number for jsonl,
    the 0-based row index for arrow. Samples keep the order of their file.

    Args:
        name: ``"food101"``, ``"mmimdb"`` or ``"fashion"`` (case, ``-`` and ``_`` ignored).
        root: folder holding the dataset files.
        layout: ``"auto"``, ``"jsonl"`` or ``"arrow"``.
        num_classes: keep only the K most frequent train classes; ``0`` keeps all.
        skip_bad_rows: skip unreadable rows (logging how many per split and the first
            reasons) instead of raising.
        verify_images: decode every image (a truncated or corrupt one is a bad row; a
            missing image file or feature file is always an error, verified or not).
        classes: the federation's class list (label ``i`` is ``classes[i]``); ``None`` reads
            ``root/classes.txt`` when present, else derives the list from train.
        mmimdb_protocol: ``"paper"`` or ``"multilabel"`` (MM-IMDB only).
        required: splits whose file must exist (the others are empty when absent);
            ``("train", "test")`` for a whole benchmark, ``("train",)`` for a site's own
            data, ``("test",)`` for a server's held-out folder, ``()`` to take what is there.

    Returns:
        The splits, class names, ``multilabel`` (MM-IMDB multilabel protocol), the headline
        metric, the dataset's default text length (Food-101 40 tokens, MM-IMDB 128) and the
        count of rows skipped for having no modality.

    Raises:
        DataError: unknown dataset or layout, missing root or required split file, an
            unreadable file, a bad row (invalid JSON, mistyped field, missing or
            undecodable image, missing feature file, a class outside the class list; unless
            ``skip_bad_rows``), a class list that disagrees with ``classes.txt``, no train
            split to derive classes from, or an empty required train split after filtering.
            The message names the file, the row and the field.
        ValueError: ``num_classes`` is negative, or disagrees with the class list.
    """
    spec = _spec(name)
    _check_protocol(spec, mmimdb_protocol)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 keeps every class), got {num_classes}")
    unknown_splits = sorted(set(required) - set(_SPLITS))
    if unknown_splits:
        raise ValueError(f"required splits must be among {_SPLITS}, got {unknown_splits}")
    root = Path(os.path.abspath(os.fspath(root)))
    layout = check_dataset_root(name, root, layout)
    single_label = spec.single_label.get(mmimdb_protocol)
    multilabel = spec.is_multilabel(mmimdb_protocol)

    read: Callable[[Path], SplitRows]
    if layout == "jsonl":
        paths = [root / f for f in _JSONL_FILES]
        read = functools.partial(read_jsonl, root=root, spec=spec, verify=verify_images, skip=skip_bad_rows)
    else:
        paths = [root / f for f in spec.arrow_files]
        read = functools.partial(
            read_arrow, spec=spec, class_names=_class_index_names(root), verify=verify_images, skip=skip_bad_rows
        )

    raws: dict[str, list[RawRow]] = {}
    skipped_empty: dict[str, int] = {}
    bad_rows: dict[str, list[str]] = {split: [] for split in _SPLITS}
    for split, path in zip(_SPLITS, paths, strict=True):
        if not path.is_file():
            if split in required:
                raise DataError(
                    f"{spec.name}: {split} split file {str(path)!r} does not exist; expected {_expected(spec, layout)}"
                )
            logger.debug("%s: no %s split file %s; the %s split is empty", spec.name, split, path, split)
            raws[split] = []
            continue
        got = read(path)
        bad_rows[split].extend(got.bad)
        if got.bad:
            shown = " | ".join(got.bad[:_REASONS_SHOWN])
            logger.warning(
                "%s %s: skipped %d bad row(s) of %s; first reasons: %s", spec.name, split, len(got.bad), path, shown
            )
        if got.empty:
            logger.warning(
                "%s %s: skipped %d row(s) of %s that have neither text nor image", spec.name, split, got.empty, path
            )
        skipped_empty[split] = got.empty
        raws[split] = labels.single_label(got.rows, split, spec, mmimdb_protocol) if single_label else got.rows
    listed, source = _class_list(root, classes)
    if single_label and not listed and not num_classes:
        num_classes = spec.single_label_classes
    if listed is not None:
        if num_classes and num_classes != len(listed):
            raise ValueError(
                f"num_classes={num_classes} disagrees with the {len(listed)} classes of {source}; "
                "set num-classes to 0 (the class list decides) or to its length"
            )
        label_space = listed
    else:
        if not raws["train"] and "train" in required:
            raise DataError(
                f"{spec.name}: the train split of {str(paths[0])!r} is empty after filtering "
                f"({len(raws['train'])} readable rows, num_classes={num_classes})"
            )
        if not raws["train"]:
            raise DataError(
                f"{spec.name}: {str(root)!r} has no train rows to derive the class list from; give the "
                f"federation's class list (run config 'classes' or {CLASSES_FILE} in the folder, one class per line)"
            )
        label_space = labels.label_space(raws["train"], num_classes, spec.name)
    index = {c: i for i, c in enumerate(label_space)}
    seen_in_train = {n for r in raws["train"] for n in r.names} if listed is None else set(label_space)
    strict = listed is not None and not spec.multilabel
    samples: dict[str, list[Sample]] = {}
    for split in _SPLITS:
        samples[split], bad = labels.apply_labels(
            raws[split], index, seen_in_train, spec, split, multilabel, strict, source, skip_bad_rows
        )
        bad_rows[split].extend(bad)
        if bad:
            logger.warning(
                "%s %s: skipped %d row(s) whose class is not in %s; first: %s",
                *(spec.name, split, len(bad), source, " | ".join(bad[:_REASONS_SHOWN])),
            )
    if "train" in required and not samples["train"]:
        raise DataError(
            f"{spec.name}: the train split of {str(paths[0])!r} is empty after filtering "
            f"({len(raws['train'])} readable rows, num_classes={num_classes}"
            f"{f', {spec.name} protocol {mmimdb_protocol}' if spec.protocols else ''})"
        )
    return DatasetSplits(
        train=samples["train"],
        dev=samples["dev"],
        test=samples["test"],
        classes=label_space,
        multilabel=multilabel,
        text_max_length=spec.text_length,
        name=spec.name,
        skipped_empty=skipped_empty,
        bad_rows={split: tuple(reasons) for split, reasons in bad_rows.items() if reasons},
    )


# ---------------------------------------------------------------------------- set-up


def _spec(name: str) -> DatasetSpec:
    """The spec of a dataset read from disk (the generated one has no folder)."""
    on_disk = {key: spec for key, spec in DATASETS.items() if not spec.generated}
    try:
        return dataset(name, on_disk)
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(on_disk))}") from None


def _check_protocol(spec: DatasetSpec, protocol: str) -> None:
    if spec.protocols and protocol not in spec.protocols:
        raise DataError(f"unknown {spec.name} protocol {protocol!r}; expected one of {', '.join(spec.protocols)}")


def _class_list(root: Path, given: Sequence[str] | None) -> tuple[tuple[str, ...] | None, str]:
    """The class list (from ``given`` and/or ``root/classes.txt``) and a description of its source."""
    path = root / CLASSES_FILE
    from_file = read_class_list(path) if path.is_file() else None
    if given:
        given = tuple(given)
        if len(set(given)) != len(given):
            raise DataError(f"the class list {list(given)} names a class twice")
        if from_file is not None and from_file != given:
            raise DataError(
                f"the class list of the run config ({_short(given)}) differs from {str(path)!r} ({_short(from_file)}); "
                "every site and the server need one and the same list, in the same order"
            )
        return given, "the run config's class list"
    if from_file is not None:
        return from_file, repr(str(path))
    return None, "the classes of train"


def _short(names: Sequence[str], shown: int = 6) -> str:
    text = ", ".join(names[:shown])
    return f"{len(names)} classes: {text}{', ...' if len(names) > shown else ''}"


def _expected(spec: DatasetSpec, layout: str) -> str:
    """Human-readable description of the files a layout needs."""
    jsonl = "train.jsonl, dev.jsonl (optional) and test.jsonl (jsonl layout)"
    train, dev, test = spec.arrow_files
    arrow = f"{train}, {dev} (optional) and {test} (arrow layout)"
    return {"jsonl": jsonl, "arrow": arrow}.get(layout, f"either {jsonl} or {arrow}")


def _detect_layout(spec: DatasetSpec, root: Path) -> str:
    jsonl, arrow = root / _JSONL_FILES[0], root / spec.arrow_files[0]
    if any((root / f).is_file() for f in _JSONL_FILES):
        found = "jsonl"
    elif any((root / f).is_file() for f in spec.arrow_files):
        found = "arrow"
    else:
        raise DataError(
            f"cannot detect the layout of {spec.name} in {str(root)!r}: looked for {str(jsonl)!r} "
            f"(jsonl layout, or dev.jsonl / test.jsonl) and {str(arrow)!r} (arrow layout, or its dev / test "
            "files), found neither"
        )
    logger.debug("%s: detected the %s layout in %s", spec.name, found, root)
    return found


def _class_index_names(root: Path) -> dict[int, str] | None:
    """Index -> class name from ``root/class_idx.json`` (``{name: index}``), if present."""
    path = root / "class_idx.json"
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read class mapping {str(path)!r}: {exc}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) for k, v in mapping.items()
    ):
        raise DataError(f"class mapping {str(path)!r} must be a JSON object {{class name: int index}}")
    inverse = {v: k for k, v in mapping.items()}
    if len(inverse) != len(mapping):
        raise DataError(f"class mapping {str(path)!r} gives the same index to two classes")
    return inverse

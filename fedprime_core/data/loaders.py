"""Loaders for the real benchmarks: UPMC Food-101 and MM-IMDB, from disk, no downloads.

Two on-disk layouts are understood (see :func:`load_dataset` for the exact files and fields):

* ``"jsonl"``: the MMBT layout (Kiela et al. 2019), ``train.jsonl`` / ``dev.jsonl`` /
  ``test.jsonl`` with one JSON object per line and image files next to them;
* ``"arrow"``: the pyarrow IPC *file* format tables written by ``make_arrow.py`` of the
  missing-aware-prompts code (Lee et al., CVPR 2023; ``vilt/utils/write_food101.py`` and
  ``vilt/utils/write_mmimdb.py``), images stored as encoded bytes.

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

import dataclasses
import functools
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from ..progress import Progress
from .datasets import DATA_LAYOUTS, DATASETS, JSONL_FILES, SPLITS, DatasetSpec, dataset
from .datasets.mmimdb import GENRES as MMIMDB_GENRES
from .records import DataError, DatasetSplits, Sample

logger = logging.getLogger(__name__)

#: The shared class list a data folder may hold: one class name per line.
CLASSES_FILE = "classes.txt"

#: How many bad-row reasons a ``skip_bad_rows`` warning quotes.
_REASONS_SHOWN = 5


_JSONL_FILES = JSONL_FILES
_SPLITS = SPLITS


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A parsed row before the label space is known: class *names*, not indices."""

    text: str
    image: str | bytes | None
    names: tuple[str, ...]
    uid: str
    image_features: str | None
    where: str = ""


@dataclasses.dataclass
class _SplitRows:
    """What reading one split file gave: rows, reasons of bad rows, rows with no modality."""

    rows: list[_Raw]
    bad: list[str]
    empty: int = 0


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
    if layout not in DATA_LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(DATA_LAYOUTS)}")
    if not root.is_dir():
        raise DataError(
            f"dataset root {str(root)!r} does not exist or is not a folder; expected it to hold "
            f"{_expected(spec, layout)}"
        )
    if layout == "auto":
        layout = _detect_layout(spec, root)
    single_label = spec.single_label.get(mmimdb_protocol)
    multilabel = spec.is_multilabel(mmimdb_protocol)

    read: Callable[[Path], _SplitRows]
    if layout == "jsonl":
        paths = [root / f for f in _JSONL_FILES]
        read = functools.partial(_read_jsonl, root=root, spec=spec, verify=verify_images, skip=skip_bad_rows)
    else:
        paths = [root / f for f in spec.arrow_files]
        read = functools.partial(
            _read_arrow, spec=spec, class_names=_class_index_names(root), verify=verify_images, skip=skip_bad_rows
        )

    raws: dict[str, list[_Raw]] = {}
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
        raws[split] = _single_label(got.rows, split, spec, mmimdb_protocol) if single_label else got.rows
    if not any(path.is_file() for path in paths):
        raise DataError(f"{spec.name}: {str(root)!r} holds no split file; expected {_expected(spec, layout)}")

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
        label_space = _label_space(raws["train"], num_classes, spec.name)
    index = {c: i for i, c in enumerate(label_space)}
    seen_in_train = {n for r in raws["train"] for n in r.names} if listed is None else set(label_space)
    strict = listed is not None and not spec.multilabel
    samples: dict[str, list[Sample]] = {}
    for split in _SPLITS:
        samples[split], bad = _apply_labels(
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


# ---------------------------------------------------------------------------- jsonl


def _read_jsonl(path: Path, root: Path, spec: DatasetSpec, verify: bool, skip: bool) -> _SplitRows:
    """Rows of one jsonl split, the reasons of the rows skipped, and the rows with no modality."""
    out = _SplitRows([], [])
    try:
        size = path.stat().st_size
        progress = Progress(f"reading {path.name}", size, unit="MB", scale=1e6, logger=logger)
        with path.open("rb") as handle:
            for lineno, raw_line in enumerate(handle, start=1):
                progress.update(len(raw_line), status=f"{len(out.rows):,} rows")
                if not raw_line.strip():
                    continue
                uid = f"{path}:{lineno}"
                where = f"{uid} (line {lineno})"
                try:
                    row = _jsonl_row(raw_line, lineno, uid, where, root, spec, verify)
                except DataError as exc:
                    if not skip:
                        raise
                    out.bad.append(str(exc))
                    continue
                if row is None:
                    out.empty += 1
                else:
                    out.rows.append(row)
        progress.close(f"{len(out.rows):,} rows")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    return out


def _jsonl_row(
    raw_line: bytes, lineno: int, uid: str, where: str, root: Path, spec: DatasetSpec, verify: bool
) -> _Raw | None:
    """One parsed row; ``None`` for a row with neither text nor image (skipped, counted)."""
    try:
        line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: not a valid JSON line: {exc}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")

    text = _present_text(_optional(record, "text", str, where) or "")
    features = None
    rel = _optional(record, "img_features", str, where)
    if rel:
        features = os.path.abspath(root / rel)
        if not os.path.isfile(features):
            raise DataError(f"{where}: field 'img_features': feature file {features!r} does not exist")

    # Absent, null or empty 'img': the row has no image (image-missing), unless its features
    # stand in for it. With precomputed features the image file itself is optional (a feature
    # backbone never opens it); a pixel backbone that needs it reports the missing file then.
    image = None
    img = _optional(record, "img", str, where)
    if img:
        image = os.path.abspath(root / img)
        if features is None:
            _check_image_file(image, where, "img", verify)
    if not text and image is None and features is None:
        return None

    if spec.multilabel:
        label_field = next((f for f in spec.jsonl_label_fields if f in record), None)
        if label_field is None:
            accepted = " / ".join(repr(f) for f in spec.jsonl_label_fields)
            raise DataError(f"{where}: missing label field (one of {accepted})")
        value = record[label_field]
        if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
            raise DataError(
                f"{where}: field {label_field!r} must be a list of genre names (non-empty strings), got {value!r}"
            )
        names = tuple(dict.fromkeys(value))
    else:
        label_field = spec.jsonl_label_fields[0]
        value = _field(record, label_field, str, where)
        if not value:
            raise DataError(f"{where}: field {label_field!r} is an empty class name")
        names = (value,)
    return _Raw(text=text, image=image, names=names, uid=uid, image_features=features, where=where)


def _present_text(text: str) -> str:
    """The text itself, or ``""`` when it is only whitespace (the row has no text)."""
    return text if text.strip() else ""


def _optional(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """A field that may be absent or ``null`` (``None`` then); present, it must be of ``kind``."""
    value = record.get(key)
    if value is not None and not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r:.80}")
    return value


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r:.80}")
    return value


def _check_image_file(path: str, where: str, field: str, verify: bool) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{where}: field {field!r}: image file {path!r} does not exist")
    if verify:
        _verify_image(lambda: Image.open(path), f"{where}: field {field!r}: cannot decode image file {path!r}")


def _verify_image(opener: Callable[[], Image.Image], message: str) -> None:
    """Open and decode an image; any failure is a :class:`DataError`.

    PIL's ``verify()`` reads only the headers (a truncated JPEG passes it), so the pixels
    are decoded: JPEGs in draft mode (DCT scaling to at most 1/8 of the size, every
    compressed byte still read), which makes the check several times cheaper than a full
    decode.
    """
    try:
        with opener() as image:
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise DataError(f"{message}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------- arrow


def _open_arrow(path: Path) -> pa.Table:
    """The whole table of an IPC file (the writers use ``RecordBatchFileWriter``); a stream is accepted too."""
    try:
        source = pa.memory_map(str(path), "r")  # buffers of the table keep the mapping alive
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read arrow file {str(path)!r} (expected the pyarrow IPC file format): {exc}") from None


def _read_arrow(
    path: Path, spec: DatasetSpec, class_names: dict[int, str] | None, verify: bool, skip: bool
) -> _SplitRows:
    """Rows of one arrow split, the reasons of the rows skipped, and the rows with no modality."""
    table = _open_arrow(path)
    text_column = spec.arrow_text_column
    required = ["image", text_column, "label"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(
            f"arrow file {str(path)!r} lacks column(s) {', '.join(map(repr, missing))}; "
            f"has {', '.join(map(repr, table.column_names))}"
        )
    images = table.column("image")
    texts = table.column(text_column).to_pylist()
    labels = table.column("label").to_pylist()
    genres = table.column("genres").to_pylist() if spec.multilabel and "genres" in table.column_names else None

    out = _SplitRows([], [])
    progress = Progress(f"reading {path.name}", table.num_rows, unit="rows", logger=logger)
    for i in range(table.num_rows):
        progress.update()
        uid = f"{path}:{i}"
        where = f"{uid} (row {i}, 0-based)"
        try:
            image = _arrow_image(images[i].as_py(), where, verify)
            text = _arrow_text(texts[i], where, text_column)
            if spec.multilabel:
                names = _arrow_genres(labels[i], None if genres is None else genres[i], class_names, where)
            else:
                names = (_arrow_class(labels[i], class_names, where),)
        except DataError as exc:
            if not skip:
                raise
            out.bad.append(str(exc))
            continue
        if not text and image is None:
            out.empty += 1
            continue
        out.rows.append(_Raw(text=text, image=image, names=names, uid=uid, image_features=None, where=where))
    progress.close()
    return out


def _arrow_image(value: Any, where: str, verify: bool) -> bytes | None:
    """Encoded image bytes; ``None`` (the row has no image) for null or empty bytes."""
    if value is None or (isinstance(value, (bytes, bytearray)) and not value):
        return None
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where}: column 'image' must hold encoded image bytes, got {type(value).__name__}")
    data = bytes(value)
    if verify:
        _verify_image(lambda: Image.open(io.BytesIO(data)), f"{where}: column 'image': cannot decode image bytes")
    return data


def _arrow_text(value: Any, where: str, column: str) -> str:
    """The row's text; ``""`` (the row has no text) for null, an empty list or blank strings."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _present_text(value)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return _present_text(" ".join(value))
    raise DataError(f"{where}: column {column!r} must be a list of strings, got {value!r:.80}")


def _arrow_class(value: Any, class_names: dict[int, str] | None, where: str) -> str:
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{where}: column 'label' must be a non-negative int class index, got {value!r:.80}")
    if class_names is None:
        return str(value)
    if value not in class_names:
        raise DataError(f"{where}: column 'label': class index {value} is not in class_idx.json")
    return class_names[value]


def _arrow_genres(value: Any, genres: Any, class_names: dict[int, str] | None, where: str) -> tuple[str, ...]:
    if genres is not None and (not isinstance(genres, list) or not all(isinstance(g, str) for g in genres)):
        raise DataError(f"{where}: column 'genres' must be a list of genre names, got {genres!r:.120}")
    if isinstance(value, int) and not isinstance(value, bool):
        # The reference FedPrime writer: single-genre movies, label = the genre's rank among the
        # split's top 8 (ranked per split), 'genres' kept. The genre's name is the safe key.
        if value < 0:
            raise DataError(f"{where}: column 'label' must be a non-negative int class index, got {value}")
        if genres is not None:
            known = list(dict.fromkeys(g for g in genres if g in MMIMDB_GENRES))
            if len(known) != 1:
                raise DataError(
                    f"{where}: column 'label' is the class index {value} of a single-genre movie, but column "
                    f"'genres' names {len(known)} MM-IMDB genres ({known}); cannot tell which genre it is"
                )
            return (known[0],)
        return (_arrow_class(value, class_names, where),)
    n = len(MMIMDB_GENRES)
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in value)
    ):
        raise DataError(
            f"{where}: column 'label' must be a multi-hot list of {n} ints (0/1) or an int class index, "
            f"got {value!r:.120}"
        )
    names = tuple(g for g, hot in zip(MMIMDB_GENRES, value, strict=True) if hot)
    if genres is not None:
        known = {g for g in genres if g in MMIMDB_GENRES}
        if known != set(names):
            raise DataError(
                f"{where}: column 'label' (multi-hot: {sorted(names)}) disagrees with column 'genres' ({sorted(known)})"
            )
    return names


# ---------------------------------------------------------------------------- labels


def _label_space(train: Sequence[_Raw], num_classes: int, dataset: str) -> tuple[str, ...]:
    """Class names by decreasing train frequency (ties by name), the top ``num_classes`` if > 0."""
    counts = Counter(n for r in train for n in r.names)
    order = sorted(counts, key=lambda c: (-counts[c], c))
    if num_classes > 0:
        if num_classes > len(order):
            logger.warning(
                "%s: num_classes=%d but train has only %d classes; keeping all of them",
                dataset,
                num_classes,
                len(order),
            )
        order = order[:num_classes]
    return tuple(order)


def _single_label(raws: Sequence[_Raw], split: str, spec: DatasetSpec, protocol: str) -> list[_Raw]:
    """The rows a single-label protocol keeps (MM-IMDB paper: the single-genre movies), labelled by their one class."""
    label_of = spec.single_label[protocol]
    kept: list[_Raw] = []
    for r in raws:
        label = label_of(r.names)
        if label is not None:
            kept.append(dataclasses.replace(r, names=(label,)))
    logger.info(f"%s %s: {spec.single_label_log}", spec.name, split, protocol, len(kept), len(raws) - len(kept))
    return kept


def _apply_labels(
    raws: Sequence[_Raw],
    index: dict[str, int],
    seen_in_train: set[str],
    spec: DatasetSpec,
    split: str,
    multilabel: bool,
    strict: bool,
    source: str,
    skip: bool,
) -> tuple[list[Sample], list[str]]:
    """Samples with class indices, and the reasons of rows skipped as bad.

    Rows without a kept class are dropped (and counted in a log line); with ``strict`` (a
    single-label dataset with a given class list) such a row is a bad row instead: an
    error naming it, or skipped with ``skip``.
    """
    samples: list[Sample] = []
    bad: list[str] = []
    dropped = unseen = restricted = 0
    for r in raws:
        kept = sorted(index[n] for n in r.names if n in index)
        if not kept:
            if strict:
                reason = (
                    f"{r.where or r.uid}: class {r.names[0]!r} is not in {source}; add it to the class list "
                    "(the same list at every site and the server) or remove the row"
                )
                if not skip:
                    raise DataError(reason)
                bad.append(reason)
                continue
            dropped += 1
            unseen += any(n not in seen_in_train for n in r.names)
            continue
        if multilabel:
            restricted += len(kept) < len(r.names)
            label: int | tuple[int, ...] = tuple(kept)
        else:
            label = kept[0]
        samples.append(Sample(text=r.text, image=r.image, label=label, uid=r.uid, image_features=r.image_features))
    extra = f"; labels restricted to the kept classes on {restricted}" if multilabel else ""
    # Details for a DEBUG log; a filter that dropped rows is news.
    logger.log(
        logging.INFO if dropped else logging.DEBUG,
        "%s %s: kept %d sample(s), dropped %d by the class filter (%d with a class absent from train)%s",
        *(spec.name, split, len(samples), dropped, unseen, extra),
    )
    return samples, bad

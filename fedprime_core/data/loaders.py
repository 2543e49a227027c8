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
from .records import DataError, DatasetSplits, Sample

logger = logging.getLogger(__name__)

#: The 23 MM-IMDB genres in the order of the multi-hot ``label`` column written by
#: ``vilt/utils/write_mmimdb.py`` (``GENRE_CLASS`` there).
MMIMDB_GENRES: tuple[str, ...] = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music",
    "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)  # fmt: skip

#: Layouts accepted by :func:`load_dataset`.
LAYOUTS: tuple[str, ...] = ("auto", "jsonl", "arrow")

#: How many bad-row reasons a ``skip_bad_rows`` warning quotes.
_REASONS_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What differs between the two datasets."""

    name: str
    multilabel: bool
    text_max_length: int
    jsonl_label_fields: tuple[str, ...]
    arrow_files: tuple[str, str, str]  # train, dev, test file names
    arrow_text_column: str


_SPECS: dict[str, _Spec] = {
    "food101": _Spec(
        name="food101",
        multilabel=False,
        text_max_length=40,
        jsonl_label_fields=("label",),
        arrow_files=("food101_train.arrow", "food101_val.arrow", "food101_test.arrow"),
        arrow_text_column="text",
    ),
    "mmimdb": _Spec(
        name="mmimdb",
        multilabel=True,
        text_max_length=128,
        jsonl_label_fields=("label", "labels", "genres"),
        arrow_files=("mmimdb_train.arrow", "mmimdb_dev.arrow", "mmimdb_test.arrow"),
        arrow_text_column="plots",
    ),
}

_JSONL_FILES = ("train.jsonl", "dev.jsonl", "test.jsonl")
_SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A parsed row before the label space is known: class *names*, not indices."""

    text: str
    image: str | bytes | None
    names: tuple[str, ...]
    uid: str
    image_features: str | None


def load_dataset(
    name: str,
    root: str | Path,
    layout: str = "auto",
    num_classes: int = 0,
    skip_bad_rows: bool = False,
    verify_images: bool = True,
) -> DatasetSplits:
    """Load UPMC Food-101 or MM-IMDB from ``root`` with one label space for all splits.

    Layouts (``root`` is the folder holding the files):

    * ``"jsonl"`` (MMBT style): ``train.jsonl``, ``dev.jsonl`` (optional: an empty dev split
      if absent) and ``test.jsonl``, one JSON object per line (blank lines are ignored) with

      - ``text`` (str): the recipe title (Food-101) or plot (MM-IMDB);
      - ``img`` (str): image path, relative to ``root`` (an absolute path is kept); optional
        when ``img_features`` is given (a feature backbone never opens the image);
      - the label: Food-101 ``label``, a class-name string; MM-IMDB a list of genre-name
        strings in ``label``, or, when ``label`` is absent, ``labels``, or else ``genres``;
      - optional ``img_features`` (str): a ``.npy`` of precomputed image features, relative
        to ``root``, stored as an absolute path in :attr:`Sample.image_features`.

    * ``"arrow"`` (pyarrow IPC file format, as written by the missing-aware-prompts
      ``make_arrow.py``): Food-101 ``food101_train.arrow``, ``food101_val.arrow`` (dev,
      optional), ``food101_test.arrow``; MM-IMDB ``mmimdb_train.arrow``, ``mmimdb_dev.arrow``
      (optional), ``mmimdb_test.arrow``. Columns read:

      - ``image``: the encoded image bytes (kept as ``bytes``);
      - text: Food-101 ``text``, MM-IMDB ``plots``; a list of strings (a plain string is
        accepted too). The reference dataset class turns every list entry into its own
        example; here a row stays one sample and its entries are joined with a space
        (Food-101 rows hold exactly one title, so that is the title itself);
      - ``label``: Food-101 an int class index, named through ``root/class_idx.json``
        (``{"apple_pie": 71, ...}``, the reference mapping) when present, else ``str(index)``;
        a string ``label`` column is taken as the class name. MM-IMDB a multi-hot list of
        the 23 genres of :data:`MMIMDB_GENRES`; when a ``genres`` column is present it must
        agree with the multi-hot (restricted to those 23 genres), else the row is bad.

      Other columns (``image_id``, ``split``) are ignored.

    * ``"auto"``: ``"jsonl"`` if ``root/train.jsonl`` exists, else ``"arrow"`` if
      ``root/<name>_train.arrow`` exists.

    Labels: one mapping from the **train** split, classes ordered by decreasing train
    frequency (number of train samples carrying the class), ties by name. ``num_classes=K>0``
    keeps the K most frequent train classes (the paper uses 8 MM-IMDB genres). Food-101
    samples of another class are dropped from every split; MM-IMDB labels are restricted to
    the kept genres and samples left without any are dropped. A dev/test sample whose class
    never occurs in train is dropped the same way. Kept and dropped counts are logged per
    split. Food-101 labels are ``int``; MM-IMDB labels are sorted ``tuple[int, ...]``.

    Every sample's ``uid`` is ``"<file path>:<row>"``: the 1-based line number for jsonl,
    the 0-based row index for arrow. Samples keep the order of their file.

    Args:
        name: ``"food101"`` or ``"mmimdb"`` (case, ``-`` and ``_`` ignored).
        root: folder holding the dataset files.
        layout: ``"auto"``, ``"jsonl"`` or ``"arrow"``.
        num_classes: keep only the K most frequent train classes; ``0`` keeps all.
        skip_bad_rows: skip unreadable rows (logging how many per split and the first
            reasons) instead of raising.
        verify_images: open every image with PIL and ``verify()`` it (a missing image file
            or feature file is always an error, verified or not).

    Returns:
        The splits, class names, ``multilabel`` (True for MM-IMDB) and the dataset's default
        text length (Food-101 40 tokens, MM-IMDB 128).

    Raises:
        DataError: unknown dataset or layout, missing root or split file, an unreadable
            file, a bad row (invalid JSON, missing or mistyped field, missing or undecodable
            image, missing feature file; unless ``skip_bad_rows``), or an empty train split
            after filtering. The message names the file, the row and the field.
        ValueError: ``num_classes`` is negative.
    """
    spec = _spec(name)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 keeps every class), got {num_classes}")
    root = Path(os.path.abspath(os.fspath(root)))
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(
            f"dataset root {str(root)!r} does not exist or is not a folder; expected it to hold "
            f"{_expected(spec, layout)}"
        )
    if layout == "auto":
        layout = _detect_layout(spec, root)

    read: Callable[[Path], tuple[list[_Raw], list[str]]]
    if layout == "jsonl":
        paths = [root / f for f in _JSONL_FILES]
        read = functools.partial(_read_jsonl, root=root, spec=spec, verify=verify_images, skip=skip_bad_rows)
    else:
        paths = [root / f for f in spec.arrow_files]
        class_names = _food101_class_names(root) if spec.name == "food101" else None
        read = functools.partial(
            _read_arrow, spec=spec, class_names=class_names, verify=verify_images, skip=skip_bad_rows
        )

    raws: dict[str, list[_Raw]] = {}
    for split, path in zip(_SPLITS, paths, strict=True):
        if not path.is_file():
            if split == "dev":
                logger.info("%s: no %s split file %s; the dev split is empty", spec.name, split, path)
                raws[split] = []
                continue
            raise DataError(
                f"{spec.name}: {split} split file {str(path)!r} does not exist; expected {_expected(spec, layout)}"
            )
        rows, bad = read(path)
        if bad:
            shown = " | ".join(bad[:_REASONS_SHOWN])
            logger.warning(
                "%s %s: skipped %d bad row(s) of %s; first reasons: %s", spec.name, split, len(bad), path, shown
            )
        raws[split] = rows

    classes = _label_space(raws["train"], num_classes, spec.name)
    index = {c: i for i, c in enumerate(classes)}
    seen_in_train = {n for r in raws["train"] for n in r.names}
    samples = {split: _apply_labels(raws[split], index, seen_in_train, spec, split) for split in _SPLITS}
    if not samples["train"]:
        raise DataError(
            f"{spec.name}: the train split of {str(paths[0])!r} is empty after filtering "
            f"({len(raws['train'])} readable rows, num_classes={num_classes})"
        )
    return DatasetSplits(
        train=samples["train"],
        dev=samples["dev"],
        test=samples["test"],
        classes=classes,
        multilabel=spec.multilabel,
        text_max_length=spec.text_max_length,
        name=spec.name,
    )


# ---------------------------------------------------------------------------- set-up


def _spec(name: str) -> _Spec:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _SPECS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(_SPECS))}")
    return _SPECS[key]


def _expected(spec: _Spec, layout: str) -> str:
    """Human-readable description of the files a layout needs."""
    jsonl = "train.jsonl, dev.jsonl (optional) and test.jsonl (jsonl layout)"
    train, dev, test = spec.arrow_files
    arrow = f"{train}, {dev} (optional) and {test} (arrow layout)"
    return {"jsonl": jsonl, "arrow": arrow}.get(layout, f"either {jsonl} or {arrow}")


def _detect_layout(spec: _Spec, root: Path) -> str:
    jsonl, arrow = root / _JSONL_FILES[0], root / spec.arrow_files[0]
    if jsonl.is_file():
        found = "jsonl"
    elif arrow.is_file():
        found = "arrow"
    else:
        raise DataError(
            f"cannot detect the layout of {spec.name} in {str(root)!r}: looked for {str(jsonl)!r} (jsonl layout) "
            f"and {str(arrow)!r} (arrow layout), found neither"
        )
    logger.info("%s: detected the %s layout in %s", spec.name, found, root)
    return found


def _food101_class_names(root: Path) -> dict[int, str] | None:
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


def _read_jsonl(path: Path, root: Path, spec: _Spec, verify: bool, skip: bool) -> tuple[list[_Raw], list[str]]:
    """Rows of one jsonl split, and the reasons of the rows skipped."""
    rows: list[_Raw] = []
    bad: list[str] = []
    try:
        size = path.stat().st_size
        progress = Progress(f"reading {path.name}", size, unit="MB", scale=1e6, logger=logger)
        with path.open("rb") as handle:
            for lineno, raw_line in enumerate(handle, start=1):
                progress.update(len(raw_line), status=f"{len(rows):,} rows")
                if not raw_line.strip():
                    continue
                uid = f"{path}:{lineno}"
                where = f"{uid} (line {lineno})"
                try:
                    rows.append(_jsonl_row(raw_line, lineno, uid, where, root, spec, verify))
                except DataError as exc:
                    if not skip:
                        raise
                    bad.append(str(exc))
        progress.close(f"{len(rows):,} rows")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    return rows, bad


def _jsonl_row(raw_line: bytes, lineno: int, uid: str, where: str, root: Path, spec: _Spec, verify: bool) -> _Raw:
    try:
        line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: not a valid JSON line: {exc}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")

    text = _field(record, "text", str, where)
    features = None
    if "img_features" in record:
        rel = _field(record, "img_features", str, where)
        features = os.path.abspath(root / rel)
        if not rel or not os.path.isfile(features):
            raise DataError(f"{where}: field 'img_features': feature file {features!r} does not exist")

    # With precomputed features the image file itself is optional (a feature backbone never
    # opens it); a pixel backbone that needs it reports the missing file when it reads it.
    image = None
    if features is None or "img" in record:
        img = _field(record, "img", str, where)
        if not img:
            raise DataError(f"{where}: field 'img' is empty")
        image = os.path.abspath(root / img)
        if features is None:
            _check_image_file(image, where, "img", verify)

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
        value = _field(record, "label", str, where)
        if not value:
            raise DataError(f"{where}: field 'label' is an empty class name")
        names = (value,)
    return _Raw(text=text, image=image, names=names, uid=uid, image_features=features)


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
    """Open an image and run PIL's ``verify()``; any failure is a :class:`DataError`."""
    try:
        with opener() as image:
            image.verify()
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
    path: Path, spec: _Spec, class_names: dict[int, str] | None, verify: bool, skip: bool
) -> tuple[list[_Raw], list[str]]:
    """Rows of one arrow split, and the reasons of the rows skipped."""
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

    rows: list[_Raw] = []
    bad: list[str] = []
    progress = Progress(f"reading {path.name}", table.num_rows, unit="rows", logger=logger)
    for i in range(table.num_rows):
        progress.update()
        uid = f"{path}:{i}"
        where = f"{uid} (row {i}, 0-based)"
        try:
            image = _arrow_image(images[i].as_py(), where, verify)
            text = _arrow_text(texts[i], where, text_column)
            if spec.multilabel:
                names = _arrow_genres(labels[i], None if genres is None else genres[i], where)
            else:
                names = (_arrow_class(labels[i], class_names, where),)
            rows.append(_Raw(text=text, image=image, names=names, uid=uid, image_features=None))
        except DataError as exc:
            if not skip:
                raise
            bad.append(str(exc))
    progress.close()
    return rows, bad


def _arrow_image(value: Any, where: str, verify: bool) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or not value:
        got = (
            "null"
            if value is None
            else ("empty bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__)
        )
        raise DataError(f"{where}: column 'image' must hold encoded image bytes, got {got}")
    data = bytes(value)
    if verify:
        _verify_image(lambda: Image.open(io.BytesIO(data)), f"{where}: column 'image': cannot decode image bytes")
    return data


def _arrow_text(value: Any, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return " ".join(value)
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


def _arrow_genres(value: Any, genres: Any, where: str) -> tuple[str, ...]:
    n = len(MMIMDB_GENRES)
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in value)
    ):
        raise DataError(f"{where}: column 'label' must be a multi-hot list of {n} ints (0/1), got {value!r:.120}")
    names = tuple(g for g, hot in zip(MMIMDB_GENRES, value, strict=True) if hot)
    if genres is not None:
        if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
            raise DataError(f"{where}: column 'genres' must be a list of genre names, got {genres!r:.120}")
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


def _apply_labels(
    raws: Sequence[_Raw], index: dict[str, int], seen_in_train: set[str], spec: _Spec, split: str
) -> list[Sample]:
    """Samples with class indices; rows without a kept class are dropped (and counted in a log line)."""
    samples: list[Sample] = []
    dropped = unseen = restricted = 0
    for r in raws:
        kept = sorted(index[n] for n in r.names if n in index)
        if not kept:
            dropped += 1
            unseen += any(n not in seen_in_train for n in r.names)
            continue
        if spec.multilabel:
            restricted += len(kept) < len(r.names)
            label: int | tuple[int, ...] = tuple(kept)
        else:
            label = kept[0]
        samples.append(Sample(text=r.text, image=r.image, label=label, uid=r.uid, image_features=r.image_features))
    extra = f"; labels restricted to the kept classes on {restricted}" if spec.multilabel else ""
    logger.info(
        "%s %s: kept %d sample(s), dropped %d by the class filter (%d with a class absent from train)%s",
        *(spec.name, split, len(samples), dropped, unseen, extra),
    )
    return samples

"""The missing-aware-prompts Arrow layout: pyarrow IPC *file* tables with images as encoded bytes.

Written by ``make_arrow.py`` of the missing-aware-prompts code (Lee et al., CVPR 2023;
``vilt/utils/write_food101.py`` and ``vilt/utils/write_mmimdb.py``). :func:`read_arrow` reads
one split table into :class:`~fedprime_core.data.rows.SplitRows`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from ..progress import Progress
from .datasets import DatasetSpec
from .datasets.mmimdb import GENRES as MMIMDB_GENRES
from .records import DataError
from .rows import RawRow, SplitRows, present_text, verify_image

logger = logging.getLogger("fedprime_core.data.loaders")  # the loaders' one logger: the lines users filter on


def open_arrow(path: Path) -> pa.Table:
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


def read_arrow(
    path: Path, spec: DatasetSpec, class_names: dict[int, str] | None, verify: bool, skip: bool
) -> SplitRows:
    """Rows of one arrow split, the reasons of the rows skipped, and the rows with no modality."""
    table = open_arrow(path)
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

    out = SplitRows([], [])
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
        out.rows.append(RawRow(text=text, image=image, names=names, uid=uid, image_features=None, where=where))
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
        verify_image(lambda: Image.open(io.BytesIO(data)), f"{where}: column 'image': cannot decode image bytes")
    return data


def _arrow_text(value: Any, where: str, column: str) -> str:
    """The row's text; ``""`` (the row has no text) for null, an empty list or blank strings."""
    if value is None:
        return ""
    if isinstance(value, str):
        return present_text(value)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return present_text(" ".join(value))
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

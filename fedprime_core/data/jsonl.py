"""The MMBT jsonl layout: train.jsonl / dev.jsonl / test.jsonl, one JSON object per line, images beside them.

:func:`read_jsonl` reads one split file into :class:`~fedprime_core.data.rows.SplitRows`; the
fields each dataset uses come from its :class:`~fedprime_core.data.datasets.DatasetSpec`.
Every unreadable row raises a :class:`~fedprime_core.data.records.DataError` naming the file,
the line and the field (or is skipped and counted, with ``skip``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from ..progress import Progress
from .datasets import DatasetSpec
from .records import DataError
from .rows import RawRow, SplitRows, present_text, verify_image

logger = logging.getLogger("fedprime_core.data.loaders")  # the loaders' one logger: the lines users filter on


def read_jsonl(path: Path, root: Path, spec: DatasetSpec, verify: bool, skip: bool) -> SplitRows:
    """Rows of one jsonl split, the reasons of the rows skipped, and the rows with no modality."""
    out = SplitRows([], [])
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
) -> RawRow | None:
    """One parsed row; ``None`` for a row with neither text nor image (skipped, counted)."""
    try:
        line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: not a valid JSON line: {exc}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")

    text = present_text(_optional(record, "text", str, where) or "")
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
    return RawRow(text=text, image=image, names=names, uid=uid, image_features=features, where=where)


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
        verify_image(lambda: Image.open(path), f"{where}: field {field!r}: cannot decode image file {path!r}")

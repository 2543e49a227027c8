"""A dataset row as a reader parses it, before the label space is known, and the checks every reader shares.

:class:`RawRow` holds class *names*, not indices (:mod:`fedprime_core.data.labels` maps them
once the train split has fixed the label space); :class:`SplitRows` is what reading one split
file gave. Readers: :mod:`fedprime_core.data.jsonl`, :mod:`fedprime_core.data.arrow`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from PIL import Image

from .records import DataError


@dataclasses.dataclass(frozen=True)
class RawRow:
    """A parsed row before the label space is known: class *names*, not indices."""

    text: str
    image: str | bytes | None
    names: tuple[str, ...]
    uid: str
    image_features: str | None
    where: str = ""


@dataclasses.dataclass
class SplitRows:
    """What reading one split file gave: rows, reasons of bad rows, rows with no modality."""

    rows: list[RawRow]
    bad: list[str]
    empty: int = 0


def present_text(text: str) -> str:
    """The text itself, or ``""`` when it is only whitespace (the row has no text)."""
    return text if text.strip() else ""


def verify_image(opener: Callable[[], Image.Image], message: str) -> None:
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

"""Tiny datasets in the documented on-disk layouts (docs/datasets.md), written by the tests.

MMBT-style jsonl with images, the missing-aware-prompts Arrow files, for Food-101 and
MM-IMDB: the loaders' tests and the tests of what reads their output (prepare, real
missingness) build their data here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from fedprime_core.data.datasets.mmimdb import GENRES as MMIMDB_GENRES

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (128, 128, 128)}


def jpeg_bytes(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[colour]).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        (root / "img" / f"{colour}.jpg").write_bytes(jpeg_bytes(colour))
    (root / "img" / "broken.jpg").write_bytes(b"this is not a jpeg")


def write_jsonl(path: Path, rows: list[Any]) -> None:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def food_row(text: str, label: Any, img: str = "img/red.jpg", **extra: Any) -> dict[str, Any]:
    return {"text": text, "img": img, "label": label, **extra}


#: Train counts: pizza 3, apple_pie 2, sushi 2, ramen 1 -> order pizza, apple_pie, sushi, ramen.
FOOD_TRAIN = [
    food_row("pizza one", "pizza"),
    food_row("sushi one", "sushi", "img/green.jpg"),
    food_row("pizza two", "pizza"),
    food_row("apple pie one", "apple_pie", "img/blue.jpg"),
    food_row("ramen one", "ramen", "img/grey.jpg"),
    food_row("sushi two", "sushi", "img/green.jpg"),
    food_row("apple pie two", "apple_pie", "img/blue.jpg"),
    food_row("pizza three", "pizza"),
]
FOOD_DEV = [
    food_row("dev ramen", "ramen", "img/grey.jpg"),
    food_row("dev tacos", "tacos"),
    food_row("dev pizza", "pizza"),
]
FOOD_TEST = [
    food_row("test sushi", "sushi", "img/green.jpg"),
    food_row("test apple", "apple_pie"),
    food_row("t", "tacos"),
]


def make_food_jsonl(root: Path, train=None, dev=None, test=None, with_dev: bool = True) -> Path:
    write_images(root)
    write_jsonl(root / "train.jsonl", FOOD_TRAIN if train is None else train)
    if with_dev:
        write_jsonl(root / "dev.jsonl", FOOD_DEV if dev is None else dev)
    write_jsonl(root / "test.jsonl", FOOD_TEST if test is None else test)
    return root


#: Train genre counts: Drama 4, Comedy 3, Horror 2, Romance 2, Western 1.
IMDB_TRAIN = [
    {"text": "plot a", "img": "img/red.jpg", "label": ["Drama", "Comedy"]},
    {"text": "plot b", "img": "img/green.jpg", "label": ["Drama"]},
    {"text": "plot c", "img": "img/blue.jpg", "labels": ["Horror", "Drama", "Romance"]},
    {"text": "plot d", "img": "img/grey.jpg", "genres": ["Comedy", "Western"]},
    {"text": "plot e", "img": "img/red.jpg", "label": ["Romance", "Comedy", "Horror", "Drama"]},
    {"text": "plot f", "img": "img/red.jpg", "label": ["Western"]},
]
IMDB_DEV = [{"text": "dev", "img": "img/red.jpg", "label": ["Comedy", "News"]}]
IMDB_TEST = [
    {"text": "test a", "img": "img/red.jpg", "label": ["Western", "Horror"]},
    {"text": "test b", "img": "img/red.jpg", "label": ["Western"]},
    {"text": "test c", "img": "img/red.jpg", "label": ["News"]},
]


def make_imdb_jsonl(root: Path) -> Path:
    write_images(root)
    write_jsonl(root / "train.jsonl", IMDB_TRAIN)
    write_jsonl(root / "dev.jsonl", IMDB_DEV)
    write_jsonl(root / "test.jsonl", IMDB_TEST)
    return root


FOOD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("text", pa.list_(pa.string())),
        ("label", pa.int64()),
        ("image_id", pa.string()),
        ("split", pa.string()),
    ]
)
IMDB_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("plots", pa.list_(pa.string())),
        ("label", pa.list_(pa.int64())),
        ("genres", pa.list_(pa.string())),
        ("image_id", pa.string()),
        ("split", pa.string()),
    ]
)


def write_arrow(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """The same IPC *file* format as ``vilt/utils/write_*.py`` (``RecordBatchFileWriter``)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def food_arrow_row(title: str, label: int, colour: str = "red", image: bytes | None = None) -> dict[str, Any]:
    return {
        "image": jpeg_bytes(colour) if image is None else image,
        "text": [title],
        "label": label,
        "image_id": f"c{label}_{title}.jpg",
        "split": "train",
    }


def multi_hot(genres: list[str]) -> list[int]:
    return [1 if g in genres else 0 for g in MMIMDB_GENRES]


def imdb_arrow_row(plots: list[str], genres: list[str], colour: str = "red") -> dict[str, Any]:
    return {
        "image": jpeg_bytes(colour),
        "plots": plots,
        "label": multi_hot(genres),
        "genres": genres,
        "image_id": "0001",
        "split": "train",
    }


def make_food_arrow(root: Path, class_idx: dict[str, int] | None = None, with_dev: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train = [
        food_arrow_row("t0", 5),
        food_arrow_row("t1", 3, "green"),
        food_arrow_row("t2", 5),
        food_arrow_row("t3", 7),
    ]
    write_arrow(root / "food101_train.arrow", train, FOOD_SCHEMA)
    if with_dev:
        write_arrow(root / "food101_val.arrow", [food_arrow_row("v0", 3), food_arrow_row("v1", 9)], FOOD_SCHEMA)
    write_arrow(root / "food101_test.arrow", [food_arrow_row("s0", 7, "blue")], FOOD_SCHEMA)
    if class_idx is not None:
        (root / "class_idx.json").write_text(json.dumps(class_idx), encoding="utf-8")
    return root


def make_imdb_arrow(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train = [
        imdb_arrow_row(["first plot.", "second plot."], ["Drama", "Comedy", "Reality-TV"]),
        imdb_arrow_row(["p2"], ["Drama"], "green"),
        imdb_arrow_row(["p3"], ["Horror", "Drama"]),
        imdb_arrow_row(["p4"], ["Horror"]),
    ]
    write_arrow(root / "mmimdb_train.arrow", train, IMDB_SCHEMA)
    write_arrow(root / "mmimdb_dev.arrow", [imdb_arrow_row(["d"], ["Comedy", "War"])], IMDB_SCHEMA)
    test = [imdb_arrow_row(["s"], ["Horror", "Comedy"]), imdb_arrow_row(["x"], ["War"])]
    write_arrow(root / "mmimdb_test.arrow", test, IMDB_SCHEMA)
    return root

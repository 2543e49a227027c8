"""Tests of :mod:`fedprime_core.data.loaders` on tiny datasets written into ``tmp_path``."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fedprime_core.data.loaders import load_dataset
from fedprime_core.data.records import DataError
from tests.layouts import (
    FOOD_SCHEMA,
    FOOD_TEST,
    FOOD_TRAIN,
    IMDB_SCHEMA,
    IMDB_TRAIN,
    food_arrow_row,
    food_row,
    imdb_arrow_row,
    jpeg_bytes,
    make_food_arrow,
    make_food_jsonl,
    make_imdb_arrow,
    make_imdb_jsonl,
    write_arrow,
    write_jsonl,
)

LOGGER = "fedprime_core.data.loaders"


def load_multilabel_imdb(root, **kwargs):
    """MM-IMDB with every genre, multi-label (the protocol these older tests were written for)."""
    return load_dataset("mmimdb", root, mmimdb_protocol="multilabel", **kwargs)


def names(splits, sample) -> list[str] | str:
    if isinstance(sample.label, int):
        return splits.classes[sample.label]
    return [splits.classes[i] for i in sample.label]


# ----------------------------------------------------------------------------- Food-101, jsonl


def test_food101_jsonl_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_food_jsonl(tmp_path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = load_dataset("food101", root, layout="jsonl")
    assert data.name == "food101" and not data.multilabel and data.text_max_length == 40
    assert data.classes == ("pizza", "apple_pie", "sushi", "ramen")  # by frequency, ties by name
    assert [s.text for s in data.train] == [r["text"] for r in FOOD_TRAIN]
    assert [names(data, s) for s in data.train] == [r["label"] for r in FOOD_TRAIN]
    assert all(isinstance(s.label, int) for s in data.train + data.dev + data.test)
    assert data.train[1].image == str(root / "img" / "green.jpg")
    assert all(Path(s.image).is_absolute() and Path(s.image).is_file() for s in data.train)
    assert data.train[0].uid == f"{root / 'train.jsonl'}:1" and data.train[7].uid == f"{root / 'train.jsonl'}:8"
    assert data.train[0].image_features is None
    # "tacos" never occurs in train: dropped from dev and test, never mislabelled
    assert [s.text for s in data.dev] == ["dev ramen", "dev pizza"]
    assert [names(data, s) for s in data.test] == ["sushi", "apple_pie"]
    assert data.dev[1].uid == f"{root / 'dev.jsonl'}:3"
    assert (
        "food101 dev: kept 2 sample(s), dropped 1 by the class filter (1 with a class absent from train)" in caplog.text
    )


def test_auto_detects_jsonl_and_is_deterministic(tmp_path: Path) -> None:
    root = make_food_jsonl(tmp_path)
    assert load_dataset("food101", root) == load_dataset("Food-101", str(root), layout="jsonl")


def test_dev_jsonl_is_optional(tmp_path: Path) -> None:
    data = load_dataset("food101", make_food_jsonl(tmp_path, with_dev=False))
    assert list(data.dev) == [] and len(data.train) == 8


def test_food101_top_k_classes_shared_by_all_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_food_jsonl(tmp_path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = load_dataset("food101", root, num_classes=2)
    assert data.classes == ("pizza", "apple_pie")  # apple_pie beats sushi (2 each) by name
    assert [names(data, s) for s in data.train] == ["pizza", "pizza", "apple_pie", "apple_pie", "pizza"]
    assert [names(data, s) for s in data.dev] == ["pizza"]
    assert [names(data, s) for s in data.test] == ["apple_pie"]
    assert "food101 train: kept 5 sample(s), dropped 3 by the class filter" in caplog.text
    assert (
        "food101 test: kept 1 sample(s), dropped 2 by the class filter (1 with a class absent from train)"
        in caplog.text
    )


def test_num_classes_larger_than_train_keeps_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load_dataset("food101", make_food_jsonl(tmp_path), num_classes=50)
    assert data.num_classes == 4 and "only 4 classes" in caplog.text


def test_img_features_become_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path
    (root / "feats").mkdir()
    np.save(root / "feats" / "a.npy", np.ones((3, 4), dtype=np.float32))
    train = [food_row("with", "pizza", img_features="feats/a.npy"), food_row("without", "pizza")]
    data = load_dataset("food101", make_food_jsonl(root, train=train, test=train))
    assert data.train[0].image_features == str(root / "feats" / "a.npy")
    assert data.train[1].image_features is None
    from fedprime_core.data.processing import load_features

    assert load_features(data.train[0].image_features, data.train[0].uid).shape == (3, 4)


def test_loaded_path_is_readable_by_open_image(tmp_path: Path) -> None:
    from fedprime_core.data.processing import open_image

    sample = load_dataset("food101", make_food_jsonl(tmp_path)).train[1]
    image = open_image(sample.image, sample.uid)
    assert image.size == (8, 8) and image.mode == "RGB"
    assert image.getpixel((4, 4))[1] > 200  # green


# ----------------------------------------------------------------------------- MM-IMDB, jsonl


def test_mmimdb_jsonl_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = load_multilabel_imdb(make_imdb_jsonl(tmp_path))
    assert data.multilabel and data.text_max_length == 128 and data.name == "mmimdb"
    assert data.classes == ("Drama", "Comedy", "Horror", "Romance", "Western")
    # "label", "labels" and "genres" are all accepted label fields
    assert [sorted(names(data, s)) for s in data.train] == [
        sorted(r.get("label") or r.get("labels") or r["genres"]) for r in IMDB_TRAIN
    ]
    assert all(isinstance(s.label, tuple) and list(s.label) == sorted(s.label) for s in data.train)
    assert data.train[2].label == (0, 2, 3)
    # genres absent from train are removed; a sample left with none is dropped
    assert [names(data, s) for s in data.dev] == [["Comedy"]]
    assert [names(data, s) for s in data.test] == [["Horror", "Western"], ["Western"]]
    assert (
        "mmimdb test: kept 2 sample(s), dropped 1 by the class filter (1 with a class absent from train)" in caplog.text
    )


def test_mmimdb_top_k_restricts_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = load_multilabel_imdb(make_imdb_jsonl(tmp_path), num_classes=3)
    assert data.classes == ("Drama", "Comedy", "Horror")  # Horror beats Romance (2 each) by name
    assert [names(data, s) for s in data.train] == [
        ["Drama", "Comedy"],
        ["Drama"],
        ["Drama", "Horror"],
        ["Comedy"],
        ["Drama", "Comedy", "Horror"],
    ]  # "plot f" (Western only) is dropped
    assert [s.text for s in data.train][-1] == "plot e"
    assert [names(data, s) for s in data.test] == [["Horror"]]
    assert "mmimdb train: kept 5 sample(s), dropped 1 by the class filter" in caplog.text
    assert "labels restricted to the kept classes on 3" in caplog.text


def test_one_label_mapping_even_when_test_frequencies_differ(tmp_path: Path) -> None:
    """The reference code recomputes the top genres per split; here test reuses train's mapping."""
    root = make_imdb_jsonl(tmp_path)
    test = [{"text": "w", "img": "img/red.jpg", "label": ["Western"]}] * 5 + [
        {"text": "d", "img": "img/red.jpg", "label": ["Drama"]}
    ]
    write_jsonl(root / "test.jsonl", test)
    data = load_multilabel_imdb(root)
    assert [names(data, s) for s in data.test] == [["Western"]] * 5 + [["Drama"]]
    assert data.test[-1].label == (data.classes.index("Drama"),) == (0,)


# ----------------------------------------------------------------------------- arrow


def test_food101_arrow_round_trip_without_class_map(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_food_arrow(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):  # loader details are DEBUG lines
        data = load_dataset("food101", root)  # auto -> arrow
    assert "detected the arrow layout" in caplog.text
    assert data.classes == ("5", "3", "7")  # str(index); by frequency then name
    assert [s.text for s in data.train] == ["t0", "t1", "t2", "t3"]
    assert [names(data, s) for s in data.train] == ["5", "3", "5", "7"]
    assert data.train[1].image == jpeg_bytes("green") and isinstance(data.train[0].image, bytes)
    assert data.train[0].uid == f"{root / 'food101_train.arrow'}:0"
    assert [names(data, s) for s in data.dev] == ["3"]  # index 9 absent from train: dropped
    assert data.dev[0].uid.endswith("food101_val.arrow:0")
    assert [names(data, s) for s in data.test] == ["7"]


def test_food101_arrow_uses_class_idx_json(tmp_path: Path) -> None:
    mapping = {"apple_pie": 3, "pizza": 5, "sushi": 7, "tacos": 9}
    data = load_dataset("food101", make_food_arrow(tmp_path, class_idx=mapping), layout="arrow", num_classes=2)
    assert data.classes == ("pizza", "apple_pie")
    assert [names(data, s) for s in data.train] == ["pizza", "apple_pie", "pizza"]
    assert [names(data, s) for s in data.dev] == ["apple_pie"] and list(data.test) == []


def test_food101_arrow_index_missing_from_class_idx(tmp_path: Path) -> None:
    root = make_food_arrow(tmp_path, class_idx={"apple_pie": 3, "pizza": 5})
    with pytest.raises(DataError, match=r"food101_train\.arrow:3 \(row 3.*'label'.*class index 7"):
        load_dataset("food101", root)


def test_arrow_dev_is_optional(tmp_path: Path) -> None:
    data = load_dataset("food101", make_food_arrow(tmp_path, with_dev=False), layout="arrow")
    assert list(data.dev) == [] and len(data.train) == 4


def test_mmimdb_arrow_round_trip(tmp_path: Path) -> None:
    root = make_imdb_arrow(tmp_path)
    data = load_multilabel_imdb(root)
    assert data.multilabel and data.classes == ("Drama", "Horror", "Comedy")
    assert data.train[0].text == "first plot. second plot."  # a row's plots joined, one sample per movie
    assert [names(data, s) for s in data.train] == [["Drama", "Comedy"], ["Drama"], ["Drama", "Horror"], ["Horror"]]
    assert data.train[1].image == jpeg_bytes("green")
    assert [names(data, s) for s in data.dev] == [["Comedy"]]
    assert [names(data, s) for s in data.test] == [["Horror", "Comedy"]]
    assert data.test[0].uid == f"{root / 'mmimdb_test.arrow'}:0"
    top = load_multilabel_imdb(root, layout="arrow", num_classes=1)
    assert top.classes == ("Drama",) and [s.label for s in top.train] == [(0,), (0,), (0,)]


def test_mmimdb_arrow_without_genres_column(tmp_path: Path) -> None:
    schema = pa.schema([f for f in IMDB_SCHEMA if f.name != "genres"])
    rows = [{k: v for k, v in imdb_arrow_row(["p"], ["War", "Drama"]).items() if k != "genres"}]
    for split in ("train", "test"):
        write_arrow(tmp_path / f"mmimdb_{split}.arrow", rows, schema)
    data = load_multilabel_imdb(tmp_path)
    assert data.classes == ("Drama", "War") and data.train[0].label == (0, 1)


# ----------------------------------------------------------------------------- bad input

BAD_JSONL_ROWS = [
    ("{not json", "not a valid JSON line"),
    ('["a", "list"]', "expected a JSON object"),
    ({"text": "t", "img": "img/red.jpg"}, "missing field 'label'"),
    ({"text": 3, "img": "img/red.jpg", "label": "pizza"}, "field 'text' must be str"),
    ({"text": "t", "img": 7, "label": "pizza"}, "field 'img' must be str"),
    ({"text": ["t"], "img": "img/red.jpg", "label": "pizza"}, "field 'text' must be str"),
    ({"text": "t", "img": "img/red.jpg", "label": ["pizza"]}, "field 'label' must be str"),
    ({"text": "t", "img": "img/red.jpg", "label": ""}, "field 'label' is an empty class name"),
    ({"text": "t", "img": "img/nowhere.jpg", "label": "pizza"}, "field 'img': image file .*nowhere.jpg'"),
    ({"text": "t", "img": "img/broken.jpg", "label": "pizza"}, "field 'img': cannot decode image file .*broken.jpg"),
    (
        {"text": "t", "img": "img/red.jpg", "label": "pizza", "img_features": "f/none.npy"},
        "field 'img_features': feature file .*none.npy' does not exist",
    ),
]


@pytest.mark.parametrize(("row", "reason"), BAD_JSONL_ROWS)
def test_bad_jsonl_row_names_file_row_and_field(tmp_path: Path, row: Any, reason: str) -> None:
    root = make_food_jsonl(tmp_path, train=[*FOOD_TRAIN[:2], row, *FOOD_TRAIN[2:]])
    with pytest.raises(DataError, match=rf"train\.jsonl:3 \(line 3\): {reason}"):
        load_dataset("food101", root)


def test_bad_row_in_test_split_is_reported_too(tmp_path: Path) -> None:
    root = make_food_jsonl(tmp_path, test=[FOOD_TEST[0], food_row("t", "pizza", "img/gone.jpg")])
    with pytest.raises(DataError, match=r"test\.jsonl:2 \(line 2\): field 'img': image file .*gone\.jpg"):
        load_dataset("food101", root)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "t", "img": "img/red.jpg"}, "missing label field \\(one of 'label' / 'labels' / 'genres'\\)"),
        ({"text": "t", "img": "img/red.jpg", "label": "Drama"}, "field 'label' must be a list of genre names"),
        ({"text": "t", "img": "img/red.jpg", "genres": ["Drama", 3]}, "field 'genres' must be a list of genre names"),
    ],
)
def test_bad_mmimdb_jsonl_labels(tmp_path: Path, row: dict[str, Any], reason: str) -> None:
    root = make_imdb_jsonl(tmp_path)
    write_jsonl(root / "train.jsonl", [IMDB_TRAIN[0], row])
    with pytest.raises(DataError, match=rf"train\.jsonl:2 \(line 2\): {reason}"):
        load_multilabel_imdb(root)


def test_verify_images_false_skips_decoding_but_not_existence(tmp_path: Path) -> None:
    root = make_food_jsonl(tmp_path, train=[food_row("b", "pizza", "img/broken.jpg")])
    data = load_dataset("food101", root, verify_images=False)
    assert data.train[0].image == str(root / "img" / "broken.jpg")
    write_jsonl(root / "train.jsonl", [food_row("b", "pizza", "img/gone.jpg")])
    with pytest.raises(DataError, match="gone.jpg' does not exist"):
        load_dataset("food101", root, verify_images=False)


def test_skip_bad_rows_jsonl_logs_count_and_reasons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = [FOOD_TRAIN[0], "{broken", food_row("x", "pizza", "img/gone.jpg"), FOOD_TRAIN[1], {"text": "t"}]
    root = make_food_jsonl(tmp_path, train=train, test=[FOOD_TEST[0], food_row("y", "sushi", "img/broken.jpg")])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load_dataset("food101", root, skip_bad_rows=True)
    assert [s.text for s in data.train] == ["pizza one", "sushi one"]
    assert [s.uid.rsplit(":", 1)[1] for s in data.train] == ["1", "4"]
    assert [s.text for s in data.test] == ["test sushi"]
    assert "food101 train: skipped 3 bad row(s)" in caplog.text
    assert "train.jsonl:2 (line 2): not a valid JSON line" in caplog.text
    assert "food101 test: skipped 1 bad row(s)" in caplog.text and "broken.jpg" in caplog.text


BAD_FOOD_ARROW = [
    ({"image": b"\x00garbage"}, "column 'image': cannot decode image bytes"),
    ({"text": ["a", None]}, "column 'text' must be a list of strings"),
    ({"label": None}, "column 'label' must be a non-negative int class index"),
    ({"label": -1}, "column 'label' must be a non-negative int class index"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_FOOD_ARROW)
def test_bad_food101_arrow_row(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    rows = [food_arrow_row("a", 1), {**food_arrow_row("b", 1), **change}]
    write_arrow(tmp_path / "food101_train.arrow", rows, FOOD_SCHEMA)
    write_arrow(tmp_path / "food101_test.arrow", rows[:1], FOOD_SCHEMA)
    with pytest.raises(DataError, match=rf"food101_train\.arrow:1 \(row 1, 0-based\): {reason}"):
        load_dataset("food101", tmp_path)
    data = load_dataset("food101", tmp_path, skip_bad_rows=True)
    assert [s.text for s in data.train] == ["a"]


BAD_IMDB_ARROW = [
    ({"label": [1, 0]}, "column 'label' must be a multi-hot list of 23 ints"),
    ({"label": [2] + [0] * 22}, "column 'label' must be a multi-hot list of 23 ints"),
    ({"genres": ["Comedy"]}, "column 'label' \\(multi-hot: \\['Drama'\\]\\) disagrees with column 'genres'"),
    ({"plots": [None]}, "column 'plots' must be a list of strings"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_IMDB_ARROW)
def test_bad_mmimdb_arrow_row(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    rows = [imdb_arrow_row(["a"], ["Drama"]), {**imdb_arrow_row(["b"], ["Drama"]), **change}]
    write_arrow(tmp_path / "mmimdb_train.arrow", rows, IMDB_SCHEMA)
    write_arrow(tmp_path / "mmimdb_test.arrow", rows[:1], IMDB_SCHEMA)
    with pytest.raises(DataError, match=rf"mmimdb_train\.arrow:1 \(row 1, 0-based\): {reason}"):
        load_multilabel_imdb(tmp_path)


def test_skip_bad_rows_arrow_logs_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [food_arrow_row("a", 1), food_arrow_row("b", 1, image=b"junk"), food_arrow_row("c", 2, image=b"junk")]
    write_arrow(tmp_path / "food101_train.arrow", rows, FOOD_SCHEMA)
    write_arrow(tmp_path / "food101_test.arrow", rows[:1], FOOD_SCHEMA)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load_dataset("food101", tmp_path, skip_bad_rows=True)
    assert [s.uid.rsplit(":", 1)[1] for s in data.train] == ["0"]
    assert "food101 train: skipped 2 bad row(s)" in caplog.text and "food101_train.arrow:2 (row 2" in caplog.text


def test_arrow_missing_column_and_unreadable_file(tmp_path: Path) -> None:
    schema = pa.schema([f for f in FOOD_SCHEMA if f.name != "label"])
    write_arrow(tmp_path / "food101_train.arrow", [{"image": jpeg_bytes(), "text": ["a"]}], schema)
    with pytest.raises(DataError, match=r"food101_train\.arrow' lacks column\(s\) 'label'"):
        load_dataset("food101", tmp_path, skip_bad_rows=True)  # a file-level problem is never skipped
    (tmp_path / "food101_train.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"cannot read arrow file .*food101_train\.arrow"):
        load_dataset("food101", tmp_path)


def test_bad_class_idx_json(tmp_path: Path) -> None:
    root = make_food_arrow(tmp_path)
    (root / "class_idx.json").write_text('{"pizza": "five"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"class_idx\.json' must be a JSON object"):
        load_dataset("food101", root)


# ----------------------------------------------------------------------------- arguments and files


def test_nonexistent_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}' does not exist.*train\.jsonl.*food101_train\.arrow"):
        load_dataset("food101", missing)
    with pytest.raises(DataError, match=r"does not exist.*mmimdb_train\.arrow, mmimdb_dev\.arrow \(optional\)"):
        load_multilabel_imdb(missing, layout="arrow")


def test_unknown_dataset_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar10'; expected one of fashion, food101, mmimdb"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="unknown layout 'csv'"):
        load_dataset("food101", tmp_path, layout="csv")
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        load_dataset("food101", tmp_path, num_classes=-1)


def test_auto_detection_failure_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"looked for .*train\.jsonl.*mmimdb_train\.arrow"):
        load_multilabel_imdb(tmp_path)


def test_missing_split_files(tmp_path: Path) -> None:
    root = make_food_jsonl(tmp_path)
    (root / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"test split file .*test\.jsonl' does not exist"):
        load_dataset("food101", root)
    # A folder with no file of the layout asked for: every file that layout needs is named.
    with pytest.raises(DataError, match=r"holds no split file; expected food101_train\.arrow, .* \(arrow layout\)"):
        load_dataset("food101", root, layout="arrow")
    (root / "food101_test.arrow").write_bytes(b"")  # one file of the layout, but not train
    with pytest.raises(DataError, match=r"train split file .*food101_train\.arrow' does not exist"):
        load_dataset("food101", root, layout="arrow")


def test_empty_train_after_filtering(tmp_path: Path) -> None:
    root = make_food_jsonl(tmp_path, train=["{bad"])
    with pytest.raises(DataError, match=r"train split of .*train\.jsonl' is empty after filtering"):
        load_dataset("food101", root, skip_bad_rows=True)
    for split in ("train", "dev", "test"):  # an MM-IMDB sample without any genre is dropped
        write_jsonl(root / f"{split}.jsonl", [{"text": "t", "img": "img/red.jpg", "label": []}])
    with pytest.raises(DataError, match="is empty after filtering"):
        load_multilabel_imdb(root)


def test_arrow_stream_format_is_accepted_too(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([food_arrow_row("a", 1), food_arrow_row("b", 2)], schema=FOOD_SCHEMA)
    for split in ("train", "test"):
        path = tmp_path / f"food101_{split}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    data = load_dataset("food101", tmp_path, layout="arrow")
    assert [s.text for s in data.train] == ["a", "b"] and data.classes == ("1", "2")


def test_jsonl_rows_with_precomputed_features_need_no_image_file(tmp_path):
    """A feature backbone never opens the image, so feature-only datasets load."""
    (tmp_path / "features").mkdir()
    rows = []
    for i, label in enumerate(["apple_pie", "sushi", "apple_pie", "sushi"]):
        np.save(tmp_path / "features" / f"{i}.npy", np.full((1, 4), i, dtype=np.float32))
        row = {"text": f"recipe {i}", "label": label, "img_features": f"features/{i}.npy"}
        if i % 2:
            row["img"] = f"images/absent_{i}.jpg"  # listed but not on disk
        rows.append(row)
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset("food101", tmp_path)
    assert len(data.train) == 4
    assert data.train[0].image is None and data.train[1].image.endswith("absent_1.jpg")
    assert data.train[2].image_features.endswith("2.npy")
    bad = dict(rows[0], img_features="features/none.npy")
    (tmp_path / "train.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="train.jsonl:1.*img_features.*does not exist"):
        load_dataset("food101", tmp_path)


def truncated_jpeg() -> bytes:
    """A real photo-sized JPEG cut short: its header is intact, so PIL's ``verify()`` accepts it."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) * 2 // 3]


def test_a_truncated_jpeg_is_caught_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_food_jsonl(tmp_path, train=[FOOD_TRAIN[0], food_row("cut", "pizza", "img/cut.jpg"), FOOD_TRAIN[1]])
    (root / "img" / "cut.jpg").write_bytes(truncated_jpeg())
    with Image.open(root / "img" / "cut.jpg") as image:
        image.verify()  # the header check alone passes: the old loader let this file through
    with pytest.raises(DataError, match=r"train\.jsonl:2 \(line 2\): field 'img': cannot decode image file .*cut\.jpg"):
        load_dataset("food101", root)
    caplog.set_level(logging.INFO)
    data = load_dataset("food101", root, skip_bad_rows=True)
    assert [s.text for s in data.train] == [FOOD_TRAIN[0]["text"], FOOD_TRAIN[1]["text"]]
    assert "cut.jpg" in caplog.text


def test_a_truncated_jpeg_in_arrow_is_caught_at_load(tmp_path: Path) -> None:
    root = make_food_arrow(tmp_path)
    rows = [food_arrow_row("t0", 5), food_arrow_row("cut", 3, image=truncated_jpeg())]
    write_arrow(root / "food101_train.arrow", rows, FOOD_SCHEMA)
    with pytest.raises(DataError, match=r"food101_train\.arrow:1 \(row 1, 0-based\): column 'image': cannot decode"):
        load_dataset("food101", root)
    assert [s.text for s in load_dataset("food101", root, skip_bad_rows=True).train] == ["t0"]

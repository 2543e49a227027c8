"""Modalities that are really missing in the data, class lists, and the MM-IMDB paper protocol.

Loader behaviour on tiny files written into ``tmp_path`` (both layouts), and how a real
missing pattern reaches the model: exactly as a simulated one does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fedprime_core.data.loaders import load_dataset, read_class_list
from fedprime_core.data.missing import apply_missing, missing_counts
from fedprime_core.data.records import DataError, Pattern, Sample
from tests.layouts import (
    FOOD_SCHEMA,
    IMDB_SCHEMA,
    food_arrow_row,
    imdb_arrow_row,
    write_arrow,
    write_images,
    write_jsonl,
)

LOGGER = "fedprime_core.data.loaders"


def patterns_of(samples) -> list[int]:
    return [int(s.natural_pattern) for s in samples]


# ----------------------------------------------------------------------------- jsonl

JSONL_ROWS = [
    {"text": "complete", "img": "img/red.jpg", "label": "pizza"},
    {"img": "img/red.jpg", "label": "pizza"},  # text absent
    {"text": None, "img": "img/green.jpg", "label": "sushi"},  # text null
    {"text": "", "img": "img/green.jpg", "label": "sushi"},  # text empty
    {"text": "   ", "img": "img/blue.jpg", "label": "pizza"},  # text blank
    {"text": "no image field", "label": "pizza"},  # img absent
    {"text": "null image", "img": None, "label": "sushi"},  # img null
    {"text": "empty image", "img": "", "label": "sushi"},  # img empty
    {"label": "pizza"},  # neither: skipped
    {"text": "", "img": None, "label": "sushi"},  # neither: skipped
    {"text": "last", "img": "img/grey.jpg", "label": "pizza"},
]


def make_site(root: Path, rows=JSONL_ROWS, classes: str | None = None, test=None) -> Path:
    write_images(root)
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", test if test is not None else rows[:1])
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def test_jsonl_rows_without_image_or_text_are_samples_and_without_both_are_skipped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load_dataset("food101", make_site(tmp_path))
    T, M, C = Pattern.TEXT_MISSING, Pattern.IMAGE_MISSING, Pattern.COMPLETE  # M: image missing
    assert patterns_of(data.train) == [C, T, T, T, T, M, M, M, C]
    assert [s.uid.rsplit(":", 1)[1] for s in data.train] == ["1", "2", "3", "4", "5", "6", "7", "8", "11"]
    assert data.train[1].text == "" and data.train[4].text == ""  # blank text is no text
    assert data.train[5].image is None and data.train[5].text == "no image field"
    assert data.skipped_empty == {"train": 2, "test": 0}
    assert "food101 train: skipped 2 row(s) of" in caplog.text and "neither text nor image" in caplog.text


def test_a_named_image_that_does_not_exist_is_still_an_error(tmp_path):
    root = make_site(tmp_path, rows=[*JSONL_ROWS[:2], {"text": "t", "img": "img/gone.jpg", "label": "pizza"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3 \(line 3\): field 'img': image file .*gone\.jpg' does not"):
        load_dataset("food101", root)
    with pytest.raises(DataError, match=r"train\.jsonl:2 \(line 2\): field 'text' must be str"):
        load_dataset("food101", make_site(tmp_path, rows=[JSONL_ROWS[0], {"text": 5, "label": "pizza"}]))


def test_feature_rows_without_image_are_image_missing_only_without_features(tmp_path):
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "a.npy", np.ones((1, 3), dtype=np.float32))
    rows = [
        {"text": "features only", "img_features": "f/a.npy", "label": "pizza"},
        {"text": "nothing", "img_features": None, "label": "pizza"},
        {"img_features": "f/a.npy", "label": "pizza"},
    ]
    data = load_dataset("food101", make_site(tmp_path, rows=rows))
    assert patterns_of(data.train) == [Pattern.COMPLETE, Pattern.IMAGE_MISSING, Pattern.TEXT_MISSING]


# ----------------------------------------------------------------------------- arrow


def test_arrow_rows_without_image_or_text_are_samples_and_without_both_are_skipped(tmp_path, caplog):
    rows = [
        food_arrow_row("complete", 1),
        {**food_arrow_row("null image", 1), "image": None},
        {**food_arrow_row("empty image", 2), "image": b""},
        {**food_arrow_row("x", 2), "text": None},
        {**food_arrow_row("x", 1), "text": []},
        {**food_arrow_row("x", 1), "text": ["", " "]},
        {**food_arrow_row("x", 2), "text": None, "image": None},  # neither: skipped
        food_arrow_row("last", 2),
    ]
    write_arrow(tmp_path / "food101_train.arrow", rows, FOOD_SCHEMA)
    write_arrow(tmp_path / "food101_test.arrow", rows[:1], FOOD_SCHEMA)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load_dataset("food101", tmp_path)
    T, M, C = Pattern.TEXT_MISSING, Pattern.IMAGE_MISSING, Pattern.COMPLETE  # M: image missing
    assert patterns_of(data.train) == [C, M, M, T, T, T, C]
    assert data.train[1].image is None and data.train[1].text == "null image"
    assert data.skipped_empty["train"] == 1 and "skipped 1 row(s)" in caplog.text
    bad = [food_arrow_row("a", 1), {**food_arrow_row("b", 1), "image": b"\x00garbage"}]
    write_arrow(tmp_path / "food101_train.arrow", bad, FOOD_SCHEMA)
    with pytest.raises(DataError, match=r"food101_train\.arrow:1 .*cannot decode image bytes"):
        load_dataset("food101", tmp_path)  # bytes that are no image stay an error


def test_mmimdb_arrow_rows_without_plots_or_poster(tmp_path):
    rows = [
        imdb_arrow_row(["plot"], ["Drama"]),
        {**imdb_arrow_row(["plot"], ["Drama"]), "image": None},
        {**imdb_arrow_row([], ["Comedy"])},
        {**imdb_arrow_row([], ["Comedy"]), "image": b""},
    ]
    for split in ("train", "test"):
        write_arrow(tmp_path / f"mmimdb_{split}.arrow", rows, IMDB_SCHEMA)
    data = load_dataset("mmimdb", tmp_path, mmimdb_protocol="multilabel")
    assert patterns_of(data.train) == [Pattern.COMPLETE, Pattern.IMAGE_MISSING, Pattern.TEXT_MISSING]
    assert data.skipped_empty == {"train": 1, "test": 1}


# ----------------------------------------------------------------------------- integer labels

INT_IMDB_SCHEMA = pa.schema([f if f.name != "label" else pa.field("label", pa.int64()) for f in IMDB_SCHEMA])


def int_imdb_row(index: int, genres: list[str], plot: str = "p") -> dict:
    return {**imdb_arrow_row([plot], genres), "label": index}


def test_mmimdb_arrow_with_integer_class_index_takes_the_genre_from_the_genres_column(tmp_path):
    # As the reference writer does: index = rank among the split's top 8, so it differs by split.
    train = [int_imdb_row(0, ["Drama"]), int_imdb_row(1, ["Comedy", "News"]), int_imdb_row(0, ["Drama"])]
    test = [int_imdb_row(0, ["Comedy"]), int_imdb_row(1, ["Drama"])]
    write_arrow(tmp_path / "mmimdb_train.arrow", train, INT_IMDB_SCHEMA)
    write_arrow(tmp_path / "mmimdb_test.arrow", test, INT_IMDB_SCHEMA)
    data = load_dataset("mmimdb", tmp_path)
    assert data.classes == ("Drama", "Comedy") and not data.multilabel and data.headline_metric == "macro_f1"
    assert [s.label for s in data.train] == [0, 1, 0]
    assert [data.classes[s.label] for s in data.test] == ["Comedy", "Drama"]  # by genre, not by the index
    multilabel = load_dataset("mmimdb", tmp_path, mmimdb_protocol="multilabel")
    assert multilabel.multilabel and [s.label for s in multilabel.test] == [(1,), (0,)]
    write_arrow(tmp_path / "mmimdb_train.arrow", [int_imdb_row(0, ["Drama", "Comedy"])], INT_IMDB_SCHEMA)
    with pytest.raises(DataError, match=r"mmimdb_train\.arrow:0 .*class index 0 .*names 2 MM-IMDB genres"):
        load_dataset("mmimdb", tmp_path)


def test_integer_class_index_without_genres_uses_class_idx_json(tmp_path):
    schema = pa.schema([f for f in INT_IMDB_SCHEMA if f.name != "genres"])
    rows = [{k: v for k, v in int_imdb_row(i, ["Drama"]).items() if k != "genres"} for i in (3, 5, 3)]
    for split in ("train", "test"):
        write_arrow(tmp_path / f"mmimdb_{split}.arrow", rows, schema)
    assert load_dataset("mmimdb", tmp_path).classes == ("3", "5")
    (tmp_path / "class_idx.json").write_text(json.dumps({"Horror": 3, "War": 5}))
    data = load_dataset("mmimdb", tmp_path)
    assert data.classes == ("Horror", "War") and [s.label for s in data.train] == [0, 1, 0]


# ----------------------------------------------------------------------------- MM-IMDB paper protocol

# Nine genres in train; single-genre train counts: Drama 5, Comedy 4, Thriller 3, Horror 3,
# Action 2, Romance 2, Crime 2, Documentary 1, Western 1 (Western loses the tie for 8th to
# Documentary by name). Test: Western is frequent there, but the top 8 come from train only.
PAPER_TRAIN = (
    [["Drama"]] * 5
    + [["Comedy"]] * 4
    + [["Thriller"]] * 3
    + [["Horror"]] * 3
    + [["Action"]] * 2
    + [["Romance"]] * 2
    + [["Crime"]] * 2
    + [["Documentary"], ["Western"]]
    + [["Drama", "Comedy"], ["Horror", "Thriller", "Action"], ["Western", "Drama"]]  # several genres: dropped
    + [["Drama", "News"]]  # News is not one of the 23 MM-IMDB genres: a single-genre Drama movie
)
PAPER_TEST = [["Western"]] * 4 + [["Drama"], ["Comedy", "Drama"], ["Documentary"]]


def test_paper_protocol_keeps_single_genre_movies_of_the_top_8_train_genres(tmp_path, caplog):
    write_images(tmp_path)
    rows = [{"text": f"plot {i}", "img": "img/red.jpg", "label": g} for i, g in enumerate(PAPER_TRAIN)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "img": "img/red.jpg", "label": g} for g in PAPER_TEST])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = load_dataset("mmimdb", tmp_path)
    top8 = ("Drama", "Comedy", "Horror", "Thriller", "Action", "Crime", "Romance", "Documentary")
    assert data.classes == top8
    assert not data.multilabel and data.headline_metric == "macro_f1"
    assert all(isinstance(s.label, int) for s in data.train)
    texts = [s.text for s in data.train]
    assert len(data.train) == 23 and "plot 26" in texts  # 5+4+3+3+2+2+2+1 single-genre + the Drama/News one
    assert not {"plot 23", "plot 24", "plot 25"} & set(texts)  # multi-genre movies are dropped
    assert "plot 22" not in texts  # the single-genre Western: not a top-8 train genre
    assert [data.classes[s.label] for s in data.test] == ["Drama", "Documentary"]  # 4 Westerns, 1 multi dropped
    assert "mmimdb train: paper protocol kept 24 single-genre movie(s), dropped 3" in caplog.text
    assert load_dataset("mmimdb", tmp_path, num_classes=2).classes == ("Drama", "Comedy")
    full = load_dataset("mmimdb", tmp_path, mmimdb_protocol="multilabel")
    assert full.multilabel and len(full.train) == len(PAPER_TRAIN) and "Western" in full.classes


# ----------------------------------------------------------------------------- class lists

SITE_ROWS = [
    {"text": "a", "img": "img/red.jpg", "label": "sushi"},
    {"text": "b", "img": "img/red.jpg", "label": "pizza"},
]


def test_classes_txt_is_the_label_mapping_whatever_the_site_holds(tmp_path):
    root = make_site(tmp_path, rows=SITE_ROWS, classes="# shared by every site\nramen\npizza\n\nsushi\n")
    data = load_dataset("food101", root)
    assert data.classes == ("ramen", "pizza", "sushi")  # the list's order, not this site's frequencies
    assert [s.label for s in data.train] == [2, 1]
    assert load_dataset("food101", root, classes=["ramen", "pizza", "sushi"]).classes == data.classes
    with pytest.raises(DataError, match=r"class list of the run config .* differs from .*classes\.txt"):
        load_dataset("food101", root, classes=["pizza", "ramen", "sushi"])
    with pytest.raises(ValueError, match="num_classes=2 disagrees with the 3 classes"):
        load_dataset("food101", root, num_classes=2)


def test_a_site_row_with_an_unknown_class_is_an_error_naming_the_row(tmp_path):
    root = make_site(tmp_path, rows=[*SITE_ROWS, {"text": "c", "img": "img/red.jpg", "label": "tacos"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3 \(line 3\): class 'tacos' is not in the run config's"):
        load_dataset("food101", root, classes=["pizza", "sushi"])
    (root / "classes.txt").write_text("pizza\nsushi\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3 .*class 'tacos' is not in '.*classes\.txt'"):
        load_dataset("food101", root)
    data = load_dataset("food101", root, skip_bad_rows=True)
    assert [s.text for s in data.train] == ["a", "b"]


def test_a_class_list_lets_a_folder_without_train_load_and_selects_mmimdb_genres(tmp_path):
    write_images(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t", "img": "img/red.jpg", "label": ["War", "Drama"]}])
    with pytest.raises(DataError, match="no train rows to derive the class list from"):
        load_dataset("mmimdb", tmp_path, required=("test",))
    (tmp_path / "classes.txt").write_text("Drama\nComedy\n")
    data = load_dataset("mmimdb", tmp_path, required=("test",), mmimdb_protocol="multilabel")
    assert list(data.train) == [] and data.classes == ("Drama", "Comedy") and data.test[0].label == (0,)
    with pytest.raises(DataError, match=r"train split file .*train\.jsonl' does not exist"):
        load_dataset("mmimdb", tmp_path)


def test_class_list_file_errors(tmp_path):
    (tmp_path / "a.txt").write_text("pizza\nsushi\npizza\n")
    with pytest.raises(DataError, match=r"a\.txt', line 3: class 'pizza' is listed twice"):
        read_class_list(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no class"):
        read_class_list(tmp_path / "b.txt")


# ----------------------------------------------------------------------------- to the model


@pytest.mark.parametrize("method", ["fedavg-p", "fedprime"])
def test_real_missing_patterns_reach_the_model_exactly_like_simulated_ones(tiny_vilt, method):
    """A row without text (image) gives the model the same batch, and the same logits, as a
    complete row whose text (image) the simulation removed: missing_type, empty text, all-ones image."""
    import torch

    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor
    from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, collate
    from fedprime_core.method.methods import method_spec
    from fedprime_core.method.model import PromptedModel, PromptSettings

    backbone, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 12)
    image = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    complete = Sample(text="apple cinnamon pie", image=image, label=0, uid="c")
    no_text = Sample(text="", image=image, label=0, uid="t")
    no_image = Sample(text="apple cinnamon pie", image=None, label=0, uid="i")
    real = MultimodalDataset([no_text, no_image], np.zeros(2), processor, num_classes=3)  # assigned: complete
    simulated = MultimodalDataset([complete, complete], np.array([1, 2]), processor, num_classes=3)
    assert real.patterns.tolist() == [Pattern.TEXT_MISSING, Pattern.IMAGE_MISSING]
    a, b = collate([real[0], real[1]]), collate([simulated[0], simulated[1]])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["missing_type"].tolist() == [1, 2] and a["pixel_values"][1].eq(1.0).all()
    model = PromptedModel(backbone, method_spec(method), 3, PromptSettings(tau=4, kappa=2), seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(a).logits, model(b).logits, rtol=0, atol=1e-6)


def test_simulation_applies_only_to_complete_rows_and_counts_both_parts():
    samples = [Sample(text="" if i < 10 else "x", image=None if 10 <= i < 25 else "p", label=0) for i in range(100)]
    rng = np.random.default_rng(0)
    patterns, natural = apply_missing(samples, np.array([0.5, 0.3, 0.2]), rng)
    assert (patterns[:10] == Pattern.TEXT_MISSING).all() and (patterns[10:25] == Pattern.IMAGE_MISSING).all()
    counts = missing_counts(patterns, natural)
    # 75 complete rows: exactly 0.3 * 75 = 22.5 -> 22 or 23 text-missing, 15 image-missing.
    assert counts["real-text-missing"] == 10 and counts["real-image-missing"] == 15
    assert counts["simulated-text-missing"] in (22, 23) and counts["simulated-image-missing"] == 15
    assert counts["complete"] + counts["text-missing"] + counts["image-missing"] == 100
    none, _ = apply_missing(samples, np.array([1.0, 0.0, 0.0]), rng)
    assert (none == natural).all()  # missing-setting "none": the data as it is
    plain = [Sample(text="x", image="p", label=0)] * 50
    from fedprime_core.data.missing import sample_patterns

    mixture = np.array([0.3, 0.35, 0.35])
    patterns, _ = apply_missing(plain, mixture, np.random.default_rng(7))
    assert patterns.tolist() == sample_patterns(50, mixture, np.random.default_rng(7)).tolist()  # as before

"""``python -m fedprime_core.data.prepare``: site folders that round-trip to the input rows."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedprime_core.data.loaders import load_dataset, read_class_list
from fedprime_core.data.prepare import SplitSettings, export_embedded, main, split_dataset
from fedprime_core.data.records import DataError, Pattern
from tests.layouts import write_arrow

TABLE = {0: [0.2, 0.8, 0.0], 1: [0.3, 0.1, 0.6], 2: [0.5, 0.25, 0.25]}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def foodtoy(tmp_path_factory) -> Path:
    """The embedded dataset on disk, with some rows that really miss text or image."""
    root = export_embedded(tmp_path_factory.mktemp("foodtoy") / "data", seed=3, num_train=240, num_dev=24, num_test=40)
    rows = rows_of(root / "train.jsonl")
    for i, row in enumerate(rows):
        if i % 20 == 1:
            row.pop("text")
        elif i % 20 == 2:
            row["img"] = None
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_table(path: Path) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in TABLE.items()))
    return path


def test_split_round_trip_union_of_sites_is_the_input_and_mixtures_follow_the_table(foodtoy, tmp_path, capsys):
    out = tmp_path / "sites"
    args = ["split", "--dataset-dir", str(foodtoy), "--num-sites", "3", "--out", str(out)]
    args += ["--label-alpha", "0.5", "--missing-table", str(write_table(tmp_path / "t.yaml")), "--seed", "5"]
    assert main(args) == 0
    assert "site-2" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    source = {f"train.jsonl:{i}": row for i, row in enumerate(rows_of(foodtoy / "train.jsonl"), start=1)}
    classes = read_class_list(foodtoy / "classes.txt")
    assert read_class_list(out / "classes.txt") == classes

    seen: list[str] = []
    for index, site in enumerate(manifest["sites"]):
        folder = out / site["folder"]
        assert sorted(p.name for p in folder.iterdir()) == ["classes.txt", "images", "train.jsonl"]
        assert read_class_list(folder / "classes.txt") == classes
        written = rows_of(folder / "train.jsonl")
        seen += [row["source"] for row in written]
        real = Counter()
        for row in written:
            original = source[row["source"]]
            assert row["label"] == original["label"]
            had_text, had_image = "text" in original, bool(original.get("img"))
            real["text"] += not had_text
            real["image"] += not had_image
            if "text" in row:
                assert row["text"] == original["text"]
            if "img" in row:  # the very same image, copied into the site's own folder
                assert (folder / row["img"]).read_bytes() == (foodtoy / original["img"]).read_bytes()
            assert ("text" in row) or ("img" in row)
            if not had_text:
                assert "text" not in row and "img" in row  # a row that lacked its text keeps its image
            if not had_image:
                assert "img" not in row and "text" in row
        images = {p.relative_to(folder).as_posix() for p in (folder / "images").rglob("*.png")}
        assert images == {row["img"] for row in written if "img" in row}  # no image of a row that misses it
        # The file's patterns are what the loader finds, and what the manifest reports.
        data = load_dataset("food101", folder, required=("train",))
        patterns = Counter(int(s.natural_pattern) for s in data.train)
        assert patterns[Pattern.TEXT_MISSING] == site["text-missing"]
        assert patterns[Pattern.IMAGE_MISSING] == site["image-missing"]
        assert data.classes == classes and len(data.train) == site["rows"] == len(written)
        assert site["real-text-missing"] == real["text"] and site["real-image-missing"] == real["image"]
        # The table's mixture, realised exactly on the complete rows (largest-remainder rounding).
        complete_rows = site["rows"] - real["text"] - real["image"]
        expected = np.array(TABLE[index]) * complete_rows
        simulated = np.array(
            [site["complete"], site["simulated-text-missing"], site["simulated-image-missing"]], dtype=float
        )
        assert np.all(np.abs(simulated - expected) <= 1.0), (site, expected)
        assert site["mixture"] == TABLE[index]
    assert sorted(seen) == sorted(source)  # every input row at exactly one site

    server = out / "server"
    assert [r["source"] for r in rows_of(server / "test.jsonl")] == [f"test.jsonl:{i}" for i in range(1, 41)]
    assert [r["source"] for r in rows_of(server / "dev.jsonl")] == [f"dev.jsonl:{i}" for i in range(1, 25)]
    held_out = load_dataset("food101", server, required=("test",))
    original = load_dataset("food101", foodtoy)
    assert [(s.text, s.label) for s in held_out.test] == [(s.text, s.label) for s in original.test]
    assert not (server / "train.jsonl").exists()


def test_label_skew_gives_sites_different_label_subsets(foodtoy, tmp_path):
    data = load_dataset("food101", foodtoy)
    iid = split_dataset(data, foodtoy, tmp_path / "iid", SplitSettings(num_sites=3, seed=1))
    skew = split_dataset(data, foodtoy, tmp_path / "skew", SplitSettings(num_sites=3, label_alpha=0.1, seed=1))

    def spread(manifest) -> float:
        shares = [np.array([s["classes"].get(c, 0) for c in data.classes]) / s["rows"] for s in manifest["sites"]]
        return float(np.mean([np.abs(a - b).sum() for a in shares for b in shares]))

    assert spread(skew) > 2 * spread(iid)
    # missing-setting "none" (the default): the rows are written as they are
    for site in iid["sites"]:
        assert site["simulated-text-missing"] == site["simulated-image-missing"] == 0
    # and the same settings give the same folders
    again = split_dataset(data, foodtoy, tmp_path / "again", SplitSettings(num_sites=3, label_alpha=0.1, seed=1))
    assert again["sites"] == skew["sites"]
    for name in ("site-0", "site-1", "site-2"):
        assert (tmp_path / "again" / name / "train.jsonl").read_text() == (
            tmp_path / "skew" / name / "train.jsonl"
        ).read_text()


def test_arrow_input_with_hardlinks_refused_output_and_too_many_sites(tmp_path):
    from tests.layouts import FOOD_SCHEMA, food_arrow_row

    rows = [food_arrow_row(f"t{i}", i % 2, ("red", "green")[i % 2]) for i in range(12)]
    rows[3] = {**rows[3], "image": None}
    write_arrow(tmp_path / "food101_train.arrow", rows, FOOD_SCHEMA)
    write_arrow(tmp_path / "food101_test.arrow", rows[:4], FOOD_SCHEMA)
    data = load_dataset("food101", tmp_path)
    out = tmp_path / "out"
    manifest = split_dataset(data, tmp_path, out, SplitSettings(num_sites=2, min_site_size=2, hardlink=True))
    assert sum(s["rows"] for s in manifest["sites"]) == 12
    assert sum(s["real-image-missing"] for s in manifest["sites"]) == 1  # the row without image bytes
    site = load_dataset("food101", out / "site-0", required=("train",))
    assert {s.text for s in site.train} <= {f"t{i}" for i in range(12)}
    assert all(isinstance(s.image, str) and s.image.endswith(".jpg") for s in site.train if s.image is not None)
    assert load_dataset("food101", out / "server", required=("test",)).classes == data.classes
    with pytest.raises(DataError, match="is not empty; choose another or pass --force"):
        split_dataset(data, tmp_path, out, SplitSettings(num_sites=2, min_site_size=2))
    with pytest.raises(DataError, match="cannot split 12 train rows into 5 sites"):
        split_dataset(data, tmp_path, tmp_path / "o2", SplitSettings(num_sites=5, min_site_size=10))
    assert main(["split", "--dataset-dir", str(tmp_path / "none"), "--num-sites", "2", "--out", str(out)]) == 2


def test_hardlinked_images_share_the_input_file(foodtoy, tmp_path):
    data = load_dataset("food101", foodtoy)
    split_dataset(data, foodtoy, tmp_path / "o", SplitSettings(num_sites=2, hardlink=True, seed=0))
    row = next(r for r in rows_of(tmp_path / "o" / "site-0" / "train.jsonl") if "img" in r)
    assert os.path.samefile(tmp_path / "o" / "site-0" / row["img"], foodtoy / row["img"])


def test_mmimdb_sites_keep_the_protocol(tmp_path):
    from tests.layouts import IMDB_SCHEMA, imdb_arrow_row

    genres = [["Drama"], ["Comedy"], ["Drama", "Comedy"], ["Horror"], ["Drama"], ["Comedy"]] * 4
    rows = [imdb_arrow_row([f"p{i}"], g) for i, g in enumerate(genres)]
    write_arrow(tmp_path / "mmimdb_train.arrow", rows, IMDB_SCHEMA)
    write_arrow(tmp_path / "mmimdb_test.arrow", rows[:6], IMDB_SCHEMA)
    data = load_dataset("mmimdb", tmp_path)  # paper: single-genre movies only
    assert len(data.train) == 20
    split_dataset(data, tmp_path, tmp_path / "o", SplitSettings(num_sites=2, min_site_size=2))
    sites = [load_dataset("mmimdb", tmp_path / "o" / f"site-{i}", required=("train",)) for i in range(2)]
    assert sum(len(s.train) for s in sites) == 20 and all(s.classes == data.classes for s in sites)
    assert all(isinstance(s.label, int) for site in sites for s in site.train)

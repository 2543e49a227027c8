"""Build the ``fashion`` benchmark: product photographs and product names, article type as the label.

The source is a snapshot of a public repository (never downloaded by this module, never
committed to this one): ``tanmay0401/multimodal-recommendation-engine`` at commit
:data:`SOURCE_COMMIT`, whose ``data/products.parquet`` names 44,072 products of the
"Fashion Product Images (Small)" catalogue (Myntra products, published on Kaggle by Param
Aggarwal) and whose ``data/images/<product_id>.jpg`` holds each product's 60 x 80 photograph.
See ``docs/datasets/fashion.md`` for the source, its licence and how to obtain it::

    python -m fedprime_core.tools.build_fashion build --source <checkout> --out /data/fashion
    python -m fedprime_core.tools.build_fashion verify --out /data/fashion

``--source`` is a checkout of that commit (or any folder holding its ``data/products.parquet``
and ``data/images/``). Every input read is checksummed first and compared with
``--expect``: ``pinned`` (default) the checksums of that commit (:data:`PINNED_INPUTS`);
a ``manifest.json`` of an earlier build (its inputs, to the single image); or ``none``.
What the build writes (the MMBT jsonl layout of :func:`fedprime_core.data.loaders.load_dataset`)::

    <out>/train.jsonl, dev.jsonl, test.jsonl   {"id", "text", "img", "label"} per product
    <out>/classes.txt                          the article types, label i = line i
    <out>/images/<product_id>.jpg              the photographs of the kept products (copied)
    <out>/features/efficientnet-lite0-cls-pad/images/<product_id>.npy   (unless --features none)
    <out>/manifest.json                        source, task, counts, and the sha256 of every
                                               input read and every file written

The task (fixed before any model saw the data): text = the product's display name, image =
its photograph, label = its article type; only article types with at least
``--min-class-size`` (500) products in the snapshot are kept (23 types, 34,667 products).
Split: products with the same display name (normalised) form a group, and a group goes
to test, dev or train by a hash of its name (:func:`split_of`): deterministic, independent
of row order, and no name is in two splits. Image features: the frozen EfficientNet-Lite0
of :mod:`fedprime_core.tools.features`, each photograph padded to a square first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..data.loaders import CLASSES_FILE, write_class_list
from ..data.records import DataError

LOGGER = logging.getLogger(__name__)

SOURCE_REPOSITORY = "tanmay0401/multimodal-recommendation-engine"
SOURCE_COMMIT = "a86a10b3b5cc961819c7912124d0a86fe64c6f67"
PRODUCTS_FILE = "data/products.parquet"
IMAGES_DIR = "data/images"
MANIFEST = "manifest.json"
SPLIT_FILES = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
#: Mixed into the split hash; changing it would give another split.
SPLIT_SALT = "fedprime-fashion-split-v1"
DESCRIPTION_FIELDS = ("masterCategory", "subCategory", "articleType", "baseColour", "usage")

#: The checksums of the inputs at :data:`SOURCE_COMMIT`: the products table, and the image
#: set (every image the table names) as a file count and a digest (:func:`tree_digest`).
PINNED_INPUTS: dict[str, Any] = {
    "products": {"path": PRODUCTS_FILE, "sha256": "cc5c29444a9a23fbe738c3b85390309a561b3a8e903349fb616b662b0390d478"},
    "images": {
        "path": IMAGES_DIR,
        "files": 44072,
        "digest": "8196f794a90ef4aa75a79b107a7291d674a2fcb3b8f3da86333f1566c26c1227",
    },
}


# ---------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(hashes: dict[str, str]) -> str:
    """One sha256 over a set of files: of the sorted ``"<relative path> <sha256>\\n"`` lines."""
    lines = "".join(f"{name} {hashes[name]}\n" for name in sorted(hashes))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _tree(root: Path, relative: Sequence[str]) -> dict[str, str]:
    return {name: sha256_file(root / name) for name in relative}


# ---------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------
def read_products(source: Path) -> list[dict[str, str]]:
    """The products of the snapshot, by increasing numeric id: id, title and the five categories.

    Raises:
        DataError: the table is missing or unreadable, lacks a column, repeats an id, or a
            description does not hold the five categories; the message names the row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = source / PRODUCTS_FILE
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} does not exist: --source must be a checkout of {SOURCE_REPOSITORY} "
            f"(commit {SOURCE_COMMIT[:8]}) holding {PRODUCTS_FILE} and {IMAGES_DIR}/"
        )
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {str(path)!r} as parquet: {exc}") from None
    missing = [c for c in ("product_id", "title", "description") if c not in table.column_names]
    if missing:
        raise DataError(f"{str(path)!r} lacks column(s) {', '.join(missing)}; has {', '.join(table.column_names)}")
    products, seen = [], set()
    for row, record in enumerate(table.select(["product_id", "title", "description"]).to_pylist()):
        pid, title, description = (str(record[k] or "").strip() for k in ("product_id", "title", "description"))
        where = f"{str(path)!r} row {row} (0-based)"
        if not pid.isdigit():
            raise DataError(f"{where}: product_id {pid!r} is not a number")
        if pid in seen:
            raise DataError(f"{where}: product_id {pid} is given twice")
        seen.add(pid)
        parts = [p.strip() for p in description.split(" - ")]
        if len(parts) != len(DESCRIPTION_FIELDS) or not all(parts):
            raise DataError(f"{where}: description {description!r} is not 'master - sub - article - colour - usage'")
        products.append({"id": pid, "title": title, **dict(zip(DESCRIPTION_FIELDS, parts, strict=True))})
    products.sort(key=lambda p: int(p["id"]))
    return products


def image_name(product_id: str) -> str:
    """The image of a product, relative to the source's image folder and to the output folder."""
    return f"{product_id}.jpg"


def checksum_inputs(source: Path, products: list[dict[str, str]]) -> dict[str, Any]:
    """sha256 of the products table and of every image it names (a missing image is an error)."""
    images = source / IMAGES_DIR
    absent = [p["id"] for p in products if not (images / image_name(p["id"])).is_file()]
    if absent:
        raise DataError(
            f"{len(absent)} product(s) of {PRODUCTS_FILE} have no image in {str(images)!r} "
            f"(first: {image_name(absent[0])}); the snapshot is incomplete: fetch commit {SOURCE_COMMIT[:8]} again"
        )
    hashes = _tree(images, [image_name(p["id"]) for p in products])
    return {
        "products": {"path": PRODUCTS_FILE, "sha256": sha256_file(source / PRODUCTS_FILE)},
        "images": {"path": IMAGES_DIR, "files": len(hashes), "digest": tree_digest(hashes), "sha256": hashes},
    }


def check_inputs(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Compare the inputs' checksums with what was expected (``where`` names the expectation).

    Raises:
        DataError: naming the file that differs (or, against a bare digest, the image set).
    """
    want, got = expected["products"]["sha256"], found["products"]["sha256"]
    if want != got:
        raise DataError(
            f"{PRODUCTS_FILE} has sha256 {got}, but {where} expects {want}: the source is not the snapshot "
            "expected, or the file was altered; fetch it again (or give --expect none to build from it anyway)"
        )
    per_file = expected["images"].get("sha256")
    if per_file is not None:
        changed = sorted(n for n in found["images"]["sha256"] if per_file.get(n) != found["images"]["sha256"][n])
        extra = sorted(set(per_file) - set(found["images"]["sha256"]))
        if changed or extra:
            first = (changed or extra)[0]
            raise DataError(
                f"{IMAGES_DIR}/{first} differs from {where} ({len(changed)} image(s) with another sha256, "
                f"{len(extra)} expected but not named by the table): the file was altered or the snapshot is "
                "another; fetch it again (or give --expect none)"
            )
    if (found["images"]["files"], found["images"]["digest"]) != (
        expected["images"]["files"],
        expected["images"]["digest"],
    ):
        raise DataError(
            f"the {found['images']['files']} images under {IMAGES_DIR}/ have digest {found['images']['digest']}, but "
            f"{where} expects {expected['images']['files']} images with digest {expected['images']['digest']}: an "
            "image was altered, or the snapshot is not the commit expected; fetch it again (or give --expect none)"
        )


def expected_inputs(expect: str) -> tuple[dict[str, Any] | None, str]:
    """``pinned``, ``none`` or the path of an earlier build's manifest -> (checksums, description)."""
    if expect == "pinned":
        return PINNED_INPUTS, f"the pinned checksums of commit {SOURCE_COMMIT[:8]}"
    if expect == "none":
        return None, "nothing"
    path = Path(expect)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return manifest["inputs"], f"the manifest {str(path)!r}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"--expect {expect!r}: not 'pinned', 'none' or a readable manifest.json of an earlier build ({exc})"
        ) from None


# ---------------------------------------------------------------------------------------
# The task and the split
# ---------------------------------------------------------------------------------------
def group_key(title: str) -> str:
    """The name that groups products for the split: lower case, single spaces."""
    return re.sub(r"\s+", " ", title.strip().lower())


def split_of(title: str, test_fraction: float, dev_fraction: float) -> str:
    """``"test"``, ``"dev"`` or ``"train"`` for a product, from a hash of its normalised name.

    The hash is uniform on [0, 1): below ``test_fraction`` is test, below
    ``test_fraction + dev_fraction`` dev, the rest train. It depends on the name only, so
    equal names share a split and the split does not change with row order.
    """
    digest = hashlib.sha256(f"{SPLIT_SALT}:{group_key(title)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + dev_fraction:
        return "dev"
    return "train"


def kept_classes(products: list[dict[str, str]], min_class_size: int) -> list[str]:
    """Article types with at least ``min_class_size`` products, alphabetically (the label order)."""
    counts = Counter(p["articleType"] for p in products)
    return sorted(c for c, n in counts.items() if n >= min_class_size)


# ---------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------
def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DataError(f"cannot decode image {str(path)!r}: {type(exc).__name__}: {exc}") from None


def _prepare_out(out: Path, inputs: dict[str, Any], task: dict[str, Any]) -> None:
    """Empty ``out`` for a build; an earlier build's ``features/`` is kept when its inputs and task were the same.

    Feature files are named after the product and the encoder, so those of an earlier,
    interrupted build of the same snapshot and task stay valid and are not computed again.
    """
    if out.exists() and any(out.iterdir()):
        manifest = out / MANIFEST
        if not manifest.is_file():
            raise DataError(
                f"--out {str(out)!r} exists and is not empty, and holds no {MANIFEST} of an earlier build: "
                "give an empty or new folder"
            )
        try:
            earlier = json.loads(manifest.read_text(encoding="utf-8"))
            same = _digest_of(earlier["inputs"]) == _digest_of(inputs) and earlier["task"] == task
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        for entry in out.iterdir():  # an earlier build of this tool: rebuilt
            if entry.name == "features" and same:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _digest_of(inputs: dict[str, Any]) -> tuple[str, int, str]:
    return inputs["products"]["sha256"], inputs["images"]["files"], inputs["images"]["digest"]


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def build(
    source: str | Path,
    out: str | Path,
    expect: str = "pinned",
    min_class_size: int = 500,
    test_fraction: float = 0.2,
    dev_fraction: float = 0.05,
    encoder: Any = None,
    fit: str = "pad",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the dataset from a snapshot; returns the manifest (also written to ``<out>/manifest.json``).

    Args:
        source: checkout of :data:`SOURCE_REPOSITORY` (holding ``data/products.parquet`` and ``data/images/``).
        out: output folder (new, empty, or an earlier build of this tool, which is replaced).
        expect: ``"pinned"``, ``"none"`` or the path of an earlier build's ``manifest.json``.
        min_class_size: keep article types with at least this many products in the snapshot.
        test_fraction, dev_fraction: shares of the name groups in test and dev (the rest is train).
        encoder: a :class:`fedprime_core.tools.features.ImageEncoder` for the image features, or
            ``None`` for none.
        fit: how images meet the encoder (``"pad"`` or ``"crop"``, see :mod:`fedprime_core.tools.features`).

    Raises:
        DataError: missing source or file, checksums that differ from ``expect``, an
            undecodable image, an output folder that is not ours, or a task left with no class.
        ValueError: fractions outside (0, 1) or summing to 1 or more, ``min_class_size`` < 1.
    """
    if not 0 < test_fraction < 1 or not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise ValueError(
            f"need 0 < test_fraction < 1, 0 <= dev_fraction < 1 and a sum below 1; got {test_fraction}, {dev_fraction}"
        )
    if min_class_size < 1:
        raise ValueError(f"min_class_size must be at least 1, got {min_class_size}")
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not source.is_dir():
        raise DataError(
            f"--source {str(source)!r} does not exist or is not a folder; give a checkout of {SOURCE_REPOSITORY} "
            f"at commit {SOURCE_COMMIT[:8]} (docs/datasets/fashion.md says how to obtain it)"
        )
    expected, where = expected_inputs(expect)
    products = read_products(source)
    inputs = checksum_inputs(source, products)
    if expected is not None:
        check_inputs(inputs, expected, where)
    classes = kept_classes(products, min_class_size)
    if not classes:
        raise DataError(f"no article type has {min_class_size} or more products; lower --min-class-size")
    kept = [p for p in products if p["articleType"] in set(classes)]
    for p in kept:
        _check_image(source / IMAGES_DIR / image_name(p["id"]))

    task = {
        "text": "productDisplayName (the parquet's 'title')",
        "image": "the product photograph, data/images/<product_id>.jpg",
        "label": "articleType (third field of the parquet's 'description')",
        "min_class_size": min_class_size,
        "split": {"test_fraction": test_fraction, "dev_fraction": dev_fraction, "salt": SPLIT_SALT},
    }
    _prepare_out(out, inputs, task)
    (out / "images").mkdir()
    rows: dict[str, list[dict[str, str]]] = {split: [] for split in SPLIT_FILES}
    for p in kept:
        shutil.copyfile(source / IMAGES_DIR / image_name(p["id"]), out / "images" / image_name(p["id"]))
        # An empty name would be a text-missing sample (the loaders' convention); the snapshot has none.
        row = {"id": p["id"], "text": p["title"], "img": f"images/{image_name(p['id'])}", "label": p["articleType"]}
        rows[split_of(p["title"], test_fraction, dev_fraction)].append(row)
    for split, name in SPLIT_FILES.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split])
        atomic_write_bytes(out / name, text.encode("utf-8"))
    write_class_list(out / CLASSES_FILE, classes)
    manifest: dict[str, Any] = {
        "dataset": "fashion",
        "source": {"repository": SOURCE_REPOSITORY, "commit": SOURCE_COMMIT, "path": str(source)},
        "task": task,
        "classes": classes,
        "rows": {split: len(rows[split]) for split in SPLIT_FILES},
        "dropped": {"products of smaller article types": len(products) - len(kept)},
        "counts": {split: dict(sorted(Counter(r["label"] for r in rows[split]).items())) for split in SPLIT_FILES},
        "features": None,
        "inputs": inputs,
        "outputs": None,  # written last: a build interrupted during its features has none (verify refuses it)
    }
    _write_manifest(out, manifest)

    if encoder is not None:
        from .features import precompute_features

        # test first: a build interrupted here (and resumed by running it again) has its fixed
        # evaluation set complete soonest
        summary = precompute_features(out, ["test", "dev", "train"], encoder, batch_size, progress=progress, fit=fit)
        manifest["features"] = {
            "encoder": encoder.description,
            "fit": fit,
            "folder": Path(summary["folder"]).relative_to(out).as_posix(),
            "shape": list(summary.get("shape", ())),
            "computed": summary["computed"],
            "kept from an earlier build": summary["skipped"],
        }
    manifest["outputs"] = output_checksums(out)
    _write_manifest(out, manifest)
    return manifest


def output_checksums(out: Path) -> dict[str, Any]:
    """sha256 of the split files and class list, digests of the image and feature folders."""
    result: dict[str, Any] = {}
    for name in (*SPLIT_FILES.values(), CLASSES_FILE):
        result[name] = sha256_file(out / name)
    for folder in ("images", "features"):
        if (out / folder).is_dir():
            files = sorted(p.relative_to(out).as_posix() for p in (out / folder).rglob("*") if p.is_file())
            result[folder + "/"] = {"files": len(files), "digest": tree_digest(_tree(out, files))}
    return result


def verify(out: str | Path) -> dict[str, Any]:
    """Recompute the output checksums of a build and compare them with its manifest.

    Raises:
        DataError: no manifest, or a file or folder whose checksum differs (named).
    """
    out = Path(out).expanduser().resolve()
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        recorded = manifest["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the build manifest {str(path)!r}: {exc}") from None
    if recorded is None:
        raise DataError(
            f"the build in {str(out)!r} did not finish (it was interrupted while computing image features); "
            "run the same build command again: it resumes"
        )
    found = output_checksums(out)
    for name, want in recorded.items():
        got = found.get(name)
        if got != want:
            raise DataError(
                f"{str(out)!r}/{name} differs from what the build wrote (recorded {want}, found {got}): "
                "a file was changed, added or removed since; rebuild the dataset"
            )
    return manifest


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.build_fashion",
        description="Build the fashion benchmark (product photo + name -> article type) from a snapshot.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="build the dataset from a snapshot")
    make.add_argument("--source", required=True, help=f"checkout of {SOURCE_REPOSITORY} at {SOURCE_COMMIT[:8]}")
    make.add_argument("--out", required=True, help="output folder (new, empty, or an earlier build: replaced)")
    make.add_argument(
        "--expect",
        default="pinned",
        help="input checksums to require: pinned (default), none, or an earlier build's manifest.json",
    )
    make.add_argument("--min-class-size", type=int, default=500, help="keep article types with this many products")
    make.add_argument("--test-fraction", type=float, default=0.2)
    make.add_argument("--dev-fraction", type=float, default=0.05)
    make.add_argument(
        "--features",
        default="efficientnet-lite0",
        help="image encoder for the features (see fedprime_core.tools.features), or none",
    )
    make.add_argument("--fit", default="pad", choices=("pad", "crop"), help="pad (default) or crop")
    make.add_argument("--pool", default="cls", choices=("cls", "mean", "grid"))
    make.add_argument("--batch-size", type=int, default=64)
    make.add_argument("--device", default="cpu")
    make.add_argument("--no-progress", action="store_true")
    check = commands.add_parser("verify", help="check a built dataset against its manifest")
    check.add_argument("--out", required=True, help="the built dataset folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "verify":
            manifest = verify(args.out)
            print(
                f"{args.out}: every file matches its manifest "
                f"({', '.join(f'{k} {v}' for k, v in manifest['rows'].items())} rows)"
            )
            return 0
        encoder = None
        if args.features != "none":
            from .features import keep_freed_memory, load_image_encoder

            keep_freed_memory()  # the feature pass page-faults its activations in again otherwise
            encoder = load_image_encoder(args.features, args.pool, args.device)
        manifest = build(
            args.source,
            args.out,
            expect=args.expect,
            min_class_size=args.min_class_size,
            test_fraction=args.test_fraction,
            dev_fraction=args.dev_fraction,
            encoder=encoder,
            fit=args.fit,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (DataError, OSError, ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = manifest["rows"]
    print(
        f"wrote {args.out}: {len(manifest['classes'])} classes, train {rows['train']}, dev {rows['dev']}, "
        f"test {rows['test']} rows"
        + (
            f"; features {manifest['features']['shape']} in {manifest['features']['folder']}"
            if manifest["features"]
            else ""
        )
        + f"; inputs products.parquet {manifest['inputs']['products']['sha256'][:12]}, "
        f"{manifest['inputs']['images']['files']} images digest {manifest['inputs']['images']['digest'][:12]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

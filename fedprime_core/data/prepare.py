"""Turn one dataset into per-site folders, as real sites would hold their data.

Like ``flwr-datasets create`` does for Flower's datasets, ``split`` writes one folder per
site in the jsonl layout, plus the server's held-out folder, so that every SuperNode (or
container) gets only its own data::

    python -m fedprime_core.data.prepare split --dataset food101 --dataset-dir /data/food101 \
        --num-sites 3 --out /data/sites --label-alpha 0.5 --missing-table sites.yaml

    /data/sites/
      classes.txt        the federation's class list, one name per line (label i = line i)
      manifest.json      what went where: per site its rows, classes, mixture, pattern counts
      site-0/            train.jsonl, classes.txt, images/... (only the images of its rows)
      site-1/ ...
      server/            dev.jsonl (when the input has one), test.jsonl, classes.txt, images/...

The train rows are split across sites by label (IID, or Dirichlet ``--label-alpha`` skew);
each site's missing-modality mixture (``--missing-table``, or ``--missing-setting`` /
``--eta`` / ``--missing-alpha`` as in a run) is applied **to the files**: a row drawn as
text-missing is written without its text, an image-missing one without its image (its
image is not copied either), so a site holds exactly what a real incomplete site would.
Rows that already miss a modality in the input keep it; the mixture applies to the
complete ones. The server's folder holds the input's dev and test splits as they are (the
server simulates its test settings itself). Every row keeps a ``source`` field naming
the input file and row it came from.

``export-embedded`` writes the generated embedded dataset (FoodToy) to disk in the same
jsonl layout, a real on-disk dataset for demos and tests (read it with
``dataset="food101"``)::

    python -m fedprime_core.data.prepare export-embedded --out /tmp/foodtoy
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datasets import dataset
from .loaders import CLASSES_FILE, load_dataset, write_class_list
from .missing import PATTERN_NAMES, Pattern, apply_missing, client_mixtures, load_missing_table, missing_counts
from .partition import partition
from .records import DataError, DatasetSplits, Sample, primary_labels

SERVER_FOLDER = "server"
MANIFEST = "manifest.json"
# Purposes mixed into the seed, so each kind of draw is independent of the others.
_SEED_PARTITION, _SEED_MIXTURE, _SEED_PATTERNS = 101, 102, 103


def site_name(index: int) -> str:
    """Folder name (and suggested ``client-id``) of site ``index`` (0-based)."""
    return f"site-{index}"


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """How :func:`split_dataset` splits a dataset into sites.

    Attributes:
        num_sites: number of site folders.
        label_alpha: Dirichlet label skew across sites; 0 is IID (per-label even split).
        min_site_size: fewest train rows a site may get.
        missing_table: YAML table of per-site mixtures (keys 0..num_sites-1 or ``default``),
            as the run config's ``missing-table``; overrides the three below.
        missing_setting, eta, missing_alpha: the per-site mixtures otherwise, as in a run
            (``"none"``: the rows are written as they are).
        seed: seed of the label split and the missing draws.
        hardlink: hard-link image files into the site folders instead of copying them
            (same file system; falls back to a copy).
    """

    num_sites: int
    label_alpha: float = 0.0
    min_site_size: int = 10
    missing_table: str = ""
    missing_setting: str = "none"
    eta: float = 0.7
    missing_alpha: float = 1.0
    seed: int = 42
    hardlink: bool = False


def site_mixtures(settings: SplitSettings) -> np.ndarray:
    """Each site's missing mixture, ``(num_sites, 3)``."""
    if settings.missing_table:
        return load_missing_table(settings.missing_table, settings.num_sites)
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, _SEED_MIXTURE]))
    return client_mixtures(settings.num_sites, settings.missing_setting, settings.eta, settings.missing_alpha, rng)


class _FolderWriter:
    """Writes jsonl rows into one output folder, copying the files they name into it."""

    def __init__(self, folder: Path, source_root: Path, classes: Sequence[str], list_labels: bool, hardlink: bool):
        self.folder = folder
        self.source_root = source_root
        self.resolved_root = source_root.resolve()
        self.classes = classes
        self.list_labels = list_labels  # MM-IMDB's jsonl labels are lists of genres, single-genre or not
        self.hardlink = hardlink
        self.written: dict[str, str] = {}  # source key -> relative path in the folder
        folder.mkdir(parents=True, exist_ok=False)

    def _relative(self, path: str, fallback: str) -> str:
        try:
            rel = Path(path).resolve().relative_to(self.resolved_root)
        except ValueError:  # a file outside the dataset root: keep it apart, by a stable name
            rel = Path("external") / fallback
        return rel.as_posix()

    def _place(self, key: str, rel: str, write) -> str:
        if key not in self.written:
            target = self.folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
            self.written[key] = rel
        return self.written[key]

    def _copy(self, path: str, fallback: str) -> str:
        def write(target: Path) -> None:
            if self.hardlink:
                try:
                    os.link(path, target)
                    return
                except OSError:
                    pass
            shutil.copyfile(path, target)

        return self._place(f"file:{path}", self._relative(path, fallback), write)

    def image(self, sample: Sample, split: str, row: int) -> str:
        image = sample.image
        if isinstance(image, str):
            return self._copy(image, f"{split}-{row}{Path(image).suffix}")
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
            try:
                ext = (Image.open(io.BytesIO(data)).format or "img").lower().replace("jpeg", "jpg")
            except Exception as exc:  # noqa: BLE001 - PIL raises many types
                raise DataError(f"{sample.uid}: cannot read image bytes: {exc}") from None
            return self._place(f"row:{sample.uid}", f"images/{split}/{row:06d}.{ext}", lambda t: t.write_bytes(data))
        if isinstance(image, np.ndarray):
            array = np.ascontiguousarray(image)
            return self._place(
                f"row:{sample.uid}", f"images/{split}/{row:06d}.png", lambda t: Image.fromarray(array).save(t)
            )
        raise DataError(f"{sample.uid}: cannot write an image of type {type(image).__name__}")

    def features(self, sample: Sample, split: str, row: int) -> str | None:
        features = sample.image_features
        if features is None:
            return None
        if isinstance(features, str):
            return self._copy(features, f"{split}-{row}.npy")
        array = np.asarray(features)
        return self._place(f"feat:{sample.uid}", f"features/{split}/{row:06d}.npy", lambda t: np.save(t, array))

    def label(self, label: int | tuple[int, ...]) -> str | list[str]:
        if isinstance(label, tuple) or self.list_labels:
            indices = label if isinstance(label, tuple) else (label,)
            return [self.classes[i] for i in indices]
        return self.classes[label]

    def write(self, name: str, samples: Sequence[Sample], patterns: np.ndarray | None = None, split: str = "") -> None:
        """``name`` (e.g. ``train.jsonl``): one row per sample, without the modality its pattern drops."""
        split = split or name.split(".")[0]
        lines = []
        for row, sample in enumerate(samples):
            pattern = Pattern.COMPLETE if patterns is None else int(patterns[row])
            record: dict[str, Any] = {}
            if sample.text and pattern != Pattern.TEXT_MISSING:
                record["text"] = sample.text
            if pattern != Pattern.IMAGE_MISSING:
                # A listed image that is not on disk is allowed only next to its features.
                absent = isinstance(sample.image, str) and sample.image_features is not None
                if sample.image is not None and not (absent and not os.path.isfile(sample.image)):
                    record["img"] = self.image(sample, split, row)
                features = self.features(sample, split, row)
                if features is not None:
                    record["img_features"] = features
            record["label"] = self.label(sample.label)
            record["source"] = _source(sample.uid, self.source_root)
            lines.append(json.dumps(record, ensure_ascii=False))
        (self.folder / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        write_class_list(self.folder / CLASSES_FILE, self.classes)


def _source(uid: str, root: Path) -> str:
    """``<file relative to the dataset root>:<row>`` of a loaded sample's uid."""
    path, _, row = uid.rpartition(":")
    try:
        path = Path(path).relative_to(root).as_posix()
    except ValueError:
        pass
    return f"{path}:{row}"


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(f"output folder {str(out)!r} is not empty; choose another or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def split_dataset(
    splits: DatasetSplits, source_root: str | Path, out: str | Path, settings: SplitSettings, force: bool = False
) -> dict[str, Any]:
    """Write ``settings.num_sites`` site folders and the server's folder under ``out``.

    Args:
        splits: the loaded dataset (train rows go to the sites, dev and test to the server).
        source_root: the folder the dataset was read from (image paths are kept relative to it).
        out: the output folder (must be empty, or ``force``).
        settings: label skew, missing mixtures, seed.
        force: replace a non-empty ``out``.

    Returns:
        The manifest (also written to ``out/manifest.json``): classes, settings, and per site
        its folder, row count, class counts, mixture and realised pattern counts (real and
        simulated, :func:`~fedprime_core.data.missing.missing_counts`).

    Raises:
        DataError: too few train rows for the sites, an unreadable image, a bad table.
    """
    out = Path(out)
    root = Path(os.path.abspath(source_root))
    train = list(splits.train)
    try:
        parts = partition(
            primary_labels(train),
            settings.num_sites,
            settings.label_alpha,
            settings.min_site_size,
            int(np.random.SeedSequence([settings.seed, _SEED_PARTITION]).generate_state(1)[0]),
        )
    except ValueError as exc:
        raise DataError(f"cannot split {len(train)} train rows into {settings.num_sites} sites: {exc}") from None
    mixtures = site_mixtures(settings)
    list_labels = dataset(splits.name).multilabel
    _prepare_out(out, force)
    write_class_list(out / CLASSES_FILE, splits.classes)

    sites = []
    for index, indices in enumerate(parts):
        samples = [train[i] for i in indices]
        rng = np.random.default_rng(np.random.SeedSequence([settings.seed, _SEED_PATTERNS, index]))
        patterns, natural = apply_missing(samples, mixtures[index], rng)
        name = site_name(index)
        writer = _FolderWriter(out / name, root, splits.classes, list_labels, settings.hardlink)
        writer.write("train.jsonl", samples, patterns, split="train")
        labels = Counter(
            splits.classes[i] for s in samples for i in (s.label if isinstance(s.label, tuple) else (s.label,))
        )
        sites.append(
            {
                "folder": name,
                "client-id": name,
                "rows": len(samples),
                "classes": dict(sorted(labels.items())),
                "mixture": [round(float(x), 6) for x in mixtures[index]],
                **missing_counts(patterns, natural),
            }
        )

    server = _FolderWriter(out / SERVER_FOLDER, root, splits.classes, list_labels, settings.hardlink)
    if splits.dev:
        server.write("dev.jsonl", splits.dev)
    server.write("test.jsonl", splits.test)
    manifest = {
        "dataset": splits.name,
        "source": str(root),
        "classes": list(splits.classes),
        "multilabel": splits.multilabel,
        "settings": dataclasses.asdict(settings),
        "skipped-no-modality": dict(splits.skipped_empty),
        "sites": sites,
        "server": {"folder": SERVER_FOLDER, "dev": len(splits.dev), "test": len(splits.test)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def export_embedded(
    out: str | Path, seed: int = 42, num_train: int = 2000, num_dev: int = 400, num_test: int = 800, force: bool = False
) -> Path:
    """Write the embedded dataset (FoodToy) as a jsonl dataset folder with PNG images.

    The result loads with ``load_dataset("food101", out)`` (labels are class names; the
    same samples as ``make_embedded_dataset(seed, ...)``).
    """
    from .embedded import make_embedded_dataset

    out = Path(out)
    _prepare_out(out, force)
    data = make_embedded_dataset(seed, num_train=num_train, num_dev=num_dev, num_test=num_test)
    for split, samples in (("train", data.train), ("dev", data.dev), ("test", data.test)):
        lines = []
        for row, sample in enumerate(samples):
            rel = f"images/{split}/{row:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(sample.image)).save(out / rel)
            record = {"text": sample.text, "img": rel, "label": data.classes[int(sample.label)]}
            lines.append(json.dumps(record))
        (out / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    write_class_list(out / CLASSES_FILE, data.classes)
    return out


def _summary(manifest: dict[str, Any]) -> str:
    header = "| site | rows | classes | mixture | " + " | ".join(PATTERN_NAMES) + " | missing in input (text/image) |"
    lines = [header, "|---" * 8 + "|"]
    for site in manifest["sites"]:
        mixture = "/".join(f"{x:.2f}" for x in site["mixture"])
        counts = " | ".join(str(site[name]) for name in PATTERN_NAMES)
        real = f"{site['real-text-missing']}/{site['real-image-missing']}"
        lines.append(f"| {site['folder']} | {site['rows']} | {len(site['classes'])} | {mixture} | {counts} | {real} |")
    server = manifest["server"]
    lines.append(f"server: {server['dev']} dev, {server['test']} test rows")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="write one jsonl folder per site plus the server's held-out folder")
    split.add_argument("--dataset", default="food101", help="food101 or mmimdb (how to read the input)")
    split.add_argument("--dataset-dir", required=True, help="the input dataset folder (jsonl or arrow layout)")
    split.add_argument("--data-layout", default="auto", choices=("auto", "jsonl", "arrow"))
    split.add_argument("--num-sites", type=int, required=True)
    split.add_argument("--out", required=True, help="output folder (empty, or use --force)")
    split.add_argument("--num-classes", type=int, default=0, help="keep the N most frequent train classes")
    split.add_argument("--classes", default="", help="comma-separated class list (default: classes.txt or train)")
    split.add_argument("--mmimdb-protocol", default="paper", choices=("paper", "multilabel"))
    split.add_argument("--label-alpha", type=float, default=0.0, help="Dirichlet label skew; 0 is IID")
    split.add_argument("--min-site-size", type=int, default=10)
    split.add_argument("--missing-table", default="", help="YAML per-site mixtures (keys 0..N-1, default)")
    split.add_argument("--missing-setting", default="none", choices=("miss-text", "miss-image", "miss-both", "none"))
    split.add_argument("--eta", type=float, default=0.7)
    split.add_argument("--missing-alpha", type=float, default=1.0)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--skip-bad-rows", action="store_true")
    split.add_argument("--hardlink", action="store_true", help="hard-link images instead of copying them")
    split.add_argument("--force", action="store_true", help="replace a non-empty --out")
    embedded = sub.add_parser("export-embedded", help="write the embedded dataset (FoodToy) as a jsonl folder")
    embedded.add_argument("--out", required=True)
    embedded.add_argument("--seed", type=int, default=42)
    embedded.add_argument("--num-train", type=int, default=2000)
    embedded.add_argument("--num-dev", type=int, default=400)
    embedded.add_argument("--num-test", type=int, default=800)
    embedded.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "export-embedded":
            path = export_embedded(args.out, args.seed, args.num_train, args.num_dev, args.num_test, args.force)
            print(f'wrote the embedded dataset to {path} (read it with dataset="food101")')
            return 0
        if args.num_sites < 1:
            raise DataError(f"--num-sites must be at least 1, got {args.num_sites}")
        classes = [c.strip() for c in args.classes.split(",")] if args.classes.strip() else None
        splits = load_dataset(
            args.dataset,
            args.dataset_dir,
            layout=args.data_layout,
            num_classes=args.num_classes,
            skip_bad_rows=args.skip_bad_rows,
            verify_images=False,
            classes=classes,
            mmimdb_protocol=args.mmimdb_protocol,
            required=("train", "test"),
        )
        settings = SplitSettings(
            num_sites=args.num_sites,
            label_alpha=args.label_alpha,
            min_site_size=args.min_site_size,
            missing_table=args.missing_table,
            missing_setting=args.missing_setting,
            eta=args.eta,
            missing_alpha=args.missing_alpha,
            seed=args.seed,
            hardlink=args.hardlink,
        )
        manifest = split_dataset(splits, args.dataset_dir, args.out, settings, force=args.force)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_summary(manifest))
    print(f"wrote {len(manifest['sites'])} site folders and {SERVER_FOLDER}/ under {args.out} ({MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

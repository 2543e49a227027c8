"""From records to model batches: tokenising, image processing, missing modalities, collation.

A batch (what :func:`collate` returns and every backbone's ``embed`` reads) holds:

* ``input_ids``, ``attention_mask``, ``token_type_ids``: ``(B, T)`` long;
* ``pixel_values`` ``(B, 3, H, W)`` float and ``pixel_mask`` ``(B, H, W)`` long (pixel mode),
  or ``image_features`` ``(B, F, d_img)`` float (feature mode);
* ``labels``: ``(B,)`` long (single-label) or ``(B, C)`` float multi-hot (multi-label);
* ``missing_type``: ``(B,)`` long pattern (0 complete, 1 text missing, 2 image missing).

Missing text is the empty string; a missing image is the all-ones image after
normalisation (ViLT convention of Lee et al. 2023), ``S x S`` with ``S`` the processor's
shortest side; missing image features are all ones as well. A sample that misses a
modality in the data itself (no text, or no image) goes through exactly the same path:
its ``missing_type`` is that pattern, whatever pattern it was assigned.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .records import DataError, ImageSource, Pattern, Sample, natural_patterns


def open_image(source: ImageSource, uid: str) -> Image.Image:
    """Open an image from a path, encoded bytes or an array, as RGB.

    Raises:
        DataError: naming the sample (file and row) and the image it could not read.
    """
    try:
        if isinstance(source, np.ndarray):
            return Image.fromarray(source).convert("RGB")
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source)).convert("RGB")
        if isinstance(source, (str, Path)):
            return Image.open(source).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{uid}: image file {str(source)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        what = f"image file {str(source)!r}" if isinstance(source, (str, Path)) else "image bytes"
        raise DataError(f"{uid}: cannot read {what}: {exc}") from None
    raise DataError(f"{uid}: sample has no image (got {type(source).__name__})")


def load_features(source: str | np.ndarray | None, uid: str) -> np.ndarray:
    """Precomputed image features as float32 ``(F, d_img)`` (a single vector becomes ``F = 1``)."""
    if source is None:
        raise DataError(f"{uid}: sample has no 'img_features' but the backbone needs precomputed image features")
    if isinstance(source, np.ndarray):
        array = source
    else:
        try:
            array = np.load(source, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{uid}: image feature file {str(source)!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{uid}: cannot read image feature file {str(source)!r}: {exc}") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.isfinite(array).all():
        raise DataError(f"{uid}: image features must be a finite (d,) or (F, d) array, got shape {array.shape}")
    return array


def feature_shape(samples: Sequence[Sample]) -> tuple[int, int]:
    """``(F, d_img)`` of the precomputed image features of the first sample that has them.

    Samples without an image (image-missing in the data) are passed over.

    Raises:
        DataError: no samples, or no sample has (readable) features; the message names the
            first sample and how to compute features.
    """
    if not samples:
        raise DataError("the training split is empty: cannot read the shape of its image features")
    first = next((s for s in samples if s.image_features is not None), None)
    if first is None:
        first = samples[0]
        raise DataError(
            f"{first.uid}: sample has no precomputed image features, which backbone='text-encoder' needs; "
            "compute them with: python -m fedprime_core.tools.features --dataset-dir <data-dir> --encoder <model>"
        )
    array = load_features(first.image_features, first.uid)
    return int(array.shape[0]), int(array.shape[1])


class MultimodalProcessor:
    """Turns one record into tensors with ``transformers``' tokenizer and image processor.

    Args:
        tokenizer: the backbone's tokenizer (BERT WordPiece for ViLT).
        image_processor: ViLT's image processor (pixel mode), or ``None`` in feature mode.
        text_max_length: tokens per text (padded / truncated).
        image_mode: ``"pixels"`` or ``"features"`` (precomputed frozen image features).
        feature_shape: ``(F, d_img)`` of the features (feature mode; for missing images).
    """

    def __init__(
        self,
        tokenizer,
        image_processor=None,
        text_max_length: int = 40,
        image_mode: str = "pixels",
        feature_shape: tuple[int, int] | None = None,
    ) -> None:
        if image_mode not in ("pixels", "features"):
            raise ValueError(f"image_mode must be 'pixels' or 'features', got {image_mode!r}")
        if image_mode == "pixels" and image_processor is None:
            raise ValueError("pixel mode needs an image processor")
        if image_mode == "features" and feature_shape is None:
            raise ValueError("feature mode needs feature_shape (F, d_img)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.text_max_length = text_max_length
        self.image_mode = image_mode
        self.feature_shape = feature_shape

    @property
    def missing_image_size(self) -> int:
        size = self.image_processor.size
        return int(size.get("shortest_edge") or size.get("height") or 384)

    def text(self, text: str) -> dict[str, torch.Tensor]:
        """Tokens of one text: ``input_ids``, ``attention_mask``, ``token_type_ids``, each ``(T,)``."""
        enc = self.tokenizer(
            text, padding="max_length", truncation=True, max_length=self.text_max_length, return_tensors="pt"
        )
        out = {k: enc[k][0] for k in ("input_ids", "attention_mask")}
        out["token_type_ids"] = (
            enc["token_type_ids"][0] if "token_type_ids" in enc else torch.zeros_like(out["input_ids"])
        )
        return out

    def image(self, sample: Sample) -> torch.Tensor:
        """``(3, H, W)`` pixels or ``(F, d_img)`` features of a sample's image."""
        if self.image_mode == "features":
            features = load_features(sample.image_features, sample.uid)
            if tuple(features.shape) != tuple(self.feature_shape):
                # Caught here, naming the sample, instead of as an anonymous stacking error in collate.
                raise DataError(
                    f"{sample.uid}: image features have shape {tuple(features.shape)}, expected "
                    f"{tuple(self.feature_shape)} like the first training sample's; every image needs features "
                    "of one shape (one encoder, one --pool)"
                )
            return torch.from_numpy(features)
        image = open_image(sample.image, sample.uid)
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def missing_image(self) -> torch.Tensor:
        if self.image_mode == "features":
            return torch.ones(self.feature_shape, dtype=torch.float32)
        size = self.missing_image_size
        return torch.ones(3, size, size)


class MultimodalDataset(Dataset):
    """Samples with their missing patterns applied, as tensors.

    Args:
        samples: the records.
        patterns: ``(N,)`` missing pattern per sample; a sample that misses a modality in
            the data keeps that real pattern instead (:attr:`Sample.natural_pattern`), so
            ``self.patterns`` is what the model sees.
        processor: a :class:`MultimodalProcessor`.
        num_classes: size of the label space.
        multilabel: labels are tuples, encoded multi-hot.
        cache_images: keep processed images in memory (small in-memory datasets).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        patterns: np.ndarray,
        processor: MultimodalProcessor,
        num_classes: int,
        multilabel: bool = False,
        cache_images: bool = False,
    ) -> None:
        patterns = np.asarray(patterns, dtype=np.int64)
        if patterns.shape != (len(samples),):
            raise ValueError(f"need one missing pattern per sample: {len(samples)} samples, {patterns.shape} patterns")
        self.samples = list(samples)
        natural = natural_patterns(self.samples).astype(np.int64)
        self.patterns = np.where(natural != Pattern.COMPLETE, natural, patterns)
        self.processor = processor
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.cache_images = cache_images
        self._text_cache: dict[int, dict[str, torch.Tensor]] = {}
        self._image_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def label_tensor(self, label: int | tuple[int, ...]) -> torch.Tensor:
        if self.multilabel:
            hot = torch.zeros(self.num_classes)
            hot[list(label if isinstance(label, tuple) else (label,))] = 1.0
            return hot
        return torch.tensor(int(label))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        pattern = int(self.patterns[index])
        if index not in self._text_cache:
            text = "" if pattern == Pattern.TEXT_MISSING else sample.text
            self._text_cache[index] = self.processor.text(text)
        item = dict(self._text_cache[index])
        if pattern == Pattern.IMAGE_MISSING:
            image = self.processor.missing_image()
        elif index in self._image_cache:
            image = self._image_cache[index]
        else:
            image = self.processor.image(sample)
            if self.cache_images:
                self._image_cache[index] = image
        item["image"] = image
        item["labels"] = self.label_tensor(sample.label)
        item["missing_type"] = torch.tensor(pattern)
        return item


#: The per-token text columns of a batch, each ``(B, T)``.
TEXT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def trim_text_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the token positions that are padding in every text of ``batch`` (in place, returned).

    Texts come padded to the processor's ``text_max_length``; a batch of short texts then
    spends most of its attention and feed-forward work on masked positions. Keeping the
    positions where any text has a token (``attention_mask.any(0)``) leaves every real token,
    its position id and its mask as they were, for right or left padding alike, so a model's
    outputs change only by float rounding.

    Args:
        batch: with ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape ``(B, T)``.

    Returns:
        The same mapping with those three of shape ``(B, T')``, ``T' <= T``.
    """
    keep = batch["attention_mask"].bool().any(dim=0)
    if not bool(keep.all()):
        for key in TEXT_COLUMNS:
            batch[key] = batch[key][:, keep]
    return batch


def collate(items: Sequence[dict[str, torch.Tensor]], trim_text: bool = False) -> dict[str, torch.Tensor]:
    """Stack items into a batch; pad images of different sizes and build ``pixel_mask``.

    With ``trim_text``, texts are padded only to the batch's longest (:func:`trim_text_padding`).
    """
    batch = {k: torch.stack([it[k] for it in items]) for k in (*TEXT_COLUMNS, "labels", "missing_type")}
    if trim_text:
        trim_text_padding(batch)
    images = [it["image"] for it in items]
    if images[0].dim() == 2:  # precomputed features (F, d_img)
        batch["image_features"] = torch.stack(images)
        return batch
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    pixels = torch.zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, im in enumerate(images):
        pixels[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = 1
    batch["pixel_values"] = pixels
    batch["pixel_mask"] = mask
    return batch


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, trim_text: bool = False
) -> DataLoader:
    """A DataLoader with :func:`collate` and a seeded shuffle (same order for the same seed).

    ``trim_text`` pads each batch's texts only to its longest (``text-padding = batch``).
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=functools.partial(collate, trim_text=True) if trim_text else collate,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )

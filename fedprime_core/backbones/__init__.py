"""Frozen backbones behind one interface (:class:`~fedprime_core.backbones.base.Backbone`), and their loaders.

Two families are implemented:

* ``vilt`` (:mod:`.vilt`): ViLT, single-stream over text tokens and raw image patches
  (``image_mode = "pixels"``: batches carry ``pixel_values`` / ``pixel_mask``);
* ``text-encoder`` (:mod:`.text_encoder`): a frozen BERT-family text encoder with
  precomputed frozen image features mapped into its width (``image_mode = "features"``:
  batches carry ``image_features`` ``(B, F, d_img)``).

:func:`load_backbone` is the registry: ``load_backbone(kind, model, ...)`` returns the
backbone with its input processing and the fingerprint of its frozen weights. Importing
this package is light (no torch / transformers import); the implementations are imported
on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..progress import format_duration

LOGGER = logging.getLogger(__name__)

#: backbone kind -> how it sees images (``"pixels"`` or ``"features"``).
IMAGE_MODES: dict[str, str] = {"vilt": "pixels", "text-encoder": "features"}

#: The generated tiny models (:mod:`.tiny`, :mod:`.tiny_bert`), unpacked from shipped weights on first use.
TINY_VILT = "tiny-vilt"
TINY_BERT = "tiny-bert"
#: Model names each family understands besides hub ids and local directories.
VILT_MODELS: tuple[str, ...] = (TINY_VILT,)
TEXT_ENCODER_MODELS: tuple[str, ...] = (TINY_BERT, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@dataclasses.dataclass
class LoadedBackbone:
    """A loaded frozen backbone, what turns records into its batches, and a fingerprint of its weights.

    Attributes:
        backbone: the :class:`~fedprime_core.backbones.base.Backbone`.
        processor: its input processing (tokenizer, and the image processor in pixel mode).
        fingerprint: :func:`backbone_fingerprint` of its frozen weights.
        source: the directory or hub id the weights were loaded from.
    """

    backbone: Any
    processor: Any
    fingerprint: str
    source: str


def image_mode(kind: str) -> str:
    """``"pixels"`` or ``"features"`` for a backbone kind."""
    if kind not in IMAGE_MODES:
        raise ValueError(f"unknown backbone {kind!r}; use one of: {', '.join(IMAGE_MODES)}")
    return IMAGE_MODES[kind]


def needs_image_features(kind: str) -> bool:
    """Whether batches for this backbone carry precomputed ``image_features`` instead of pixels."""
    return image_mode(kind) == "features"


def model_family(model: str) -> str | None:
    """The backbone kind a ``model`` value belongs to, when that can be told without loading it.

    Known names (``tiny-vilt``, ``tiny-bert``, ``all-MiniLM-L6-v2``), ``dandelin/vilt*`` hub
    ids, and local directories whose ``config.json`` names a ``model_type``; ``None`` for
    anything else (a hub id or a path that does not exist here).
    """
    if model in VILT_MODELS or model.lower().startswith("dandelin/vilt"):
        return "vilt"
    if model in TEXT_ENCODER_MODELS:
        return "text-encoder"
    path = Path(model).expanduser()
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return None
    return "vilt" if config["model_type"] == "vilt" else "text-encoder"


def resolve_source(kind: str, model: str) -> str:
    """Map the ``model`` config value of a ``kind`` backbone to something ``from_pretrained`` accepts.

    A tiny model is unpacked once from its shipped weights into ``$FEDPRIME_CACHE`` (its folder
    is returned); anything else goes to the family's resolver (for ViLT: a local directory
    or a hub id; for text encoders also the ``all-MiniLM-L6-v2`` package).
    """
    if image_mode(kind) == "pixels":
        if model == TINY_VILT:
            from .tiny import ensure_tiny_vilt

            return str(ensure_tiny_vilt())
        from .base import resolve_pretrained_source

        return resolve_pretrained_source(model)
    if model == TINY_BERT:
        from .tiny_bert import ensure_tiny_bert

        return str(ensure_tiny_bert())
    from .text_encoder import resolve_text_encoder_source

    return resolve_text_encoder_source(model)


def load_backbone(
    kind: str,
    model: str,
    *,
    text_max_length: int,
    image_size: int = 0,
    feature_shape: tuple[int, int] | None = None,
    image_projection: str = "trainable",
) -> LoadedBackbone:
    """Load a frozen backbone of ``kind`` from ``model`` (a known name, hub id or local directory).

    Args:
        kind: ``"vilt"`` or ``"text-encoder"``.
        model: weights (see the ``model`` config key).
        text_max_length: tokens per text.
        image_size: shortest image side (pixel mode; 0: the processor default).
        feature_shape: ``(F, d_img)`` of the precomputed image features (feature mode, required).
        image_projection: ``"trainable"`` or ``"frozen"`` projection of the features (feature mode).
    """
    from ..data.processing import MultimodalProcessor

    started = time.perf_counter()
    if model not in ("tiny-vilt", "tiny-bert"):  # the tiny ones load in a second
        LOGGER.info("loading backbone %s (%s) ...", model, kind)
    if image_mode(kind) == "pixels":
        from .vilt import load_image_processor, load_vilt

        source = resolve_source(kind, model)
        backbone, tokenizer = load_vilt(source, text_max_length=text_max_length)
        processor = MultimodalProcessor(tokenizer, load_image_processor(source, image_size), text_max_length)
    else:
        from .text_encoder import load_text_encoder

        if feature_shape is None:
            raise ValueError("the text-encoder backbone needs feature_shape (the shape of the precomputed features)")
        source = resolve_source(kind, model)
        backbone, tokenizer = load_text_encoder(
            source, feature_dim=feature_shape[1], image_projection=image_projection, text_max_length=text_max_length
        )
        processor = MultimodalProcessor(
            tokenizer, None, text_max_length=text_max_length, image_mode="features", feature_shape=feature_shape
        )
    fingerprint = backbone_fingerprint(backbone)
    LOGGER.info(
        "loaded backbone %s (%s) from %s in %s, fingerprint %s",
        model,
        kind,
        source,
        format_duration(time.perf_counter() - started),
        fingerprint,
    )
    return LoadedBackbone(backbone, processor, fingerprint, source)


def backbone_fingerprint(backbone: Any) -> str:
    """Short SHA-256 of the frozen weights: clients and server must agree on it."""
    digest = hashlib.sha256()
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    for name, tensor in sorted(backbone.state_dict().items()):
        if name in trainable:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

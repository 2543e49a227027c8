"""Frozen backbones behind one interface (:class:`~fedprime_core.backbones.base.Backbone`), and their loaders.

The families are registered in :data:`~fedprime_core.backbones.kinds.KINDS` with how they
see images and the module that implements them:

* ``vilt`` (:mod:`.vilt`): ViLT, single-stream over text tokens and raw image patches
  (``image_mode = "pixels"``: batches carry ``pixel_values`` / ``pixel_mask``);
* ``text-encoder`` (:mod:`.text_encoder`): a frozen BERT-family text encoder with
  precomputed frozen image features mapped into its width (``image_mode = "features"``:
  batches carry ``image_features`` ``(B, F, d_img)``).

``load_backbone(kind, model, ...)`` returns the backbone with its input processing and the
fingerprint of its frozen weights. Importing this package is light (no torch / transformers
import); the implementations are imported on first use. Adding a family: a module with
``resolve_source`` and ``load`` and one entry in ``KINDS`` (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import time
from typing import Any

from ..progress import format_duration
from .kinds import (
    IMAGE_PROJECTIONS,
    KINDS,
    TINY_BERT,
    TINY_VILT,
    BackboneKind,
    backbone_kind,
    image_mode,
    model_family,
    needs_image_features,
)

__all__ = [
    "IMAGE_PROJECTIONS",
    "KINDS",
    "TINY_BERT",
    "TINY_VILT",
    "BackboneKind",
    "LoadedBackbone",
    "backbone_fingerprint",
    "backbone_kind",
    "image_mode",
    "load_backbone",
    "model_family",
    "needs_image_features",
    "resolve_source",
]

LOGGER = logging.getLogger(__name__)


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


def resolve_source(kind: str, model: str) -> str:
    """Map the ``model`` config value of a ``kind`` backbone to something ``from_pretrained`` accepts.

    A generated model (``tiny-vilt``, ``tiny-bert``) is unpacked once from its shipped weights
    into ``$FEDPRIME_CACHE`` (its folder is returned); anything else goes to the family's
    resolver (for ViLT: a local directory or a hub id; for text encoders also the
    ``all-MiniLM-L6-v2`` package).
    """
    family = backbone_kind(kind)
    if model in family.generated:
        module, function = family.generated[model].split(":")
        return str(getattr(importlib.import_module(module), function)())
    return importlib.import_module(family.module).resolve_source(model)


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
        kind: a registered family (:data:`~fedprime_core.backbones.kinds.KINDS`): ``"vilt"`` or
            ``"text-encoder"``.
        model: weights (see the ``model`` config key).
        text_max_length: tokens per text.
        image_size: shortest image side (pixel mode; 0: the processor default).
        feature_shape: ``(F, d_img)`` of the precomputed image features (feature mode, required).
        image_projection: ``"trainable"`` or ``"frozen"`` projection of the features (feature mode).
    """
    family = backbone_kind(kind)
    started = time.perf_counter()
    if model not in family.generated:  # the generated ones load in a second
        LOGGER.info("loading backbone %s (%s) ...", model, kind)
    if family.image_mode == "features" and feature_shape is None:
        raise ValueError(f"the {kind} backbone needs feature_shape (the shape of the precomputed features)")
    source = resolve_source(kind, model)
    backbone, processor = importlib.import_module(family.module).load(
        source,
        text_max_length=text_max_length,
        image_size=image_size,
        feature_shape=feature_shape,
        image_projection=image_projection,
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

"""The backbone kinds and the model names each understands: the ``backbones`` vocabulary.

Light (no torch, no transformers): the config schema takes its ``backbone`` and
``image-projection`` choices from here and checks a ``model`` against its kind with
:func:`model_family` without loading anything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

#: The generated tiny models (:mod:`.tiny`, :mod:`.tiny_bert`), unpacked from shipped weights on first use.
TINY_VILT = "tiny-vilt"
TINY_BERT = "tiny-bert"
#: How the text encoder maps precomputed image features into its width: trained and exchanged like
#: the head, or a fixed seeded matrix never sent (:mod:`fedprime_core.backbones.text_encoder`).
IMAGE_PROJECTIONS = ("trainable", "frozen")
#: How a backbone sees images: raw pixels (batches carry ``pixel_values``) or precomputed
#: features (batches carry ``image_features`` ``(B, F, d_img)``).
IMAGE_MODE_NAMES = ("pixels", "features")


@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """One registered backbone family.

    Attributes:
        name: the ``backbone`` config value.
        image_mode: ``"pixels"`` or ``"features"``.
        module: the module that implements it, with ``resolve_source(model) -> str`` (a folder or hub
            id ``from_pretrained`` accepts) and ``load(source, *, text_max_length, image_size,
            feature_shape, image_projection) -> (backbone, processor)``.
        models: model names it understands besides hub ids and local directories.
        hub_prefixes: (lower-case) prefixes of hub ids known to be of this family.
        model_types: the ``model_type`` values of a local folder's ``config.json`` that are this
            family; ``None``: every value no other family claims.
        generated: a generated model's name -> ``"module:function"`` that unpacks it and returns its folder.
    """

    name: str
    image_mode: str
    module: str
    models: tuple[str, ...] = ()
    hub_prefixes: tuple[str, ...] = ()
    model_types: tuple[str, ...] | None = ()
    generated: Mapping[str, str] = dataclasses.field(default_factory=dict)


#: Every backbone family, by name, in the order the schema lists them.
KINDS: dict[str, BackboneKind] = {
    kind.name: kind
    for kind in (
        BackboneKind(
            "vilt",
            "pixels",
            "fedprime_core.backbones.vilt",
            models=(TINY_VILT,),
            hub_prefixes=("dandelin/vilt",),
            model_types=("vilt",),
            generated={TINY_VILT: "fedprime_core.backbones.tiny:ensure_tiny_vilt"},
        ),
        BackboneKind(
            "text-encoder",
            "features",
            "fedprime_core.backbones.text_encoder",
            models=(TINY_BERT, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
            model_types=None,
            generated={TINY_BERT: "fedprime_core.backbones.tiny_bert:ensure_tiny_bert"},
        ),
    )
}


def backbone_kind(name: str) -> BackboneKind:
    """The registered family ``name``; raises ``ValueError`` listing the known ones."""
    if name not in KINDS:
        raise ValueError(f"unknown backbone {name!r}; use one of: {', '.join(KINDS)}")
    return KINDS[name]


def image_mode(kind: str) -> str:
    """``"pixels"`` or ``"features"`` for a backbone kind."""
    return backbone_kind(kind).image_mode


def needs_image_features(kind: str) -> bool:
    """Whether batches for this backbone carry precomputed ``image_features`` instead of pixels."""
    return image_mode(kind) == "features"


def model_family(model: str) -> str | None:
    """The backbone kind a ``model`` value belongs to, when that can be told without loading it.

    Known names (``tiny-vilt``, ``tiny-bert``, ``all-MiniLM-L6-v2``), ``dandelin/vilt*`` hub
    ids, and local directories whose ``config.json`` names a ``model_type``; ``None`` for
    anything else (a hub id or a path that does not exist here).
    """
    for kind in KINDS.values():
        if model in kind.models or model.lower().startswith(kind.hub_prefixes):
            return kind.name
    path = Path(model).expanduser()
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return None
    claimed = [kind.name for kind in KINDS.values() if kind.model_types and config["model_type"] in kind.model_types]
    others = [kind.name for kind in KINDS.values() if kind.model_types is None]
    return (claimed or others or [None])[0]

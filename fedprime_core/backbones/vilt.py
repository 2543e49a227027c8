"""ViLT as a frozen backbone, built on ``transformers``' own ViLT classes.

``dandelin/vilt-b32-mlm`` loads by hub id (through the standard HF cache) or from a local
directory; ``tiny-vilt`` (see :mod:`fedprime_core.backbones.tiny`) is a small ViLT
pretrained offline and saved once to a local directory, so the embedded demo and the
tests run through exactly the same ``from_pretrained`` path as the real model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, ViltModel

from .base import Backbone, Batch, resolve_pretrained_source

LOGGER = logging.getLogger(__name__)


def make_image_processor(shortest_edge: int = 384, longest_edge: int | None = None):
    """ViLT's image processor (PIL backend, so torchvision is not required)."""
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    size = {"shortest_edge": shortest_edge}
    if longest_edge:
        size["longest_edge"] = longest_edge
    return ViltImageProcessorPil(size=size, size_divisor=32, do_pad=False)


def load_image_processor(source: str | Path, image_size: int = 0):
    """Load the image processor saved with a model, defaulting to ViLT's (384 px)."""
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    try:
        processor = ViltImageProcessorPil.from_pretrained(str(source))
    except OSError:
        LOGGER.warning("no image processor config found for %s; using ViLT's defaults", source)
        processor = make_image_processor()
    processor.do_pad = False
    if image_size:
        processor.size = {"shortest_edge": image_size, "longest_edge": int(image_size * 1333 / 800)}
    return processor


def interpolate_text_positions(model: ViltModel, length: int) -> None:
    """Stretch ViLT's text position embeddings to ``length`` tokens (linear interpolation).

    ViLT was pretrained with 40 text positions; MM-IMDB plots need 128. This is the
    resizing Lee et al. (2023) apply for MM-IMDB.
    """
    text = model.embeddings.text_embeddings
    old = text.position_embeddings.weight.data  # (P, d)
    if length <= old.shape[0]:
        return
    new = nn.functional.interpolate(old.t()[None], size=length, mode="linear", align_corners=True)[0].t()
    text.position_embeddings = nn.Embedding(length, old.shape[1], _weight=new.contiguous())
    text.position_ids = torch.arange(length).expand((1, -1))
    text.token_type_ids = torch.zeros((1, length), dtype=torch.long)
    model.config.max_position_embeddings = length


class ViltBackbone(Backbone):
    """Frozen ViLT: text + patch embeddings, then ViLT's blocks over ``[prompts | text | image]``."""

    def __init__(self, vilt: ViltModel) -> None:
        super().__init__()
        self.vilt = vilt
        self.hidden_size = vilt.config.hidden_size
        self.num_layers = vilt.config.num_hidden_layers
        self.freeze()

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, T + 1 + N_patch, d)`` and mask; token 0 is the text [CLS]."""
        with torch.no_grad():
            tokens, mask = self.vilt.embeddings(
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("token_type_ids"),
                batch["pixel_values"],
                batch["pixel_mask"],
                None,
                None,
                image_token_type_idx=1,
            )
        return tokens, mask

    def run_layer(self, index: int, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.vilt.encoder.layer[index](hidden, attn_mask)[0]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vilt.layernorm(hidden)

    def token_scale(self) -> float:
        """RMS entry of ViLT's word embedding table."""
        weight = self.vilt.embeddings.text_embeddings.word_embeddings.weight
        return float(weight.detach().float().pow(2).mean().sqrt())

    def pooler_init(self) -> dict[str, torch.Tensor] | None:
        if self.vilt.pooler is None:
            return None
        dense = self.vilt.pooler.dense
        return {"weight": dense.weight.detach().clone(), "bias": dense.bias.detach().clone()}


def load_vilt(source: str, text_max_length: int = 0, dtype: torch.dtype = torch.float32) -> tuple[ViltBackbone, object]:
    """Load a frozen ViLT backbone and its tokenizer.

    Args:
        source: a hub id (``dandelin/vilt-b32-mlm``) or a local directory
            (:func:`fedprime_core.backbones.resolve_source` maps a ``model`` value to one).
        text_max_length: tokens per text; position embeddings are interpolated if longer
            than the checkpoint's.
        dtype: parameter dtype of the frozen weights.

    Returns:
        ``(backbone, tokenizer)``.
    """
    try:
        vilt = ViltModel.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise OSError(
            f"could not load ViLT {source!r}: {exc}. With no hub access, download the model on a "
            "machine that has it (hf download dandelin/vilt-b32-mlm --local-dir vilt-b32-mlm) and point "
            "'model' at that folder, or copy the HF cache and set HF_HOME"
        ) from exc
    if text_max_length:
        interpolate_text_positions(vilt, text_max_length)
    return ViltBackbone(vilt), tokenizer


def resolve_source(model: str) -> str:
    """A local directory or a hub id (:func:`~fedprime_core.backbones.base.resolve_pretrained_source`)."""
    return resolve_pretrained_source(model)


def load(
    source: str,
    *,
    text_max_length: int,
    image_size: int = 0,
    feature_shape: tuple[int, int] | None = None,
    image_projection: str = "trainable",
) -> tuple[ViltBackbone, object]:
    """The ViLT backbone of ``source`` and its processor (tokens and pixels; features are not used)."""
    from ..data.processing import MultimodalProcessor

    backbone, tokenizer = load_vilt(source, text_max_length=text_max_length)
    return backbone, MultimodalProcessor(tokenizer, load_image_processor(source, image_size), text_max_length)

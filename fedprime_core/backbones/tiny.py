"""``tiny-vilt``: a small ViLT pretrained offline, for the embedded demo and the tests.

A frozen *random* ViLT is a poor stand-in for pretrained ViLT: its [CLS] state varies
across inputs only at the 1e-3 scale, and prompt-tuning on top of it does not learn at all
on the embedded data (measured: chance accuracy after 6 epochs). ``tiny-vilt`` is instead
built from a :class:`~transformers.ViltConfig` (width 64, 2 blocks, 64-px images, 16-px
patches) with smooth, low-frequency patch filters (the kind trained ViT first layers
have; random 16x16 filters drown colour in pixel noise), then pretrained for 600 steps
with ViLT's own recipe at toy scale: masked language modelling conditioned on the image
plus image-text matching, on a generated caption corpus drawn from the same synthetic
world as the embedded dataset but from disjoint samples and **without labels**
(:func:`generate_tiny_vilt`). (An extra image/text cross-view contrastive term was tried:
2.5x the cost and no better downstream.)

Generating takes about a minute of one CPU core (several on a busy machine), so the
resulting weights ship with the package (:mod:`.shipped`, checked against the generator by
``tests/test_shipped_weights.py``): :func:`ensure_tiny_vilt` unpacks them once per machine
into ``$FEDPRIME_CACHE`` (``~/.cache/fedprime``) with ``save_pretrained``, so the model then
loads through the same ``from_pretrained`` path as ``dandelin/vilt-b32-mlm``. Only without
the shipped file is the model generated instead. Processes on one machine share the
cached folder (a file lock makes concurrent first uses build it once). Clients report a
fingerprint of their frozen backbone so the server can warn when machines disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import ViltConfig, ViltModel

from ..devices import single_thread
from .generated import ensure_tiny, made_with, masked_tokens, pretrain
from .kinds import TINY_VILT
from .vilt import make_image_processor

LOGGER = logging.getLogger(__name__)

#: Bumped whenever the generated model changes (v6: generated on one thread, shipped).
TINY_VILT_VERSION = 6
TINY_VILT_SEED = 20250615
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 64
PRETRAIN_CORPUS = 3000
PRETRAIN_LR = 1e-3
_CORPUS_SEED = 424242


def tiny_vilt_config(vocab_size: int) -> ViltConfig:
    """The architecture of ``tiny-vilt``."""
    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=64,
        patch_size=16,
        max_position_embeddings=40,
    )


def smooth_patch_filters_(model: ViltModel, generator: torch.Generator, frequencies: int = 3) -> None:
    """Make the patch-embedding filters smooth: random mixes of low-frequency cosines.

    Trained ViT first layers are mostly smooth colour blobs and edges, which average out
    pixel noise; seeded random filters of that kind give the tiny model the same property.
    """
    weight = model.embeddings.patch_embeddings.projection.weight  # (d, 3, P, P)
    out_channels, in_channels, size, _ = weight.shape
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    cosines = torch.stack([torch.cos(torch.pi * k * grid) for k in range(frequencies)])
    basis = torch.einsum("ku,lv->kluv", cosines, cosines).reshape(frequencies**2, size, size)
    coefficients = torch.randn(out_channels, in_channels, frequencies**2, generator=generator)
    with torch.no_grad():
        weight.copy_(
            torch.einsum("dck,kuv->dcuv", coefficients, basis) / (size * (in_channels * frequencies**2) ** 0.5)
        )


def _pretrain(model: ViltModel, tokenizer, image_processor, steps: int) -> dict[str, float]:
    """MLM + image-text matching on a generated, unlabeled caption corpus."""
    from ..data.embedded import make_embedded_dataset
    from ..data.processing import MultimodalDataset, MultimodalProcessor, collate

    corpus = make_embedded_dataset(_CORPUS_SEED, num_train=PRETRAIN_CORPUS, num_dev=0, num_test=0).train
    processor = MultimodalProcessor(tokenizer, image_processor, text_max_length=24)
    dataset = MultimodalDataset(corpus, np.zeros(len(corpus), dtype=np.int64), processor, num_classes=1)
    data = collate([dataset[i] for i in range(len(dataset))])
    text_keys = ("input_ids", "attention_mask", "token_type_ids")
    vocab = len(tokenizer)
    hidden = model.config.hidden_size
    mlm_head = nn.Linear(hidden, vocab)
    itm_head = nn.Linear(hidden, 2)

    def losses(idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = {k: data[k][idx].clone() for k in (*text_keys, "pixel_values", "pixel_mask")}
        negative = torch.rand(PRETRAIN_BATCH, generator=generator) < 0.5  # image-text matching: half mismatched
        other = torch.randint(0, len(dataset), (PRETRAIN_BATCH,), generator=generator)
        for key in text_keys:
            batch[key][negative] = data[key][other][negative]
        batch["input_ids"], targets = masked_tokens(batch["input_ids"], tokenizer, generator)
        out = model(**batch)
        text_states = out.last_hidden_state[:, : targets.shape[1]]
        mlm = nn.functional.cross_entropy(
            mlm_head(text_states).reshape(-1, vocab), targets.reshape(-1), ignore_index=-100
        )
        itm = nn.functional.cross_entropy(itm_head(out.pooler_output), (~negative).long())
        return {"mlm": mlm, "itm": itm}

    return pretrain(
        TINY_VILT,
        model,
        (mlm_head, itm_head),
        losses,
        num_rows=len(dataset),
        steps=steps,
        batch=PRETRAIN_BATCH,
        lr=PRETRAIN_LR,
        seed=TINY_VILT_SEED,
    )


def _tiny_vilt_io() -> tuple[Any, Any]:
    """The tokenizer and image processor of ``tiny-vilt`` (built by code, nothing to learn)."""
    from ..data.embedded import IMAGE_SIZE, build_embedded_tokenizer

    return build_embedded_tokenizer(), make_image_processor(shortest_edge=IMAGE_SIZE)


def generate_tiny_vilt(steps: int = PRETRAIN_STEPS) -> tuple[ViltModel, Any, Any, dict[str, Any]]:
    """Build and pretrain ``tiny-vilt`` from scratch: ``(model, tokenizer, image_processor, made_with)``.

    Seeded and run on one CPU thread (:func:`~fedprime_core.devices.single_thread`): the same torch build and CPU
    give the same weights bit for bit.
    """
    tokenizer, image_processor = _tiny_vilt_io()
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_VILT_SEED)
        model = ViltModel(tiny_vilt_config(vocab_size=len(tokenizer)))
        smooth_patch_filters_(model, torch.Generator().manual_seed(TINY_VILT_SEED))
        losses = _pretrain(model, tokenizer, image_processor, steps) if steps else {}
    LOGGER.info("%s pretraining losses (last 50 steps): %s", TINY_VILT, losses)
    info = made_with(
        "fedprime_core.backbones.tiny.generate_tiny_vilt",
        seed=TINY_VILT_SEED,
        steps=steps,
        losses={k: round(v, 4) for k, v in losses.items()},
    )
    return model, tokenizer, image_processor, info


def generate_tiny_vilt_weights() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a freshly generated ``tiny-vilt`` and how it was made (for :mod:`.shipped`)."""
    model, _, _, info = generate_tiny_vilt()
    return model.state_dict(), info


def assemble_tiny_vilt(state: Mapping[str, torch.Tensor]) -> tuple[ViltModel, Any, Any]:
    """``tiny-vilt`` from its weights: ``(model, tokenizer, image_processor)``."""
    tokenizer, image_processor = _tiny_vilt_io()
    model = ViltModel(tiny_vilt_config(vocab_size=len(tokenizer)))
    model.load_state_dict(dict(state), strict=True)
    return model.eval(), tokenizer, image_processor


def ensure_tiny_vilt(directory: Path | None = None) -> Path:
    """The ``save_pretrained`` directory of ``tiny-vilt``: the shipped weights, unpacked once per machine."""

    def generate() -> tuple[Any, ...]:
        return generate_tiny_vilt()[:3]

    return ensure_tiny(TINY_VILT, TINY_VILT_VERSION, assemble_tiny_vilt, generate, directory)

"""``tiny-vilt``: a small ViLT pretrained offline, for the embedded demo and the tests.

A frozen *random* ViLT is a poor stand-in for pretrained ViLT: its [CLS] state varies
across inputs only at the 1e-3 scale, and prompt-tuning on top of it does not learn at all
on the embedded data (measured: chance accuracy after 6 epochs). ``tiny-vilt`` is instead
built from a :class:`~transformers.ViltConfig` (width 64, 2 blocks, 64-px images, 16-px
patches) with smooth, low-frequency patch filters (the kind trained ViT first layers
have; random 16x16 filters drown colour in pixel noise), then pretrained for 600 steps
with ViLT's own recipe at toy scale: masked language modelling conditioned on the image
plus image-text matching, on a generated caption corpus drawn from the same synthetic
world as the embedded dataset but from disjoint samples and **without labels**. This
takes about a minute on 2 CPU cores, runs once per machine, and is saved with
``save_pretrained`` so it then loads through the same ``from_pretrained`` path as
``dandelin/vilt-b32-mlm``. (An extra image/text cross-view contrastive term was tried:
2.5x the cost and no better downstream.)

The result is deterministic for a given torch build and CPU; processes on one machine
share the cached folder (a file lock makes concurrent first uses generate it once).
Clients report a fingerprint of their frozen backbone so the server can warn when
machines disagree.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import ViltConfig, ViltModel

LOGGER = logging.getLogger(__name__)

TINY_VILT = "tiny-vilt"
#: Bumped whenever the generated model changes, so stale caches are not reused.
TINY_VILT_VERSION = 5
TINY_VILT_SEED = 20250615
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 64
PRETRAIN_CORPUS = 3000
PRETRAIN_LR = 1e-3
_CORPUS_SEED = 424242


def fedprime_cache_dir() -> Path:
    """Where generated models live: ``$FEDPRIME_CACHE`` or ``~/.cache/fedprime``."""
    return Path(os.environ.get("FEDPRIME_CACHE", Path.home() / ".cache" / "fedprime"))


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


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    mask_id = tokenizer.mask_token_id
    first_word = max(tokenizer.all_special_ids) + 1
    mlm_head = nn.Linear(hidden, vocab)
    itm_head = nn.Linear(hidden, 2)
    params = list(model.parameters()) + list(mlm_head.parameters()) + list(itm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(TINY_VILT_SEED)
    model.train()
    losses = {"mlm": 0.0, "itm": 0.0}
    for step in range(steps):
        idx = torch.randint(0, len(dataset), (PRETRAIN_BATCH,), generator=generator)
        batch = {k: data[k][idx].clone() for k in (*text_keys, "pixel_values", "pixel_mask")}
        negative = torch.rand(PRETRAIN_BATCH, generator=generator) < 0.5
        other = torch.randint(0, len(dataset), (PRETRAIN_BATCH,), generator=generator)
        for key in text_keys:
            batch[key][negative] = data[key][other][negative]
        ids = batch["input_ids"]
        masked = (torch.rand(ids.shape, generator=generator) < 0.15) & (ids >= first_word)
        targets = torch.where(masked, ids, torch.full_like(ids, -100))
        batch["input_ids"] = torch.where(masked, torch.full_like(ids, mask_id), ids)
        out = model(**batch)
        text_states = out.last_hidden_state[:, : ids.shape[1]]
        mlm = nn.functional.cross_entropy(
            mlm_head(text_states).reshape(-1, vocab), targets.reshape(-1), ignore_index=-100
        )
        itm = nn.functional.cross_entropy(itm_head(out.pooler_output), (~negative).long())
        optimizer.zero_grad(set_to_none=True)
        (mlm + itm).backward()
        optimizer.step()
        if step >= steps - 50:
            losses["mlm"] += float(mlm.detach()) / 50
            losses["itm"] += float(itm.detach()) / 50
    model.eval()
    return losses


def generate_once(directory: Path, build: Callable[[], Sequence[Any]]) -> Path:
    """Make a ``save_pretrained`` directory once, safely across concurrent processes.

    If ``directory/model.safetensors`` exists, returns at once. Otherwise, under a file
    lock (the other processes wait, then find it done), calls ``build()`` and saves every
    object it returns (model, tokenizer, processor: anything with ``save_pretrained``)
    into a temporary sibling that is renamed into place, so a crash never leaves a
    half-written directory behind.
    """
    marker = directory / "model.safetensors"
    if marker.is_file():
        return directory
    with _file_lock(directory.with_name(directory.name + ".lock")):
        if marker.is_file():  # another process finished it while we waited
            return directory
        parts = build()
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in parts:
            part.save_pretrained(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def ensure_tiny_vilt(directory: Path | None = None, steps: int = PRETRAIN_STEPS) -> Path:
    """Generate and pretrain ``tiny-vilt`` once; return its ``save_pretrained`` directory."""
    from ..data.embedded import IMAGE_SIZE, build_embedded_tokenizer
    from .vilt import make_image_processor

    directory = directory or fedprime_cache_dir() / f"{TINY_VILT}-v{TINY_VILT_VERSION}"

    def build() -> tuple[Any, ...]:
        LOGGER.info("generating %s (one-off pretraining, about a minute on 2 CPU cores) in %s", TINY_VILT, directory)
        tokenizer = build_embedded_tokenizer()
        image_processor = make_image_processor(shortest_edge=IMAGE_SIZE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_VILT_SEED)
            model = ViltModel(tiny_vilt_config(vocab_size=len(tokenizer)))
            smooth_patch_filters_(model, torch.Generator().manual_seed(TINY_VILT_SEED))
            losses = _pretrain(model, tokenizer, image_processor, steps) if steps else {}
        LOGGER.info("%s pretraining losses (last 50 steps): %s", TINY_VILT, losses)
        return model, tokenizer, image_processor

    return generate_once(directory, build)

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

import contextlib
import fcntl
import functools
import logging
import os
import platform
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import ViltConfig, ViltModel

from ..progress import Progress

LOGGER = logging.getLogger(__name__)

TINY_VILT = "tiny-vilt"
#: Bumped whenever the generated model changes (v6: generated on one thread, shipped).
TINY_VILT_VERSION = 6
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
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block.

    The generators run on one thread: a reduction's order, hence the last bits of the
    result, then does not depend on the machine's core count, and a model this small
    gains nothing from more threads (oversubscribed threads on a busy machine made
    generation 10x slower: 572 s instead of 49 s, measured on this project's 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def made_with(generator: str, **extra: Any) -> dict[str, Any]:
    """Provenance recorded with generated weights: generator, its settings, the software and CPU."""
    import transformers

    return {
        "generator": generator,
        **extra,
        "threads": 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


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
    progress = Progress(f"generating {TINY_VILT}", steps, unit="pretraining steps", logger=LOGGER, announce=True)
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
        progress.update()
    progress.close()
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
        with _quiet_transformers_bars():  # a bar for writing 0.5 MB is noise in a log
            for part in parts:
                part.save_pretrained(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def ensure_tiny(
    name: str,
    version: int,
    assemble: Callable[[dict[str, torch.Tensor]], Sequence[Any]],
    generate: Callable[[], Sequence[Any]],
    directory: Path | None = None,
) -> Path:
    """The ``save_pretrained`` directory of a tiny model, made once per machine.

    From the shipped weights when the package has them (``assemble(state)`` returns the
    model with its tokenizer / processor, in about a second), else by running the generator
    (``generate()``, minutes). The default directory is named after the weights' digest,
    so a cache of other weights is never mistaken for these.
    """
    from .shipped import read_shipped, shipped_path

    path = shipped_path(name, version)
    if path.is_file():
        sha = _shipped_digest(path, path.stat().st_mtime_ns)
        directory = directory or fedprime_cache_dir() / f"{name}-v{version}-{sha[:12]}"

        def build() -> Sequence[Any]:
            state, _ = read_shipped(path)
            LOGGER.info("%s: unpacking the shipped weights (sha256 %s...) into %s", name, sha[:12], directory)
            return assemble(state)

    else:
        directory = directory or fedprime_cache_dir() / f"{name}-v{version}-generated"

        def build() -> Sequence[Any]:
            LOGGER.warning(
                "%s: no shipped weights at %s; generating the model into %s instead "
                "(about a minute of one CPU core, longer on a busy machine)",
                name,
                path,
                directory,
            )
            return generate()

    return generate_once(directory, build)


@functools.lru_cache(maxsize=8)
def _shipped_digest(path: Path, mtime_ns: int) -> str:
    from .shipped import read_header

    return str(read_header(path)["sha256"])


def _tiny_vilt_io() -> tuple[Any, Any]:
    """The tokenizer and image processor of ``tiny-vilt`` (built by code, nothing to learn)."""
    from ..data.embedded import IMAGE_SIZE, build_embedded_tokenizer
    from .vilt import make_image_processor

    return build_embedded_tokenizer(), make_image_processor(shortest_edge=IMAGE_SIZE)


def generate_tiny_vilt(steps: int = PRETRAIN_STEPS) -> tuple[ViltModel, Any, Any, dict[str, Any]]:
    """Build and pretrain ``tiny-vilt`` from scratch: ``(model, tokenizer, image_processor, made_with)``.

    Seeded and run on one CPU thread (:func:`single_thread`): the same torch build and CPU
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

"""What the generated tiny backbones (``tiny-vilt``, :mod:`.tiny`; ``tiny-bert``, :mod:`.tiny_bert`) share.

Both are small ``transformers`` models pretrained offline on a generated, unlabeled caption
corpus by :func:`pretrain` (seeded, one CPU thread: :func:`~fedprime_core.devices.single_thread`), recorded with
:func:`made_with`, shipped as weights (:mod:`.shipped`) and unpacked once per machine into
``$FEDPRIME_CACHE`` by :func:`ensure_tiny` (generated instead when the package has no weights).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import operator
import os
import platform
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..progress import Progress

LOGGER = logging.getLogger(__name__)


def fedprime_cache_dir() -> Path:
    """Where generated models live: ``$FEDPRIME_CACHE`` or ``~/.cache/fedprime``."""
    return Path(os.environ.get("FEDPRIME_CACHE", Path.home() / ".cache" / "fedprime"))


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
        # The widest vector instructions torch dispatches to (AVX2, AVX512, ...): the same
        # seed gives other last bits with another (fedprime_core.tools.shipped_weights).
        "cpu-capability": torch.backends.cpu.get_cpu_capability(),
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


def pretrain(
    name: str,
    model: nn.Module,
    heads: Sequence[nn.Module],
    losses: Callable[[torch.Tensor, torch.Generator], Mapping[str, torch.Tensor]],
    *,
    num_rows: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, float]:
    """Pretrain ``model`` with its ``heads`` for ``steps`` AdamW steps (weight decay 0.01).

    Each step draws ``batch`` row indices ``(batch,)`` of the corpus (``num_rows`` rows) from a
    generator seeded with ``seed``, and minimises the sum of the terms ``losses(indices,
    generator)`` returns (the callback draws anything else it needs, such as masks, from the
    same generator, so the run is a pure function of the seed).

    Returns:
        Each loss term's mean over the last 50 steps. The model is left in eval mode.
    """
    params = [*model.parameters(), *(p for head in heads for p in head.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    tail: dict[str, float] = {}
    progress = Progress(f"generating {name}", steps, unit="pretraining steps", logger=LOGGER, announce=True)
    for step in range(steps):
        idx = torch.randint(0, num_rows, (batch,), generator=generator)
        terms = losses(idx, generator)
        total = functools.reduce(operator.add, terms.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for key, value in terms.items():
            tail.setdefault(key, 0.0)
            if step >= steps - 50:
                tail[key] += float(value.detach()) / 50
        progress.update()
    progress.close()
    model.eval()
    return tail


def masked_tokens(ids: torch.Tensor, tokenizer: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking at toy scale: ``(inputs, targets)``, 15% of the word tokens of ``ids`` ``(B, L)`` masked.

    ``targets`` holds the masked tokens' ids and -100 (ignored) elsewhere.
    """
    first_word = max(tokenizer.all_special_ids) + 1
    masked = (torch.rand(ids.shape, generator=generator) < 0.15) & (ids >= first_word)
    targets = torch.where(masked, ids, torch.full_like(ids, -100))
    return torch.where(masked, torch.full_like(ids, tokenizer.mask_token_id), ids), targets

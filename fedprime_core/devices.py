"""Where a process computes: the one reading of a ``device`` setting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(choice: str) -> torch.device:
    """The torch device of ``choice``.

    ``auto``: the first visible GPU (``CUDA_VISIBLE_DEVICES`` applies), else the CPU; ``cuda``
    (or ``cuda:N``): that GPU, an error when none is visible; anything else as torch reads it
    (``cpu``).

    Raises:
        RuntimeError: a GPU was asked for but none is visible to this process.
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} was requested but no CUDA GPU is visible to this process")
    return torch.device(choice)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (the thread count before is restored).

    For small models and nets: a reduction's order, hence the last bits of a result, then
    does not depend on the machine's core count, and such work gains nothing from more
    threads while oversubscribed threads on a busy machine cost it dearly. Measured on this
    project's 2 cores: generating a tiny backbone took 572 s instead of 49 s, and one
    alignment of 200 clients (:func:`fedprime_core.method.aggregation.align_prompts`) 16-26 s
    instead of 0.2-0.5 s, with two threads beside a running federation.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""Where a process computes: the one reading of a ``device`` setting."""

from __future__ import annotations

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

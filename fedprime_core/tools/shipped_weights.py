"""Regenerate the tiny backbones and compare them with (``check``) or rewrite (``write``) their shipped weights.

The file format and why the weights are shipped: :mod:`fedprime_core.backbones.shipped`.
This tool sits above the generators (:mod:`fedprime_core.backbones.tiny`,
:mod:`fedprime_core.backbones.tiny_bert`), which read the shipped files, so the format module
imports neither.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..backbones.shipped import read_shipped, shipped_path, tensor_digest, write_shipped


def tiny_models() -> dict[str, tuple[int, Any]]:
    """``name -> (version, generate)`` where ``generate()`` returns ``(model, made_with)``."""
    from ..backbones import tiny, tiny_bert

    return {
        tiny.TINY_VILT: (tiny.TINY_VILT_VERSION, tiny.generate_tiny_vilt_weights),
        tiny_bert.TINY_BERT: (tiny_bert.TINY_BERT_VERSION, tiny_bert.generate_tiny_bert_weights),
    }


def compare(shipped: Mapping[str, torch.Tensor], generated: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """How a regenerated state differs from the shipped one: same names, digest, largest difference."""
    same_names = sorted(shipped) == sorted(generated)
    diff = max(float((shipped[k].float() - generated[k].float()).abs().max()) for k in shipped) if same_names else None
    return {
        "same-names": same_names,
        "identical": same_names and tensor_digest(shipped) == tensor_digest(generated),
        "max-abs-diff": diff,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.shipped_weights",
        description="Regenerate the tiny backbones and compare them with (check) or rewrite (write) the shipped files.",
    )
    parser.add_argument("command", choices=("check", "write"))
    parser.add_argument("models", nargs="*", help="tiny-vilt and/or tiny-bert (default: both)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = tiny_models()
    unknown = set(args.models) - set(models)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(models)}")
    status = 0
    for name in args.models or sorted(models):
        version, generate = models[name]
        path = shipped_path(name, version)
        state, made_with = generate()
        if args.command == "write":
            sha = write_shipped(path, name, version, state, made_with)
            print(f"{name}: wrote {path} (sha256 {sha})")
            continue
        shipped, header = read_shipped(path)
        result = compare(shipped, state)
        print(
            f"{name}: {'identical to' if result['identical'] else 'DIFFERENT from'} {path.name} "
            f"(largest difference {result['max-abs-diff']}; shipped made with {header.get('made-with')})"
        )
        status |= 0 if result["identical"] else 1
    return status


if __name__ == "__main__":
    sys.exit(main())

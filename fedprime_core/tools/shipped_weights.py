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


#: What decides the exact bits of a regenerated model besides its seed: a new release of any of
#: these may change the last bits of its hundreds of optimizer steps (transformers 5.25.0 did).
SOFTWARE = ("torch", "transformers", "numpy", "machine")

#: Largest absolute weight difference accepted when the software differs from the shipped file's.
TOLERANCE = 1e-2


def software_differences(made_with: Mapping[str, Any], shipped_made_with: Mapping[str, Any]) -> dict[str, tuple]:
    """``key -> (shipped, here)`` for each :data:`SOFTWARE` entry that differs between the two records."""
    return {
        key: (shipped_made_with.get(key), made_with.get(key))
        for key in SOFTWARE
        if made_with.get(key) != shipped_made_with.get(key)
    }


def judge(
    result: Mapping[str, Any], made_with: Mapping[str, Any], shipped_made_with: Mapping[str, Any]
) -> tuple[bool, str]:
    """Whether a regeneration reproduces the shipped file, and why, from :func:`compare`'s result.

    With the software the shipped file was made with (:data:`SOFTWARE`) it must be bit for bit
    identical; with other versions, equal within :data:`TOLERANCE`, since only the last bits of
    the pretraining's float arithmetic may move, not the model.
    """
    if not result["same-names"]:
        return False, "DIFFERENT tensor names from"
    if result["identical"]:
        return True, "identical to"
    differences = software_differences(made_with, shipped_made_with)
    if not differences:
        return False, "DIFFERENT (same software, so it should be bit for bit) from"
    changed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differences.items())
    if result["max-abs-diff"] < TOLERANCE:
        return True, f"within {TOLERANCE} (not bit for bit: {changed}) of"
    return False, f"DIFFERENT beyond {TOLERANCE} ({changed}) from"


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
        ok, verdict = judge(result, made_with, header.get("made-with", {}))
        print(
            f"{name}: {verdict} {path.name} "
            f"(largest difference {result['max-abs-diff']}; shipped made with {header.get('made-with')})"
        )
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())

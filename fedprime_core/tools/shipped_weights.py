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


#: What decides the exact bits of a regenerated model besides its seed. The instruction set
#: matters most: on an AVX-512 machine the shipped files (made with AVX2) come out up to 0.007
#: apart after hundreds of optimizer steps, and bit for bit the same with the vector width
#: held to AVX2 (:func:`isa_environment`).
SOFTWARE = ("torch", "transformers", "numpy", "machine", "cpu-capability")

#: Largest absolute weight difference accepted when the software differs from the shipped file's.
TOLERANCE = 1e-2

#: torch's CPU capabilities on x86, narrowest first; a machine can run any up to its own.
X86_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")

#: Environment that holds torch's kernels, MKL and oneDNN to one instruction set. Read when
#: the libraries load, so it applies to a new process only.
_ISA_ENVIRONMENT = {
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "AVX512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
}


def isa_environment(capability: str) -> dict[str, str] | None:
    """Environment variables under which a new process computes as on a ``capability`` CPU.

    ``None`` when this machine cannot: another architecture, or a wider instruction set than
    it has (an AVX2 machine cannot run AVX-512 code). Used to regenerate the shipped weights
    bit for bit on a machine wider than the one that made them::

        ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
            python -m fedprime_core.tools.shipped_weights check
    """
    here = torch.backends.cpu.get_cpu_capability()
    if capability not in _ISA_ENVIRONMENT or here not in X86_CAPABILITIES:
        return None
    if X86_CAPABILITIES.index(capability) > X86_CAPABILITIES.index(here):
        return None
    return dict(_ISA_ENVIRONMENT[capability])


def recipes(shipped_made_with: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The software known to give a shipped file's exact bits (:data:`SOFTWARE` keys).

    The software that made it, then each entry of its ``reproduced-with`` list: software
    under which ``check --record`` regenerated it bit for bit later.
    """
    made = {key: shipped_made_with.get(key) for key in SOFTWARE}
    later = shipped_made_with.get("reproduced-with") or []
    return [made] + [{**made, **entry} for entry in later if isinstance(entry, Mapping)]


def software_differences(made_with: Mapping[str, Any], shipped_made_with: Mapping[str, Any]) -> dict[str, tuple]:
    """``key -> (shipped, here)`` for each :data:`SOFTWARE` entry that differs, against the nearest recipe.

    Empty when this software is one of the file's :func:`recipes`.
    """
    found: dict[str, tuple] | None = None
    for recipe in recipes(shipped_made_with):
        differences = {
            key: (recipe.get(key), made_with.get(key)) for key in SOFTWARE if made_with.get(key) != recipe.get(key)
        }
        if found is None or len(differences) < len(found):
            found = differences
    return found or {}


def judge(
    result: Mapping[str, Any], made_with: Mapping[str, Any], shipped_made_with: Mapping[str, Any]
) -> tuple[bool, str]:
    """Whether a regeneration reproduces the shipped file, and why, from :func:`compare`'s result.

    With software and an instruction set known to give the file's bits (:func:`recipes`)
    it must be bit for bit identical; otherwise equal within :data:`TOLERANCE`, since only the
    last bits of the pretraining's float arithmetic may move, not the model.
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
    parser.add_argument(
        "--record",
        action="store_true",
        help="check: when the regeneration is bit for bit identical under software the file does not list yet, "
        "add that software to its reproduced-with list (the tensors are not touched)",
    )
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
        differences = software_differences(made_with, header.get("made-with", {}))
        if args.record and result["identical"] and differences:
            record = dict(header["made-with"])
            record["reproduced-with"] = [*record.get("reproduced-with", []), {k: made_with.get(k) for k in SOFTWARE}]
            write_shipped(path, name, version, shipped, record)
            print(f"  recorded in {path.name}: reproduced bit for bit with {record['reproduced-with'][-1]}")
        environment = isa_environment(str(header.get("made-with", {}).get("cpu-capability")))
        if not result["identical"] and "cpu-capability" in differences and environment:
            exact = " ".join(f"{key}={value}" for key, value in environment.items())
            print(f"  for the exact bits, regenerate on its instruction set: {exact} {parser.prog} check {name}")
    return status


if __name__ == "__main__":
    sys.exit(main())

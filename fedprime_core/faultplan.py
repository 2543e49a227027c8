"""The grammar of a ``fault-plan`` (the run config key), apart from the fault injection that acts on it.

The schema checks a plan with :func:`parse_fault_plan` without importing the testing aid
(:mod:`fedprime_core.tools.faults`, which applies a plan to a client's reply and documents
each fault).
"""

from __future__ import annotations

FAULTS = ("nan", "inf", "shape", "missing", "extra", "huge", "usage", "zero", "crash", "slow")


def parse_fault_plan(plan: str) -> dict[int, list[tuple[str, int, int]]]:
    """``{partition_id: [(fault, first_round, last_round), ...]}``; raises ``ValueError`` on bad syntax."""
    out: dict[int, list[tuple[str, int, int]]] = {}
    for item in filter(None, (part.strip() for part in plan.split(","))):
        head, _, rounds = item.partition("@")
        pid_text, sep, fault = head.partition(":")
        if not sep or not pid_text.strip().isdigit():
            raise ValueError(f"item {item!r} is not '<partition-id>:<fault>[@<rounds>]'")
        fault = fault.strip()
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} in {item!r}; use one of {', '.join(FAULTS)}")
        first, last = 1, 10**9
        if rounds:
            lo, _, hi = rounds.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"rounds {rounds!r} in {item!r} must look like 3 or 2-4")
            first, last = int(lo), int(hi or lo)
        out.setdefault(int(pid_text), []).append((fault, first, last))
    return out

"""Fault injection for testing robustness: a plan of which client misbehaves how, and when.

A plan is a comma-separated list of ``<partition-id>:<fault>[@<rounds>]`` items, where
``rounds`` is ``3`` or ``2-4`` (all rounds when omitted), for example
``"1:nan,2:crash@2-3,3:shape"``. Faults:

=============  ===========================================================
``nan``        one array of the reply contains NaN
``inf``        one array contains +Inf
``shape``      the inter (or first) prompt array loses a row
``missing``    one array is left out of the reply
``extra``      an array the server does not know is added
``huge``       every array is multiplied by 1e6 (fails the norm bound)
``usage``      the usage counts have the wrong length
``zero``       the reply claims 0 training samples
``crash``      the client raises an exception (an error reply)
``slow``       the client sleeps 90 s before replying (exercises round timeouts)
=============  ===========================================================

The ClientApp applies the plan to its own reply; with an empty plan nothing happens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from ..faultplan import FAULTS, parse_fault_plan

__all__ = ["FAULTS", "InjectedFault", "active_faults", "inject_fault", "parse_fault_plan"]


class InjectedFault(RuntimeError):
    """Raised by a client whose plan says ``crash``."""


def active_faults(plan: str, partition_id: int, server_round: int) -> list[str]:
    """The faults this client must show in this round."""
    return [f for f, lo, hi in parse_fault_plan(plan).get(partition_id, []) if lo <= server_round <= hi]


def inject_fault(
    plan: str,
    partition_id: int,
    server_round: int,
    state: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    usage: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, float | int], dict[str, np.ndarray]]:
    """Apply the planned faults to a reply's parts; returns (possibly corrupted) copies."""
    state, metrics, usage = dict(state), dict(metrics), dict(usage)
    for fault in active_faults(plan, partition_id, server_round):
        names = sorted(state)
        target = next((n for n in names if n.endswith("prompts")), names[0])
        if fault == "crash":
            raise InjectedFault(f"injected crash on partition {partition_id} in round {server_round}")
        if fault == "slow":
            time.sleep(90.0)
        elif fault in ("nan", "inf"):
            value = np.array(state[target], dtype=np.float32, copy=True)
            value.flat[0] = np.nan if fault == "nan" else np.inf
            state[target] = value
        elif fault == "shape":
            state[target] = np.array(state[target][:-1], copy=True)
        elif fault == "missing":
            state.pop(target)
        elif fault == "extra":
            state["injected.extra"] = np.zeros(3, dtype=np.float32)
        elif fault == "huge":
            state = {k: np.asarray(v) * 1e6 for k, v in state.items()}
        elif fault == "usage":
            usage = {k: np.append(np.asarray(v), 1) for k, v in usage.items()}
        elif fault == "zero":
            metrics["num-examples"] = 0
    return state, metrics, usage

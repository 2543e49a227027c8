"""Sizing a study from its pilot: the paired spread of each comparison and the seeds it needs.

A protocol that reads a pilot for its variance only (``experiments/fashion-study.yaml``) needs
a reading that cannot show the difference it is about to test. :func:`pilot_power` gives, for
every paired difference of a comparison table (:func:`~.report.comparison`), the number of
pairs, their standard deviation on one column, a one-sided upper confidence bound of that
sd (chi-square), and the seeds a two-sided paired t test needs to detect ``delta`` with the
asked power, at the sd and at its bound. Means and intervals are never computed into the
result, so a pilot read with it stays blind::

    python -m fedprime_core.tools.experiments power experiments/fashion-study.yaml --delta 2

The seed counts (:mod:`.significance`) use the noncentral t distribution (exact for normal paired differences), not
the normal approximation ``((z_a + z_b) sd / delta)^2``, which undercounts at small n.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .plan import Plan, TableSpec
from .report import comparison
from .significance import MAX_SEEDS, paired_power, sd_upper_bound, seeds_needed

__all__ = ["MAX_SEEDS", "format_power", "paired_power", "pilot_power", "sd_upper_bound", "seeds_needed"]


def pilot_power(
    plan: Plan,
    table: TableSpec,
    column: str | None = None,
    delta: float = 2.0,
    power: float = 0.8,
    alpha: float = 0.05,
    confidence: float = 0.8,
) -> dict[str, Any]:
    """The spread of every paired difference of ``table`` on ``column`` and the seeds each needs.

    Args:
        plan, table: a loaded grid and one of its comparison tables.
        column: the table column to size on (default: its first extra column, the primary
            metric by this project's convention; else ``same-as-train``).
        delta: the smallest difference worth detecting, in the column's units (points for
            a scaled accuracy).
        power, alpha: of a two-sided paired t test.
        confidence: of the sd's one-sided upper bound.

    Returns:
        ``{"table", "column", "delta", "power", "alpha", "confidence", "comparisons": [...],
        "seeds": int | None}``. Each comparison holds its ``difference`` (``"key: value -
        minus"``), the other keys it is grouped by, ``pairs``, ``no-op pairs`` (both arms
        the same algorithm), ``sd``, ``sd-upper`` and ``seeds`` / ``seeds-at-upper``;
        ``seeds`` of the whole is the largest ``seeds`` over the comparisons (what every arm
        needs, the seeds being shared). No mean is in it.
    """
    if column is None:
        column = table.extra[0].title if table.extra else "same-as-train"
    data = comparison(plan, table)
    if column not in data["columns"]:
        raise ValueError(f"table {table.name!r} has no column {column!r}; its columns: {', '.join(data['columns'])}")
    rows = []
    for row in data["differences"]:
        diff = row["diff"]
        stat = row["stats"][column]
        pairs = int(stat["n"])
        entry: dict[str, Any] = {
            "difference": f"{', '.join(diff.keys)}: {diff.short}",
            "group": row["key"],
            "pairs": pairs,
            "no-op pairs": int(row["noop"]),
        }
        if pairs >= 2 and np.isfinite(stat["std"]):
            upper = sd_upper_bound(stat["std"], pairs, confidence)
            entry.update(
                {
                    "sd": stat["std"],
                    "sd-upper": upper,
                    "seeds": seeds_needed(stat["std"], delta, power, alpha),
                    "seeds-at-upper": seeds_needed(upper, delta, power, alpha),
                }
            )
        else:
            entry.update({"sd": None, "sd-upper": None, "seeds": None, "seeds-at-upper": None})
        rows.append(entry)
    counts = [r["seeds"] for r in rows if r["seeds"] is not None]
    return {
        "table": table.name,
        "column": column,
        "delta": delta,
        "power": power,
        "alpha": alpha,
        "confidence": confidence,
        "comparisons": rows,
        "seeds": max(counts) if counts else None,
    }


def format_power(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`pilot_power`'s result, with what it leaves out said."""

    def num(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    conf = round(100 * result["confidence"])
    lines = [
        f"Pilot spread of table {result['table']!r} on {result['column']!r}: seeds for "
        f"{round(100 * result['power'])}% power to detect {result['delta']:g} (two-sided paired t, "
        f"alpha {result['alpha']:g}). Means are not shown: a pilot is read for its spread only.",
        "",
        f"| difference | group | pairs | no-op pairs | paired sd | sd, {conf}% upper bound | seeds "
        "| seeds at the bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["comparisons"]:
        group = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["group"].items()) or "-"
        lines.append(
            f"| {row['difference']} | {group} | {row['pairs']} | {row['no-op pairs']} | {num(row['sd'])} | "
            f"{num(row['sd-upper'])} | {num(row['seeds'])} | {num(row['seeds-at-upper'])} |"
        )
    lines += ["", f"Seeds every arm needs (the largest of the comparisons): {num(result['seeds'])}"]
    return "\n".join(lines)

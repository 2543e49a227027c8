"""What the maximum over rounds of a chance-level model's test accuracy looks like.

The reference code reports each test metric's maximum over all evaluated rounds (wandb
``summary="max"``; docs/findings/reference-code.md, D2). A model that never leaves chance
then still reports more than chance. This script gives that figure for a number of
evaluations ``K``, test samples ``n`` and classes ``C``, treating each evaluation as an
independent draw of ``Binomial(n, 1/C)`` correct answers (a different model each round,
scored on the same labels)::

    python scripts/max_of_chance.py --evaluations 249 --samples 1823 --classes 8
    python scripts/max_of_chance.py --evaluations 249 125 --samples 1823 --classes 8 --json out.json

It computes the distribution of the maximum exactly: with ``F`` the binomial CDF,
``P(max <= k) = F(k) ** K``. It prints the mean, the median and a central interval (90% by
default) in percent, and, with ``--simulate N``, a Monte Carlo estimate of the mean from ``N``
simulated runs (seeded) beside it, as a check.

Independence is an assumption, not a fact of the reference runs: successive rounds of one
model are correlated, which lowers the expected maximum. So the figures are an upper
reference for "chance, read by the maximum rule".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MaxOfChance:
    """The distribution of the maximum accuracy of ``evaluations`` chance-level evaluations.

    Accuracies are in percent of ``samples``.
    """

    evaluations: int
    samples: int
    classes: int
    chance: float
    mean: float
    median: float
    low: float
    high: float
    coverage: float
    simulated_mean: float | None = None
    simulated_runs: int | None = None


def max_of_chance(
    evaluations: int,
    samples: int,
    classes: int,
    coverage: float = 0.9,
    simulate: int = 0,
    seed: int = 0,
) -> MaxOfChance:
    """Exact distribution of ``max_{i<K} X_i / n`` for ``X_i ~ Binomial(n, 1/C)`` i.i.d.

    Args:
        evaluations: K >= 1, the number of evaluated rounds the maximum is taken over.
        samples: n >= 1, test samples per evaluation.
        classes: C >= 2; the chance level is 1/C.
        coverage: the central interval's probability, in (0, 1).
        simulate: if > 0, also draw that many runs of K evaluations (seeded) and report the
            mean of their maxima.
        seed: seed of the simulation.

    Returns:
        :class:`MaxOfChance` with the mean, median and interval of the maximum, in percent.

    Raises:
        ValueError: on an argument out of range.
    """
    if evaluations < 1:
        raise ValueError(f"evaluations must be at least 1, got {evaluations}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if classes < 2:
        raise ValueError(f"classes must be at least 2, got {classes}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must lie strictly between 0 and 1, got {coverage}")
    if simulate < 0:
        raise ValueError(f"simulate must be 0 or more, got {simulate}")
    p = 1.0 / classes
    k = np.arange(samples + 1)
    # log P(max <= k) = K log F(k); computed in logs so that K = 10**4 does not underflow early.
    log_cdf = stats.binom.logcdf(k, samples, p)
    max_cdf = np.exp(evaluations * log_cdf)
    pmf = np.diff(np.concatenate([[0.0], max_cdf]))
    mean = float(np.dot(pmf, k)) / samples

    def quantile(q: float) -> float:
        return float(k[np.searchsorted(max_cdf, q, side="left")]) / samples

    tail = (1.0 - coverage) / 2.0
    simulated_mean = None
    if simulate:
        rng = np.random.default_rng(seed)
        draws = rng.binomial(samples, p, size=(simulate, evaluations))
        simulated_mean = 100.0 * float(draws.max(axis=1).mean()) / samples
    return MaxOfChance(
        evaluations=evaluations,
        samples=samples,
        classes=classes,
        chance=100.0 * p,
        mean=100.0 * mean,
        median=100.0 * quantile(0.5),
        low=100.0 * quantile(tail),
        high=100.0 * quantile(1.0 - tail),
        coverage=coverage,
        simulated_mean=simulated_mean,
        simulated_runs=simulate or None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, nargs="+", required=True, help="K: evaluated rounds")
    parser.add_argument("--samples", type=int, required=True, help="n: test samples per evaluation")
    parser.add_argument("--classes", type=int, required=True, help="C: classes (chance is 1/C)")
    parser.add_argument("--coverage", type=float, default=0.9, help="central interval (default 0.9)")
    parser.add_argument("--simulate", type=int, default=0, help="also simulate this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        rows = [
            max_of_chance(k, args.samples, args.classes, args.coverage, args.simulate, args.seed)
            for k in args.evaluations
        ]
    except ValueError as err:
        print(f"max_of_chance: {err}", file=sys.stderr)
        return 2
    for row in rows:
        line = (
            f"max of {row.evaluations} evaluations, {row.samples} samples, {row.classes} classes "
            f"(chance {row.chance:.2f}%): mean {row.mean:.2f}%, median {row.median:.2f}%, "
            f"{100 * row.coverage:.0f}% interval {row.low:.2f}-{row.high:.2f}%"
        )
        if row.simulated_mean is not None:
            line += f"; simulated mean {row.simulated_mean:.2f}% ({row.simulated_runs} runs)"
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Paired tests of a study and their power: the t test, Holm's adjustment, seeds and detectable differences.

Pure functions of the summary figures of paired differences (their count, mean and sample sd),
used by the report (:func:`paired_t`, :func:`holm`, :func:`detectable_difference` beside each
primary test) and by the pilot's sizing (:mod:`.power`). Power is that of a two-sided paired t
test under normal paired differences, from the noncentral t distribution (exact there), not the
normal approximation ``((z_a + z_b) sd / delta)^2``, which undercounts at small n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import integrate, optimize, stats

#: The largest seed count :func:`seeds_needed` searches; beyond it the answer is ``None``.
MAX_SEEDS = 1000


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (nan stays nan and is not counted)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if np.isfinite(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_t(n: int, mean: float, sd: float) -> tuple[float, float]:
    """Two-sided one-sample t test of ``mean = 0`` from ``n`` paired differences of spread ``sd``: ``(t, p)``.

    Fewer than 2 pairs give nan for both (nothing can be told, and a Holm family leaves the row
    out). Pairs that are all 0 (e.g. both arms the same algorithm) give t = nan and p = 1: no
    evidence of a difference, and the row stays in its family. Pairs that do not vary around a
    non-zero mean give t = ±inf and p = 0.
    """
    if n < 2 or not np.isfinite(sd):
        return float("nan"), float("nan")
    if sd == 0:
        return (float(np.sign(mean) * np.inf), 0.0) if mean != 0 else (float("nan"), 1.0)
    t = mean / (sd / np.sqrt(n))
    return float(t), float(2.0 * stats.t.sf(abs(t), n - 1))


def paired_power(sd: float, n: int, delta: float, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t test at level ``alpha`` with ``n`` pairs of spread ``sd`` against a true ``delta``.

    ``sd == 0``: 1.0 when ``delta != 0`` (every pair shows the difference exactly).
    """
    if n < 2:
        raise ValueError(f"a paired t test needs at least 2 pairs, got {n}")
    if sd < 0 or not math.isfinite(sd):
        raise ValueError(f"the paired sd must be a finite number >= 0, got {sd}")
    if sd == 0:
        return 1.0 if delta != 0 else alpha
    df = n - 1
    shift = abs(delta) / (sd / math.sqrt(n))
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    power = float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))
    if math.isfinite(power):
        return power
    return _power_by_integration(critical, df, shift)


def _power_by_integration(critical: float, df: int, shift: float) -> float:
    """``P(|T| > critical)`` for ``T`` noncentral t (``df``, ``shift``), integrated over the chi-square.

    ``T = (Z + shift) / sqrt(V / df)`` with ``V ~ chi2(df)``, so ``P(T > c) = E[Phi(shift - c sqrt(V / df))]``
    and ``P(T < -c) = E[Phi(-shift - c sqrt(V / df))]``. The fallback for the points at which scipy's
    noncentral t returns nan (e.g. df 2, shift 11.09 under scipy 1.17).
    """

    def integrand(v: float) -> float:
        scale = critical * math.sqrt(v / df)
        return (stats.norm.cdf(shift - scale) + stats.norm.cdf(-shift - scale)) * stats.chi2.pdf(v, df)

    value, _ = integrate.quad(integrand, 0.0, math.inf, limit=200)
    return float(min(1.0, max(0.0, value)))


def seeds_needed(sd: float, delta: float, power: float = 0.8, alpha: float = 0.05) -> int | None:
    """Fewest pairs (at least 2) at which :func:`paired_power` reaches ``power``; ``None`` beyond :data:`MAX_SEEDS`."""
    if delta == 0:
        raise ValueError("delta, the smallest difference worth detecting, must not be 0")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"power and alpha must lie in (0, 1), got {power} and {alpha}")
    for n in range(2, MAX_SEEDS + 1):
        if paired_power(sd, n, delta, alpha) >= power:
            return n
    return None


def sd_upper_bound(sd: float, n: int, confidence: float = 0.8) -> float:
    """One-sided ``confidence`` upper bound of a normal sd estimated as ``sd`` from ``n`` values (``n - 1`` df)."""
    if n < 2:
        raise ValueError(f"an sd needs at least 2 values, got {n}")
    df = n - 1
    return float(sd * math.sqrt(df / stats.chi2.ppf(1 - confidence, df)))


def detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true difference a two-sided paired t test of ``n`` pairs of spread ``sd`` detects with ``power``.

    What a comparison could have found: with the sd its pairs showed, a true difference this
    large (in the sd's units) is declared at level ``alpha`` with probability ``power``. 0 when
    ``sd == 0`` (every pair shows the difference exactly) or ``power <= alpha``; nan with fewer
    than 2 pairs or a non-finite sd.
    """
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"power and alpha must lie in (0, 1), got {power} and {alpha}")
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    if sd < 0:
        raise ValueError(f"the paired sd must be >= 0, got {sd}")
    if sd == 0 or power <= alpha:  # a test without any difference already rejects with probability alpha
        return 0.0
    high = sd
    while paired_power(sd, n, high, alpha) < power:  # power grows with the difference, to 1
        high *= 2.0
    return float(optimize.brentq(lambda d: paired_power(sd, n, d, alpha) - power, 0.0, high, xtol=1e-9 * sd))

"""Missing-modality simulation: patterns, training settings, test settings, per-client mixtures.

Patterns (the order of missing-aware prompt sets): 0 complete, 1 text missing, 2 image
missing. No sample loses both modalities.

Training settings at missing rate ``eta`` (reference protocol):

* ``miss-text``: a fraction ``eta`` of samples lose their text;
* ``miss-image``: a fraction ``eta`` lose their image;
* ``miss-both``: ``eta / 2`` lose text and ``eta / 2`` lose image;
* ``none``: every sample is complete.

Inter-client heterogeneity (absent from the reference code): client ``t`` draws its own
mixture ``pi_t ~ Dirichlet(missing_alpha * pi)`` over the patterns the setting allows,
where ``pi`` is the global mixture, so the clients' mixtures average to the global one
while differing from each other; ``missing_alpha = 0`` gives every client ``pi`` (the
reference protocol). An explicit per-client table can be given instead (YAML).

Real missingness: a sample whose row has no text or no image (see
:attr:`~fedprime_core.data.records.Sample.natural_pattern`) keeps that pattern; the
simulated mixture is drawn over the naturally *complete* samples only
(:func:`apply_missing`), as the reference code simulates only where its missing table
says "complete". With ``missing-setting = "none"`` the data is used as it is. Counts
report both parts (:func:`missing_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..yamlio import read_yaml_mapping
from .records import PATTERN_NAMES as PATTERN_NAMES  # re-exported: defined with the records
from .records import DataError, Sample, natural_patterns
from .records import Pattern as Pattern

#: The paper's five test columns, in its table order.
TEST_SETTINGS = ("same-as-train", "miss-both", "full-modal", "text-only", "image-only")


def setting_mixture(setting: str, eta: float) -> np.ndarray:
    """Global pattern mixture ``(3,)`` of a training setting at missing rate ``eta``."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"missing rate eta must lie in [0, 1], got {eta}")
    table = {
        "miss-text": (1 - eta, eta, 0.0),
        "miss-image": (1 - eta, 0.0, eta),
        "miss-both": (1 - eta, eta / 2, eta / 2),
        "none": (1.0, 0.0, 0.0),
    }
    if setting not in table:
        raise ValueError(f"unknown missing setting {setting!r}; use one of {sorted(table)}")
    return np.array(table[setting], dtype=np.float64)


def evaluation_mixture(test_setting: str, train_setting: str, eta: float) -> np.ndarray:
    """Pattern mixture ``(3,)`` of one of the paper's five test settings.

    ``same-as-train`` uses the training setting at ``eta``; ``miss-both`` uses miss-both at
    ``eta``; ``full-modal`` is complete; ``text-only`` has every image missing;
    ``image-only`` has every text missing.
    """
    if test_setting == "same-as-train":
        return setting_mixture(train_setting, eta)
    if test_setting == "miss-both":
        return setting_mixture("miss-both", eta)
    fixed = {"full-modal": (1.0, 0.0, 0.0), "text-only": (0.0, 0.0, 1.0), "image-only": (0.0, 1.0, 0.0)}
    if test_setting not in fixed:
        raise ValueError(f"unknown test setting {test_setting!r}; use one of {TEST_SETTINGS}")
    return np.array(fixed[test_setting], dtype=np.float64)


def sample_patterns(num_samples: int, mixture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assign a pattern to each of ``num_samples`` samples with the exact mixture proportions.

    Counts are ``num_samples * mixture`` rounded by largest remainder (so a rate of 0.7 on
    100 samples is exactly 70), then positions are shuffled.

    Returns:
        ``(num_samples,)`` int8 patterns.
    """
    mixture = np.asarray(mixture, dtype=np.float64)
    if mixture.shape != (3,) or np.any(mixture < 0) or not np.isclose(mixture.sum(), 1.0):
        raise ValueError(f"a pattern mixture is 3 non-negative numbers summing to 1, got {mixture}")
    raw = mixture * num_samples
    counts = np.floor(raw).astype(np.int64)
    remainder = num_samples - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:remainder]] += 1
    patterns = np.repeat(np.arange(3, dtype=np.int8), counts)
    return rng.permutation(patterns)


def client_mixtures(num_clients: int, setting: str, eta: float, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Each client's own pattern mixture, ``(num_clients, 3)``.

    Args:
        num_clients: number of clients.
        setting, eta: the global training setting and rate.
        alpha: Dirichlet concentration around the global mixture; 0 gives every client
            the global mixture.
        rng: randomness (pass a generator seeded from the run seed).
    """
    base = setting_mixture(setting, eta)
    out = np.tile(base, (num_clients, 1))
    support = base > 0
    if alpha <= 0 or support.sum() <= 1:
        return out
    draws = rng.dirichlet(alpha * base[support], size=num_clients)
    out[:, ~support] = 0.0
    out[:, support] = draws
    return out


def apply_missing(
    samples: Sequence[Sample], mixture: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Patterns of ``samples``: their real missingness, plus ``mixture`` simulated on the complete ones.

    A sample that misses a modality in the data keeps that pattern. The naturally complete
    samples get patterns drawn by :func:`sample_patterns` with ``mixture`` (exact
    proportions among them). Data without real missingness gives exactly the patterns
    ``sample_patterns(len(samples), mixture, rng)`` would.

    Args:
        samples: the :class:`~fedprime_core.data.records.Sample` records.
        mixture: ``(3,)`` simulated mixture (complete, text-missing, image-missing).
        rng: randomness of the simulated part.

    Returns:
        ``(patterns, natural)``, both ``(N,)`` int8: the patterns to use and the real ones.
    """
    natural = natural_patterns(samples)
    complete = np.flatnonzero(natural == Pattern.COMPLETE)
    patterns = natural.copy()
    patterns[complete] = sample_patterns(len(complete), mixture, rng)
    return patterns, natural


def missing_counts(patterns: np.ndarray, natural: np.ndarray | None = None) -> dict[str, int]:
    """Pattern counts, and how many of the missing ones are real and how many simulated.

    Returns:
        ``complete``, ``text-missing``, ``image-missing`` (what training sees), then
        ``real-text-missing``, ``real-image-missing`` (missing in the data) and
        ``simulated-text-missing``, ``simulated-image-missing`` (removed by simulation).
    """
    patterns = np.asarray(patterns, dtype=np.int64)
    natural = np.zeros_like(patterns) if natural is None else np.asarray(natural, dtype=np.int64)
    out = pattern_counts(patterns)
    for pattern in (Pattern.TEXT_MISSING, Pattern.IMAGE_MISSING):
        name = PATTERN_NAMES[pattern]
        real = int(np.sum(natural == pattern))
        out[f"real-{name}"] = real
        out[f"simulated-{name}"] = out[name] - real
    return out


def _entry_lines(path: Path) -> dict[str, int]:
    """1-based line of every top-level key of a YAML mapping file (empty if it cannot be composed)."""
    try:
        import yaml

        root = yaml.compose(path.read_text())
    except Exception:  # noqa: BLE001 - only for nicer messages; reading the table reports real errors
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in root.value}


def _number(value: object, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{where}: {name} must be a number, got {value!r}") from None


def _parse_mixture(path: Path, key: object, value: object) -> np.ndarray:
    line = _entry_lines(path).get(str(key))
    where = f"missing-table {str(path)!r}, entry {key!r}" + (f" (line {line})" if line else "")
    if isinstance(value, dict):
        unknown = set(value) - set(PATTERN_NAMES)
        if unknown:
            raise DataError(f"{where}: unknown pattern(s) {sorted(unknown)}; use {PATTERN_NAMES}")
        vec = np.array([_number(value.get(name, 0.0), where, repr(name)) for name in PATTERN_NAMES])
    elif isinstance(value, (list, tuple)) and len(value) == 3:
        vec = np.array(
            [_number(v, where, f"{name!r} (item {i + 1})") for i, (name, v) in enumerate(zip(PATTERN_NAMES, value))]
        )
    else:
        raise DataError(f"{where}: give a mapping over {PATTERN_NAMES} or a list of 3 numbers")
    if not np.all(np.isfinite(vec)) or np.any(vec < 0) or not np.isclose(vec.sum(), 1.0, atol=1e-6):
        raise DataError(f"{where}: proportions must be non-negative and sum to 1, got {vec.tolist()}")
    return vec / vec.sum()


def _read_table(path: Path) -> dict:
    data = read_yaml_mapping(path, "missing-table file", DataError)
    if not data:
        raise DataError(f"missing-table file {str(path)!r} must map client ids to mixtures")
    return data


def check_missing_table(path: str | Path) -> int:
    """Read every entry of a missing table as a site or partition would; returns the number of entries.

    The server calls it before round 1, so a malformed table stops the run there rather
    than failing every client.

    Raises:
        DataError: the file is absent, not YAML, not a mapping, or an entry is not a valid
            mixture; the message names the file, the entry and its line.
    """
    path = Path(path)
    data = _read_table(path)
    for key, value in data.items():
        _parse_mixture(path, key, value)
    return len(data)


def missing_table_entry(path: str | Path, keys: list[str]) -> tuple[np.ndarray, str]:
    """One client's mixture from a missing table, looked up by the first of ``keys`` it lists.

    Site-local clients are named by their ``client-id`` (and their ``partition-id``, when
    they have one); a table may key them by either, with ``default`` for the rest.

    Returns:
        ``((3,) mixture, the key that matched)``.
    """
    path = Path(path)
    data = _read_table(path)
    by_name = {str(k): v for k, v in data.items()}
    for key in [*keys, "default"]:
        if key in by_name:
            return _parse_mixture(path, key, by_name[key]), key
    raise DataError(
        f"missing-table {str(path)!r} has no entry for client {' / '.join(map(repr, keys))} and no 'default'"
    )


def load_missing_table(path: str | Path, num_clients: int) -> np.ndarray:
    """Read an explicit per-client mixture table, ``(num_clients, 3)``.

    The YAML maps client ids (0-based partition ids) to mixtures, either as mappings with
    keys ``complete``, ``text-missing``, ``image-missing`` or as 3-lists in that order;
    a ``default`` entry covers clients not listed::

        default: {complete: 0.3, text-missing: 0.35, image-missing: 0.35}
        0: {complete: 0.1, text-missing: 0.9, image-missing: 0.0}
        1: [0.2, 0.0, 0.8]
    """
    path = Path(path)
    data = _read_table(path)
    default = _parse_mixture(path, "default", data["default"]) if "default" in data else None
    table = np.zeros((num_clients, 3))
    for client in range(num_clients):
        entry = data.get(client, data.get(str(client)))
        if entry is not None:
            table[client] = _parse_mixture(path, client, entry)
        elif default is not None:
            table[client] = default
        else:
            raise DataError(f"missing-table {str(path)!r} has no entry for client {client} and no 'default'")
    extra = [k for k in data if k != "default" and not (str(k).isdigit() and int(k) < num_clients)]
    if extra:
        raise DataError(f"missing-table {str(path)!r} names clients {extra} outside 0..{num_clients - 1}")
    return table


def pattern_counts(patterns: np.ndarray) -> dict[str, int]:
    """``{"complete": n0, "text-missing": n1, "image-missing": n2}``."""
    counts = np.bincount(np.asarray(patterns, dtype=np.int64), minlength=3)
    return {name: int(c) for name, c in zip(PATTERN_NAMES, counts)}

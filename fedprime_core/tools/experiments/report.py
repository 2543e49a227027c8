"""Tables and plots of a plan's finished cells: the main, ablation and comparison tables, robustness and
convergence plots."""

from __future__ import annotations

import csv
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...config import at_profile, profile_keys, with_profile
from ...metrics import CLIENT_TEST_PREFIX
from ...results import top_tau_evaluation
from .plan import (
    BOOKKEEPING_KEYS,
    DEFAULTS,
    TEST_COLUMNS,
    Cell,
    ExtraColumn,
    Plan,
    TableSpec,
    folder_settings_changed,
)
from .significance import detectable_difference, holm, paired_t

LOGGER = logging.getLogger(__name__)
#: Run folders already named as left out (each is named once per process).
_LEFT_OUT: set[Path] = set()
#: (config.json, its mtime_ns and size) -> :func:`~.plan.folder_settings_changed`: a report reads
#: each cell's summary and history, and the folder's config.json once for both.
_CHANGED: dict[tuple[Path, int, int], list[str]] = {}
#: (metrics.json, its mtime_ns and size) -> its records, least recently used first (:func:`_history`).
_HISTORIES: OrderedDict[tuple[Path, int, int], list[dict[str, Any]]] = OrderedDict()
#: Runs whose history is kept: more than any shipped grid has cells.
_HISTORY_CACHE_SIZE = 256

#: The methods of the ablation table, in its row order.
ABLATION_METHODS = ("fedavg-p", "fed-intra", "fed-inter", "fedprime")


def _stands_for(plan: Plan, cell: Cell) -> bool:
    """Whether the cell's run folder may stand for it: not made with other settings (a default changed since).

    A folder that may not is left out of every table and plot, as the runner refuses to reuse it
    (:func:`~.plan.folder_settings_changed`), and a warning names it.
    """
    path = plan.run_dir(cell) / "config.json"
    try:
        stat = path.stat()
    except OSError:
        return True  # no config.json: nothing to compare (folder_settings_changed says the same)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _CHANGED:
        _CHANGED[key] = folder_settings_changed(plan, cell)
    changed = _CHANGED[key]
    if changed and path not in _LEFT_OUT:
        _LEFT_OUT.add(path)
        LOGGER.warning("left out of the report: %s was made with other settings: %s", cell.name, "; ".join(changed))
    return not changed


def _summary(plan: Plan, cell: Cell) -> dict[str, Any] | None:
    path = plan.run_dir(cell) / "summary.json"
    if not path.is_file() or not _stands_for(plan, cell):
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("final") else None


def _history(plan: Plan, cell: Cell) -> list[dict[str, Any]]:
    """The run's per-round records (its metrics.json), read once per version of the file.

    A report reads each run's history for its comparison tables, its curves and its convergence
    plots; the cache is keyed on the file's path, mtime and size, so a run that moved on is read
    again. Callers must not change the records.
    """
    path = plan.run_dir(cell) / "metrics.json"
    try:
        stat = path.stat()
    except OSError:
        return []
    if not _stands_for(plan, cell):
        return []
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key in _HISTORIES:
        _HISTORIES.move_to_end(key)
    else:
        _HISTORIES[key] = json.loads(path.read_text())
        while len(_HISTORIES) > _HISTORY_CACHE_SIZE:
            _HISTORIES.popitem(last=False)
    return _HISTORIES[key]


def _trained_records(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of a run's trained rounds: round 0 (before training) and skipped rounds left out."""
    return [r for r in history if r.get("round", 0) > 0 and not r.get("skipped")]


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.array([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0 or not np.isfinite(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def grid_kind(name: str) -> str:
    """The table a sub-grid feeds: ``main-miss-both`` -> ``main`` (the part before the first '-')."""
    return name.split("-", 1)[0]


def in_kind(cell: Cell, kind: str) -> bool:
    return any(grid_kind(g) == kind for g in cell.grids)


def table_rows(plan: Plan, kind: str, which: str = "final") -> list[dict[str, Any]]:
    """Rows ``(setting, method, eta)`` x test settings, aggregated over seeds and other keys."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for cell in plan.cells:
        if not in_kind(cell, kind):
            continue
        summary = _summary(plan, cell)
        if summary is None:
            continue
        key = (cell.config["missing-setting"], cell.config["method"], cell.config["eta"])
        groups[key].append(summary[which])
    rows = []
    for (setting, method, eta), items in groups.items():
        row: dict[str, Any] = {"train": setting, "method": method, "eta": eta, "seeds": len(items)}
        for test in TEST_COLUMNS:
            mean, std, n = _mean_std([item.get(test) for item in items])
            row[test] = (mean, std, n)
        rows.append(row)
    order = {
        m: i
        for i, m in enumerate(("fedavg-p", "fed-intra", "fed-inter", "pfpt", "fedprox-p", "fedprime", "centralized-p"))
    }
    rows.sort(key=lambda r: (r["train"], r["eta"], order.get(r["method"], 99)))
    return rows


def write_table(rows: list[dict[str, Any]], path_stem: Path, title: str, metric: str) -> None:
    """Markdown and CSV of table rows (percent, mean ± std over seeds)."""
    columns = list(TEST_COLUMNS)
    lines = [
        f"# {title}",
        "",
        f"{metric} (%), final round, mean ± std over seeds; '-' = not run.",
        "",
        "| train | eta | method | seeds | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for row in rows:
        cells = " | ".join(_fmt(*row[c]) for c in columns)
        lines.append(f"| {row['train']} | {row['eta']:g} | {row['method']} | {row['seeds']} | {cells} |")
    path_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(path_stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["train", "eta", "method", "seeds", *(f"{c}_{s}" for c in columns for s in ("mean", "std"))])
        for row in rows:
            writer.writerow(
                [
                    row["train"],
                    row["eta"],
                    row["method"],
                    row["seeds"],
                    *(f"{row[c][i]:.4f}" for c in columns for i in (0, 1)),
                ]
            )


# ---------------------------------------------------------------------------------------
# Comparison tables
# ---------------------------------------------------------------------------------------
def _lookup(record: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (``a/b/c``) in a round record.

    ``eval-top-tau/...`` reads :func:`~fedprime_core.results.top_tau_evaluation`: the round's
    ``eval`` where that is the same model (a method without personal pools, or a pool of at
    most ``tau`` centres), so a column of it covers every method of a table.
    """
    head, _, rest = path.partition("/")
    value: Any = top_tau_evaluation(record) if head == "eval-top-tau" else record.get(head)
    for part in rest.split("/") if rest else ():
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


# ---------------------------------------------------------------------------------------
# Pairs in which both arms ran the same algorithm
# ---------------------------------------------------------------------------------------
#: What a round record's evaluations are compared on (sample counts and losses are not results of the algorithm
#: that float noise leaves alone: a loss may differ in its last bit between two runs of one algorithm).
_EVAL_METRICS = ("accuracy", "macro_f1", "micro_f1")
#: The per-round flag of an align run whose alignment gave exactly what ``position`` would have.
NOOP_FLAG = "inter-align-noop"


def round_results(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What a run computed, round by round: every evaluation's accuracy and F1 per test setting (server-side, with
    the whole pool and the ``tau`` most popular centres; client-side, means and per client), the train loss and
    the pool sizes. Two runs with equal lists (to the bit) ran the same algorithm in effect."""

    def scores(evaluation: Any) -> Any:
        if not isinstance(evaluation, Mapping):
            return None
        return {s: {m: v for m, v in sorted(dict(e).items()) if m in _EVAL_METRICS} for s, e in evaluation.items()}

    def client_scores(values: Any) -> Any:
        if not isinstance(values, Mapping):
            return None
        return {k: v for k, v in sorted(values.items()) if k.removeprefix(CLIENT_TEST_PREFIX) in _EVAL_METRICS}

    out = []
    for record in history:
        row: dict[str, Any] = {"round": record.get("round"), "skipped": bool(record.get("skipped"))}
        row["train-loss"] = record.get("train-loss")
        row.update({k: v for k, v in sorted(record.items()) if k.endswith("-pool-size")})
        row["eval"] = scores(record.get("eval"))
        row["eval-top-tau"] = scores(top_tau_evaluation(record))
        row["client-eval"] = client_scores(record.get("client-eval"))
        per_client = record.get("client-eval-per-client")
        if isinstance(per_client, Mapping):
            row["client-eval-per-client"] = {c: client_scores(v) for c, v in sorted(per_client.items())}
        out.append(row)
    return out


def _alignment_changed_nothing(history: Sequence[Mapping[str, Any]]) -> bool:
    trained = _trained_records(history)
    return bool(trained) and all(r.get(NOOP_FLAG) == 1 for r in trained)


def no_op_pair(
    config_a: Mapping[str, Any],
    history_a: Sequence[Mapping[str, Any]],
    config_b: Mapping[str, Any],
    history_b: Sequence[Mapping[str, Any]],
    values: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> str | None:
    """Why two paired runs are the same algorithm in effect, or ``None`` when they are not (or it cannot be told).

    * ``"identical results"``: every per-round result (:func:`round_results`) is the same to the bit
      (and so are the runs' table ``values``, when given: what a table shows of each run);
    * ``"alignment no-op"``: the runs differ in ``inter-merge`` only (bookkeeping keys aside), and the
      ``align`` run's alignment gave exactly what ``position`` would have in every trained round
      (``inter-align-noop`` = 1 in each), even where float noise makes the results differ.
    """
    results_a, results_b = round_results(history_a), round_results(history_b)

    def computed(results: list[dict[str, Any]]) -> bool:  # a trained round with a loss or an evaluation
        return any(r["round"] and (r["train-loss"] is not None or r["eval"] or r["client-eval"]) for r in results)

    if not computed(results_a) or not computed(results_b):
        return None
    same_values = values is None or json.dumps(values[0], sort_keys=True) == json.dumps(values[1], sort_keys=True)
    if same_values and json.dumps(results_a) == json.dumps(results_b):
        return "identical results"
    differing = {
        k for k in set(config_a) | set(config_b) if k not in BOOKKEEPING_KEYS and config_a.get(k) != config_b.get(k)
    }
    if differing and differing <= {"inter-merge", *ALIGNMENT_ONLY_KEYS} and "inter-merge" in differing:
        align = history_a if config_a.get("inter-merge") == "align" else history_b
        if _alignment_changed_nothing(align):
            return "alignment no-op"
    return None


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and bool(np.isfinite(value))


def clients_value(record: Mapping[str, Any], metric: str, clients: Sequence[str]) -> float | None:
    """The sample-weighted mean of ``metric`` over ``clients`` in one round's client-side evaluation.

    Reads ``client-eval-per-client`` (client id -> its metrics) and weighs each client's ``metric``
    by its ``test-num-examples`` for a ``test-*`` metric, by its ``num-examples`` otherwise: the
    weighting of the round's ``client-eval`` means, restricted to ``clients``.

    Returns:
        The mean, or ``None`` when the round has no such evaluation or lacks one of ``clients``
        (a mean over some of a group's clients is not comparable between runs).
    """
    per_client = record.get("client-eval-per-client")
    if not isinstance(per_client, Mapping):
        return None
    weight_key = "test-num-examples" if metric.startswith(CLIENT_TEST_PREFIX) else "num-examples"
    total = weighted = 0.0
    for client in clients:
        scores = per_client.get(client)
        if not isinstance(scores, Mapping):
            return None
        value, weight = scores.get(metric), scores.get(weight_key)
        if not _finite(value) or not _finite(weight) or weight <= 0:
            return None
        total += float(weight)
        weighted += float(weight) * float(value)
    return weighted / total


def _round_value(record: Mapping[str, Any], column: ExtraColumn, scaled: bool = True) -> float | None:
    """One round's value of a column (``per`` applied, and ``scale`` if ``scaled``), ``None`` if absent.

    A column with ``clients`` reads :func:`clients_value` (those clients' weighted mean) instead of
    the round's recorded mean over every client.
    """
    if column.clients is not None:
        value = clients_value(record, column.key.removeprefix("client-eval/"), column.clients)
        return None if value is None else value * (column.scale if scaled else 1.0)
    value = _lookup(record, column.key)
    if not _finite(value):
        return None
    if column.per is not None:
        per = _lookup(record, column.per)
        if isinstance(per, bool) or not isinstance(per, (int, float)) or per == 0:
            return None
        value = value / per
    return float(value) * (column.scale if scaled else 1.0)


def _recorded(
    history: Sequence[Mapping[str, Any]], column: ExtraColumn, scaled: bool = True
) -> list[tuple[Mapping[str, Any], float]]:
    """``(record, value)`` of each trained round of a run that recorded ``column`` (:func:`_round_value`), in order."""
    return [
        (record, value)
        for record in _trained_records(history)
        for value in (_round_value(record, column, scaled),)
        if value is not None
    ]


def extra_value(history: Sequence[Mapping[str, Any]], column: ExtraColumn) -> float | None:
    """One run's value of an extra column, from its round records (``None`` if no round has it)."""
    values = [value for _, value in _recorded(history, column, scaled=False)]
    if not values:
        return None
    reduce = {"mean": np.mean, "final": lambda v: v[-1], "sum": np.sum, "max": np.max, "min": np.min}[column.over]
    return float(reduce(values)) * column.scale


def _table_cells(plan: Plan, table: TableSpec) -> list[Cell]:
    return [c for c in plan.cells if set(c.grids) & set(table.grids)]


def _differing_keys(cells: Sequence[Cell], skip: Sequence[str] = ("seed",)) -> list[str]:
    """Run-config keys (``skip`` aside) that take more than one value among ``cells``.

    Keys that differ only because ``comm-profile`` does are left out: the profile names them.
    """
    keys = [k for k in cells[0].config if k not in skip] if cells else []
    varying = [k for k in keys if len({json.dumps(c.config.get(k)) for c in cells}) > 1]
    if "comm-profile" in varying:
        varying = [k for k in varying if k not in profile_keys() or not all(at_profile(c.config, k) for c in cells)]
    return varying


def varying_keys(plan: Plan, table: TableSpec) -> list[str]:
    """Run-config keys (seed and the table's ``pool`` keys excepted) that take more than one value among its cells."""
    varying = _differing_keys(_table_cells(plan, table), skip=("seed", *table.pool))
    ordered = [k for k in table.axes if k in varying]
    return ordered + sorted(k for k in varying if k not in ordered)


def _run_values(plan: Plan, cell: Cell, table: TableSpec) -> dict[str, float | None] | None:
    summary = _summary(plan, cell)
    if summary is None:
        return None
    row = summary[table.round]
    values: dict[str, float | None] = {
        test: None if row.get(test) is None else 100.0 * float(row[test]) for test in TEST_COLUMNS
    }
    history = _history(plan, cell)
    for column in table.extra:
        values[column.title] = extra_value(history, column)
    return values


def _stats(values: Sequence[float | None], interval: bool = False) -> dict[str, float]:
    from scipy import stats

    arr = np.array([v for v in values if v is not None], dtype=float)
    out = {"n": float(arr.size), "mean": float("nan"), "std": float("nan"), "lo": float("nan"), "hi": float("nan")}
    if arr.size:
        out["mean"] = float(arr.mean())
        out["std"] = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    if interval and arr.size > 1:
        half = float(stats.t.ppf(0.975, arr.size - 1)) * out["std"] / np.sqrt(arr.size)
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


ALIGNMENT_ONLY_KEYS = ("align-start", "align-on")
"""Keys that only an ``inter-merge = align`` run may set away from their defaults."""


def _twin(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """The configuration a difference pairs ``config`` with: the same, except ``key = value``.

    For ``comm-profile`` the keys the profile sets move with it (:func:`~fedprime_core.config.with_profile`),
    so a ``lean`` run pairs with the ``paper`` run of the same seed and settings. For
    ``inter-merge = position`` the alignment-only keys (``align-start``, ``align-on``) return to
    their defaults, which is what a position run must hold: every alignment regime pairs with the
    position run of the same inter-init, seed and settings.
    """
    if key == "comm-profile":
        return with_profile(config, value)
    if key == "inter-merge" and value == "position":
        return {**config, key: value, **{k: DEFAULTS[k] for k in ALIGNMENT_ONLY_KEYS if k in config}}
    return {**config, key: value}


def comparison(plan: Plan, table: TableSpec) -> dict[str, Any]:
    """The numbers of one comparison table: value rows and paired-difference rows.

    Returns:
        ``{"keys": [...], "columns": [...], "rows": [...], "differences": [...]}``; each row
        holds its key values, ``runs`` and per column ``{"n", "mean", "std", "lo", "hi"}``. A
        difference row also holds ``noop`` (how many of its pairs ran the same algorithm in
        both arms, :func:`no_op_pair`) and ``differing`` (the per-column statistics over the
        other pairs).
    """
    keys = varying_keys(plan, table)
    columns = [*TEST_COLUMNS, *(c.title for c in table.extra)]
    cells = _table_cells(plan, table)
    values = {c.name: _run_values(plan, c, table) for c in cells}
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(tuple(json.dumps(cell.config[k]) for k in keys), []).append(cell)
    rows = []
    for group, members in groups.items():
        done = [values[c.name] for c in members if values[c.name] is not None]
        row: dict[str, Any] = {"key": dict(zip(keys, (json.loads(v) for v in group))), "runs": len(done)}
        row["stats"] = {col: _stats([v[col] for v in done]) for col in columns}
        rows.append(row)
    differences = []
    by_config = {json.dumps(c.config, sort_keys=True): c for c in cells}
    for diff in table.differences:
        other_keys = [k for k in keys if k not in diff.keys]
        paired: dict[tuple, list[tuple[dict, dict, str | None]]] = {}
        for cell in cells:
            if any(cell.config[k] != v for k, v in diff.values.items()):
                continue
            twin = cell.config  # _twin returns a new mapping
            for key, minus in diff.minuses.items():
                twin = _twin(twin, key, minus)
            partner = by_config.get(json.dumps(twin, sort_keys=True))
            if partner is None or values[cell.name] is None or values[partner.name] is None:
                continue
            group = tuple(json.dumps(cell.config[k]) for k in other_keys)
            noop = no_op_pair(
                cell.config,
                _history(plan, cell),
                partner.config,
                _history(plan, partner),
                (values[cell.name], values[partner.name]),
            )
            paired.setdefault(group, []).append((values[cell.name], values[partner.name], noop))
        for group, pairs in paired.items():
            row = {"key": dict(zip(other_keys, (json.loads(v) for v in group))), "runs": len(pairs), "diff": diff}

            def stats(chosen: list[tuple[dict, dict, str | None]]) -> dict[str, dict[str, float]]:
                return {
                    col: _stats(
                        [None if a[col] is None or b[col] is None else a[col] - b[col] for a, b, _ in chosen],
                        interval=True,
                    )
                    for col in columns
                }

            row["stats"] = stats(pairs)
            row["noop"] = sum(noop is not None for _, _, noop in pairs)
            row["differing"] = stats([pair for pair in pairs if pair[2] is None])
            differences.append(row)
    return {"keys": keys, "columns": columns, "rows": rows, "differences": differences}


#: The curve every table gets: the clients' mean training loss of each round.
TRAIN_LOSS_CURVE = ExtraColumn(key="train-loss", over="final", label="train loss")


def _finished_groups(plan: Plan, table: TableSpec) -> tuple[list[str], dict[tuple, list[Cell]]]:
    """The table's finished runs grouped as its value rows are: ``(keys, {group: cells})``.

    ``keys`` are :func:`varying_keys`; a group is the JSON text of each key's value (seeds pooled),
    in the order the table's cells first show it.
    """
    keys = varying_keys(plan, table)
    groups: dict[tuple, list[Cell]] = {}
    for cell in _table_cells(plan, table):
        if _summary(plan, cell) is not None:
            groups.setdefault(tuple(json.dumps(cell.config[k]) for k in keys), []).append(cell)
    return keys, groups


def table_curves(plan: Plan, table: TableSpec) -> dict[str, Any]:
    """Per-round curves of a comparison table's arms: the train loss and every ``over: final`` column.

    An ``over: final`` extra column is a per-round metric read at the last round (an accuracy, a
    pool size), so its rounds show whether the table's final value had levelled off (a train-loss
    column is the first curve already and is not drawn twice). Runs group
    as the table's value rows do (:func:`varying_keys`, seeds pooled). Only finished runs count,
    as in the table.

    Returns:
        ``{"keys": [...], "columns": [titles], "curves": [{"key": {...}, "column": title,
        "rounds": [...], "mean": [...], "std": [...], "n": [...]}, ...]}``; per round, the mean
        and sample std (0 for one run) over the group's runs that recorded the column in that
        round, and how many did.
    """
    keys, groups = _finished_groups(plan, table)
    same = (TRAIN_LOSS_CURVE.key, TRAIN_LOSS_CURVE.per, TRAIN_LOSS_CURVE.scale)
    columns = [TRAIN_LOSS_CURVE, *(c for c in table.extra if c.over == "final" and (c.key, c.per, c.scale) != same)]
    curves = []
    for group, members in groups.items():
        histories = [_history(plan, c) for c in members]
        for column in columns:
            by_round: dict[int, list[float]] = defaultdict(list)
            for history in histories:
                for record, value in _recorded(history, column):
                    by_round[int(record["round"])].append(value)
            if not by_round:
                continue
            rounds = sorted(by_round)
            stats = [_stats(by_round[r]) for r in rounds]
            curves.append(
                {
                    "key": dict(zip(keys, (json.loads(v) for v in group))),
                    "column": column.title,
                    "rounds": rounds,
                    "mean": [st["mean"] for st in stats],
                    "std": [st["std"] for st in stats],
                    "n": [int(st["n"]) for st in stats],
                }
            )
    return {"keys": keys, "columns": [c.title for c in columns], "curves": curves}


def write_table_curves(plan: Plan, table: TableSpec) -> list[Path]:
    """``<output>/<table>_curves.csv`` (long format) and ``.png`` (one panel per column, mean ± std band)."""
    data = table_curves(plan, table)
    if not data["curves"]:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = data["keys"]
    stem = plan.output / f"{table.name}_curves"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "column", "round", "n", "mean", "std"])
        for curve in data["curves"]:
            for r, n, mean, std in zip(curve["rounds"], curve["n"], curve["mean"], curve["std"]):
                writer.writerow([*(curve["key"][k] for k in keys), curve["column"], r, n, f"{mean:.6g}", f"{std:.6g}"])
    columns = [c for c in data["columns"] if any(cv["column"] == c for cv in data["curves"])]
    across = min(len(columns), 4)  # panels per row: a table with many columns wraps instead of widening
    down = -(-len(columns) // across)
    fig, axes = plt.subplots(down, across, figsize=(5.2 * across, 4 * down), squeeze=False)
    panels = axes.ravel()
    for ax in panels[len(columns) :]:
        ax.set_visible(False)
    for ax, column in zip(panels, columns):
        for curve in (cv for cv in data["curves"] if cv["column"] == column):
            label = " ".join(f"{k}={curve['key'][k]}" for k in keys) or "all runs"
            mean, std = np.array(curve["mean"]), np.array(curve["std"])
            (line,) = ax.plot(curve["rounds"], mean, marker=".", label=f"{label} (n={max(curve['n'])})")
            ax.fill_between(curve["rounds"], mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set(title=column, xlabel="round")
    panels[len(columns) - 1].legend(fontsize=7)
    fig.suptitle(f"{plan.name}: {table.name}, per round (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return [stem.with_suffix(".csv"), stem.with_suffix(".png")]


def _num(value: float, scientific: bool) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.3g}" if scientific else f"{value:.2f}"


def _cell_text(stat: Mapping[str, float], interval: bool = False) -> str:
    """``mean ± std [lo, hi]``, all in the mean's format (2 decimals, or 3 significant digits for
    means below 0.01 or from 10,000 up), so a std of float noise reads 0.00."""
    if stat["n"] == 0:
        return "-"
    mean = stat["mean"]
    scientific = abs(mean) >= 1e4 or 0 < abs(mean) < 0.01
    text = f"{_num(mean, scientific)} ± {_num(stat['std'], scientific)}" if stat["n"] > 1 else _num(mean, scientific)
    if interval and np.isfinite(stat["lo"]):
        text += f" [{_num(stat['lo'], scientific)}, {_num(stat['hi'], scientific)}]"
    return text


def verdict(test: Mapping[str, Any], margin: float, level: float = 0.05) -> str:
    """The reading rule for one test row, declared before a study is read, applied mechanically.

    * ``higher`` / ``lower``: the Holm-adjusted p is under ``level``; the first arm minus the
      second is positive / negative. ``(under the margin)`` is added when the mean difference
      is smaller than ``margin`` in size: significant, but smaller than what was worth finding.
    * ``no difference of <margin> or more``: not significant, and the 95% interval lies inside
      ``(-margin, +margin)``.
    * ``inconclusive``: not significant, and the interval reaches past either bound (so neither
      a difference nor its absence at the margin is shown; the interval says how wide).
    * ``untested``: fewer than 2 pairs, or no spread to test with.
    """
    holm_p, mean, lo, hi = (float(test[k]) for k in ("holm", "mean", "lo", "hi"))
    if not np.isfinite(holm_p):
        return "untested"
    if holm_p < level:
        word = "higher" if mean > 0 else "lower"
        return word + (" (under the margin)" if abs(mean) < margin else "")
    if np.isfinite(lo) and np.isfinite(hi) and -margin < lo and hi < margin:
        return f"no difference of {margin:g} or more"
    return "inconclusive"


def primary_tests(data: Mapping[str, Any], table: TableSpec, power: float = 0.8) -> list[dict[str, Any]]:
    """Each difference row of :func:`comparison` tested on ``table.primary``: paired t and Holm.

    Returns one dict per difference row: ``difference`` (its title), ``group``, ``n`` pairs,
    ``noop``, ``mean``, ``lo``/``hi`` (95% t interval), ``t``, two-sided ``p`` and ``holm`` (Holm's
    adjustment over all the rows), as :func:`paired_t` computes them (nan with fewer than 2 pairs);
    and ``detectable``: the smallest true difference the row's pairs detect with ``power`` at its sd
    and at ``alpha`` = 0.05 / (the rows in the Holm family), Holm's first step
    (:func:`~.significance.detectable_difference`), so a row whose spread came out wide reads as the
    weaker test it is; with ``table.margin``, ``verdict`` (:func:`verdict`).
    """
    tests = []
    for row in data["differences"]:
        stat = row["stats"][table.primary]
        n, mean, sd = int(stat["n"]), stat["mean"], stat["std"]
        t, p = paired_t(n, mean, sd)
        test = {"difference": row["diff"].title, "group": row["key"], "n": n, "noop": int(row["noop"])}
        tests.append({**test, "mean": mean, "sd": sd, "lo": stat["lo"], "hi": stat["hi"], "t": t, "p": p})
    family = sum(1 for test in tests if np.isfinite(test["p"])) or 1
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["holm"] = adjusted
        test["alpha"] = 0.05 / family
        test["detectable"] = detectable_difference(test["sd"], test["n"], power, test["alpha"])
        if table.margin is not None:
            test["verdict"] = verdict(test, table.margin)
    return tests


def levelling(plan: Plan, table: TableSpec) -> list[dict[str, Any]]:
    """Whether each arm of ``table`` had levelled off on its primary column (``table.level_off``).

    Per finished run, the gain of the primary column (an ``over: final`` extra column, scaled)
    between the last two rounds that recorded it (e.g. rounds 15 and 20 of a run that evaluates
    every 5 rounds); per arm (the table's value rows, seeds pooled), the mean and sample sd of
    those gains. An arm whose mean gain is under ``table.level_off`` has levelled off.

    Returns:
        one dict per arm, in the table's row order: ``key`` (its varying keys), ``runs`` (finished
        runs with two such rounds), ``rounds`` (the distinct ``(from, to)`` round pairs, one when
        every run evaluated alike), ``mean`` and ``std`` of the gain, and ``levelled`` (bool).
        Empty when the table declares no ``level-off``.
    """
    if table.level_off is None or table.primary is None:
        return []
    column = next(e for e in table.extra if e.title == table.primary)
    keys, groups = _finished_groups(plan, table)
    out = []
    for group, members in groups.items():
        runs = []  # ((from, to), gain) of each run with two rounds that recorded the column
        for cell in members:
            values = {int(record["round"]): value for record, value in _recorded(_history(plan, cell), column)}
            if len(values) >= 2:
                before, last = sorted(values)[-2:]
                runs.append(((before, last), values[last] - values[before]))
        if not runs:
            continue
        stat = _stats([gain for _, gain in runs])
        out.append(
            {
                "key": dict(zip(keys, (json.loads(v) for v in group))),
                "runs": len(runs),
                "rounds": sorted({pair for pair, _ in runs}),
                "mean": stat["mean"],
                "std": stat["std"],
                "levelled": bool(stat["mean"] < table.level_off),
            }
        )
    return out


def _levelling_lines(plan: Plan, table: TableSpec) -> list[str]:
    """The ``Levelling off`` section of ``<table>.md``; writes ``<table>_levelling.csv`` beside it."""
    if table.level_off is None:
        return []
    rows = levelling(plan, table)
    keys = varying_keys(plan, table)
    lines = [
        "",
        f"## Levelling off on {table.primary}",
        "",
        f"Per run, the gain of {table.primary} between the last two rounds that recorded it; per arm, the mean "
        f"± std over its finished runs. Levelled off: a mean gain under {table.level_off:g}.",
        "",
        "| " + " | ".join([*keys, "runs", "rounds", "gain", "levelled off"]) + " |",
        "|---" * (len(keys) + 4) + "|",
    ]
    with open(plan.output / f"{table.name}_levelling.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "runs", "rounds", "gain_mean", "gain_std", "threshold", "levelled_off"])
        for row in rows:
            rounds = "; ".join(f"{a}->{b}" for a, b in row["rounds"])
            gain = _cell_text({"n": row["runs"], "mean": row["mean"], "std": row["std"]})
            verdict = "yes" if row["levelled"] else "no"
            cells = [*(str(row["key"][k]) for k in keys), str(row["runs"]), rounds, gain, verdict]
            lines.append("| " + " | ".join(cells) + " |")
            writer.writerow(
                [
                    *(row["key"][k] for k in keys),
                    row["runs"],
                    rounds,
                    f"{row['mean']:.6g}",
                    f"{row['std']:.6g}",
                    f"{table.level_off:g}",
                    verdict,
                ]
            )
    if not rows:
        lines.append("| " + " | ".join(["-"] * (len(keys) + 4)) + " |")
    return lines


def _p_text(value: float, fmt: str = "{:.4f}") -> str:
    return "-" if np.isnan(value) else fmt.format(value)


def run_checks(plan: Plan, table: TableSpec) -> list[str]:
    """What could make a table's finished runs unlike each other, found in their round records.

    Two checks, on every finished run of the table (no accuracy is read, only where values come
    from and how many clients gave them):

    * an ``over: final`` column whose last recorded value comes from an earlier round than the
      run's last round (e.g. the final round's evaluation is missing, so round 15's would stand
      for round 20's);
    * a ``client-eval/...`` column whose final value covers fewer clients in some runs than in
      others (a client whose evaluation failed is left out of the mean, and which clients fail
      may depend on the method).

    Returns:
        One sentence per finding (empty when every run passes); each is also logged.
    """
    notes: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for cell in _table_cells(plan, table):
        if _summary(plan, cell) is None:
            continue
        history = _history(plan, cell)
        if not history:
            continue
        last = max(int(r.get("round", 0)) for r in history)
        for column in table.extra:
            if column.over != "final":
                continue
            recorded = _recorded(history, column)
            if not recorded:
                continue
            used = recorded[-1][0]
            if int(used["round"]) != last:
                notes.append(
                    f"{cell.name}: '{column.title}' comes from round {used['round']}, not from the run's last "
                    f"round {last} (that round recorded no value)"
                )
            per_client = used.get("client-eval-per-client") if column.key.startswith("client-eval/") else None
            if isinstance(per_client, Mapping):
                counts.setdefault(column.title, {})[cell.name] = len(per_client)
    for title, by_run in counts.items():
        usual = max(by_run.values())
        fewer = {name: n for name, n in sorted(by_run.items()) if n < usual}
        if fewer:
            listed = ", ".join(f"{name} ({n})" for name, n in fewer.items())
            notes.append(
                f"'{title}': client-side evaluation covered {usual} clients in {len(by_run) - len(fewer)} runs "
                f"and fewer in {len(fewer)}: {listed}"
            )
    for note in notes:
        LOGGER.warning("%s, table %s: %s", plan.name, table.name, note)
    return notes


def _check_lines(plan: Plan, table: TableSpec) -> list[str]:
    """The md section of :func:`run_checks` (what was checked, and what it found)."""
    notes = run_checks(plan, table)
    lines = [
        "",
        "## Checks",
        "",
        "Each finished run's 'final' values come from its last round, and each client-side column covers as "
        "many clients in every run: "
        + ("yes." if not notes else f"no, {len(notes)} finding{'s' * (len(notes) != 1)}:"),
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return lines


def write_comparison(plan: Plan, table: TableSpec) -> dict[str, Any]:
    """``<output>/<table>.md`` and ``.csv`` (long format: one line per row and column)."""
    data = comparison(plan, table)
    keys, columns = data["keys"], data["columns"]
    which = "final round" if table.round == "final" else "best-validation round"
    lines = [
        f"# {plan.name}: {table.name}",
        "",
        f"Sub-grid(s) {', '.join(table.grids)}. {plan.metric} (%) at the {which}, mean ± std over seeds "
        "(runs = finished seeds); extra columns: mean ± std over seeds of each run's value."
        + (
            f" Pooled over {', '.join(table.pool)}: a row holds runs at every value of it, a pair both arms at one."
            if table.pool
            else ""
        ),
        "",
        "| " + " | ".join([*keys, "runs", *columns]) + " |",
        "|---" * (len(keys) + 1 + len(columns)) + "|",
    ]
    for row in data["rows"]:
        cells = [str(row["key"][k]) for k in keys] + [str(row["runs"])]
        cells += [_cell_text(row["stats"][c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    for diff in table.differences:
        rows = [r for r in data["differences"] if r["diff"] == diff]
        other = [k for k in keys if k not in diff.keys]
        lines += [
            "",
            f"## Paired differences: {diff.title}",
            "",
            "Matched on seed and every other key; mean ± std [95% t confidence interval] over the pairs. "
            "No-op pairs: both arms ran the same algorithm in effect (every per-round result identical to the bit, "
            "or, for inter-merge, an alignment that changed nothing in any round); the 'differing' row leaves "
            "them out.",
            "",
            "| " + " | ".join([*other, "pairs used", "pairs", "no-op pairs", *columns]) + " |",
            "|---" * (len(other) + 3 + len(columns)) + "|",
        ]
        for row in rows:
            keys_text = [str(row["key"][k]) for k in other]
            for used, stats, count in (
                ("all", row["stats"], row["runs"]),
                ("differing", row["differing"], row["runs"] - row["noop"]),
            ):
                cells = [*keys_text, used, str(count), str(row["noop"])]
                cells += [_cell_text(stats[c], interval=True) for c in columns]
                lines.append("| " + " | ".join(cells) + " |")
        if not rows:
            lines.append("| " + " | ".join(["-"] * (len(other) + 3 + len(columns))) + " |")
    stem = plan.output / table.name
    if table.primary is not None:
        tests = primary_tests(data, table)
        unpaired = [d.title for d in table.differences if not any(r["diff"] == d for r in data["differences"])]
        lines += [
            "",
            f"## Tests on {table.primary}: paired t, Holm over the {len(tests)} comparisons",
            "",
            *(
                [f"Declared but without finished pairs yet (not in the adjustment): {'; '.join(unpaired)}.", ""]
                if unpaired
                else []
            ),
            "Two-sided paired t test of each difference row (all its pairs, no-op pairs included: they are "
            "comparisons of the methods as run) on the table's primary column; Holm's step-down adjustment "
            "over every row of this section.",
            "",
            "'detectable (80%)' is the smallest true difference each row could detect with 80% power at its "
            "pairs' sd, at alpha 0.05 / (the rows tested), Holm's first step.",
            *(
                [
                    "",
                    f"'verdict' applies the table's reading rule at its margin of {table.margin:g}: higher or lower "
                    "when Holm p < 0.05 ('under the margin' when the mean difference is smaller than it); 'no "
                    f"difference of {table.margin:g} or more' when not significant and the 95% interval lies inside "
                    f"(-{table.margin:g}, +{table.margin:g}); otherwise inconclusive.",
                ]
                if table.margin is not None
                else []
            ),
            "",
            "| difference | group | pairs | no-op pairs | mean [95% CI] | t | p | Holm p | detectable (80%) |"
            + (" verdict |" if table.margin is not None else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if table.margin is not None else ""),
        ]
        for test in tests:
            group = ", ".join(f"{k}={v}" for k, v in test["group"].items()) or "-"
            interval = f"{test['mean']:+.2f} [{test['lo']:+.2f}, {test['hi']:+.2f}]"
            figures = [_p_text(test["t"], "{:+.2f}"), _p_text(test["p"]), _p_text(test["holm"])]
            figures.append(_p_text(test["detectable"], "{:.2f}"))
            if "verdict" in test:
                figures.append(test["verdict"])
            cells = [test["difference"], group, str(test["n"]), str(test["noop"]), interval, *figures]
            lines.append("| " + " | ".join(cells) + " |")
        with open(plan.output / f"{table.name}_tests.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "difference",
                    "group",
                    "column",
                    "n",
                    "noop_pairs",
                    "mean",
                    "ci95_low",
                    "ci95_high",
                    "t",
                    "p",
                    "holm_p",
                    "alpha",
                    "detectable_80",
                    *(["verdict"] if table.margin is not None else []),
                ]
            )
            for test in tests:
                group = ";".join(f"{k}={v}" for k, v in test["group"].items())
                figures = (f"{test[x]:.6g}" for x in ("mean", "lo", "hi", "t", "p", "holm", "alpha", "detectable"))
                verdicts = [test["verdict"]] if "verdict" in test else []
                writer.writerow(
                    [test["difference"], group, table.primary, test["n"], test["noop"], *figures, *verdicts]
                )
    lines += _levelling_lines(plan, table)
    lines += _check_lines(plan, table)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", *keys, "column", "n", "mean", "std", "ci95_low", "ci95_high", "noop_pairs"])
        for kind, rows, part in (
            ("value", data["rows"], "stats"),
            ("difference", data["differences"], "stats"),
            ("difference-differing", data["differences"], "differing"),
        ):
            for row in rows:
                key_cells = [
                    f"{row['diff'].values[k]} - {row['diff'].minuses[k]}"
                    if kind != "value" and k in row["diff"].keys
                    else row["key"].get(k, "")
                    for k in keys
                ]
                noop = row["noop"] if kind != "value" else ""
                for col in columns:
                    st = row[part][col]
                    figures = (f"{st[x]:.6g}" for x in ("mean", "std", "lo", "hi"))
                    writer.writerow([kind, *key_cells, col, int(st["n"]), *figures, noop])
    return data


def _plot_robustness(plan: Plan, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    with open(path.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "eta", "same-as-train_mean", "same-as-train_std", "full-modal_mean", "seeds"])
        for method in sorted({r["method"] for r in rows}):
            points = sorted(
                (r["eta"], r["same-as-train"], r["full-modal"], r["seeds"]) for r in rows if r["method"] == method
            )
            etas = [p[0] for p in points]
            means = [100 * p[1][0] for p in points]
            stds = [100 * p[1][1] for p in points]
            ax.errorbar(etas, means, yerr=stds, marker="o", capsize=3, label=method)
            for p in points:
                writer.writerow([method, p[0], f"{p[1][0]:.4f}", f"{p[1][1]:.4f}", f"{p[2][0]:.4f}", p[3]])
    ax.set(
        xlabel="missing rate eta (train and test, miss-both)",
        ylabel=f"{plan.metric} (%)",
        title="Robustness to the missing rate",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_label(cell: Cell, group: Sequence[Cell]) -> str:
    """``method`` plus ``key=value`` for every key but the seed in which ``group``'s cells differ.

    Keys that differ only because ``comm-profile`` does are left out (the profile names them).
    """
    varying = _differing_keys(group, skip=("seed", "method"))
    return " ".join([cell.config["method"], *(f"{k}={cell.config[k]}" for k in varying)])


def _plot_convergence(plan: Plan, path_for: callable) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Train loss of every round; validation metric of the rounds the server evaluated
    # (every ``eval-every`` rounds and the last). One curve per method and per value of any
    # other key its cells vary in (a profile, a backbone, an ablated option), averaged over
    # seeds only.
    # Cells only in robustness sub-grids (swept over eta) have their own plot.
    cells = [
        c
        for c in plan.cells
        if (c.config["method"] != "centralized-p" or in_kind(c, "main"))
        and not all(grid_kind(g) == "robustness" for g in c.grids)
    ]
    groups: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.config["missing-setting"], cell.config["method"])].append(cell)
    losses: dict[tuple[str, str], list[dict[int, float]]] = defaultdict(list)
    scores: dict[tuple[str, str], list[dict[int, float]]] = defaultdict(list)
    for cell in cells:
        history = [r for r in _history(plan, cell) if r["round"] > 0 and not r.get("skipped")]
        if not history:
            continue
        key = (
            cell.config["missing-setting"],
            curve_label(cell, groups[(cell.config["missing-setting"], cell.config["method"])]),
        )
        losses[key].append({r["round"]: r.get("train-loss", np.nan) for r in history})
        scores[key].append(
            {r["round"]: r["eval"].get("val", {}).get(plan.metric, np.nan) for r in history if r.get("eval")}
        )

    def mean_curve(runs: list[dict[int, float]]) -> tuple[list[int], list[float]]:
        rounds = sorted({k for run in runs for k in run})

        def mean(values: list[float]) -> float:  # nan, without numpy's warning, when every value is nan
            finite = [v for v in values if not np.isnan(v)]
            return float(np.mean(finite)) if finite else float("nan")

        return rounds, [mean([run[k] for run in runs if k in run]) for k in rounds]

    written = []
    for setting in sorted({s for s, _ in losses}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (s, method), runs in sorted(losses.items()):
            if s != setting:
                continue
            axes[0].plot(*mean_curve(runs), marker=".", label=method)
            rounds, val = mean_curve(scores[(s, method)])
            axes[1].plot(rounds, [100 * v for v in val], marker=".", label=method)
        axes[0].set(title="train loss", xlabel="round")
        axes[1].set(title=f"validation {plan.metric} (%)", xlabel="round")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Convergence, training setting {setting} (mean over seeds)")
        fig.tight_layout()
        path = path_for(setting)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(plan: Plan) -> dict[str, Any]:
    """Tables and plots from whatever cells have finished so far."""
    plan.output.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    grids = {grid_kind(g) for c in plan.cells for g in c.grids}
    if "main" in grids:
        rows = table_rows(plan, "main")
        write_table(rows, plan.output / "main_table", f"{plan.name}: main results", plan.metric)
        out["main"] = len(rows)
    if "ablation" in grids:
        rows = [r for r in table_rows(plan, "ablation") if r["method"] in ABLATION_METHODS]
        write_table(rows, plan.output / "ablation_table", f"{plan.name}: ablation", plan.metric)
        out["ablation"] = len(rows)
    if "robustness" in grids:
        rows = table_rows(plan, "robustness")
        if rows:
            _plot_robustness(plan, rows, plan.output / "robustness.png")
        out["robustness"] = len(rows)
    out["convergence"] = [str(p) for p in _plot_convergence(plan, lambda s: plan.output / f"convergence_{s}.png")]
    for table in plan.tables:
        out[table.name] = len(write_comparison(plan, table)["rows"])
        out[f"{table.name}_curves"] = [str(p) for p in write_table_curves(plan, table)]
    return out

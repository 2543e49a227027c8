"""Tables and plots of a plan's finished cells: the main, ablation and comparison tables, robustness and
convergence plots."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...config import at_profile, profile_keys, with_profile
from ...data.missing import TEST_SETTINGS
from .plan import Cell, ExtraColumn, Plan, TableSpec

#: The methods of the ablation table, in its row order.
ABLATION_METHODS = ("fedavg-p", "fed-intra", "fed-inter", "fedprime")


def _summary(plan: Plan, cell: Cell) -> dict[str, Any] | None:
    path = plan.runs_dir / cell.name / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("final") else None


def _history(plan: Plan, cell: Cell) -> list[dict[str, Any]]:
    path = plan.runs_dir / cell.name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


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
        for test in (*TEST_SETTINGS, "val"):
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
    columns = [*TEST_SETTINGS, "val"]
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
    value: Any = record
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def extra_value(history: Sequence[Mapping[str, Any]], column: ExtraColumn) -> float | None:
    """One run's value of an extra column, from its round records (``None`` if no round has it)."""
    values = []
    for record in history:
        if record.get("round", 0) <= 0 or record.get("skipped"):
            continue
        value = _lookup(record, column.key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            continue
        if column.per is not None:
            per = _lookup(record, column.per)
            if isinstance(per, bool) or not isinstance(per, (int, float)) or per == 0:
                continue
            value = value / per
        values.append(float(value))
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
    """Run-config keys (seed excepted) that take more than one value among the table's cells."""
    varying = _differing_keys(_table_cells(plan, table))
    ordered = [k for k in table.axes if k in varying]
    return ordered + sorted(k for k in varying if k not in ordered)


def _run_values(plan: Plan, cell: Cell, table: TableSpec) -> dict[str, float | None] | None:
    summary = _summary(plan, cell)
    if summary is None:
        return None
    row = summary[table.round]
    values: dict[str, float | None] = {
        test: None if row.get(test) is None else 100.0 * float(row[test]) for test in (*TEST_SETTINGS, "val")
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


def _twin(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """The configuration a difference pairs ``config`` with: the same, except ``key = value``.

    For ``comm-profile`` the keys the profile sets move with it (:func:`~fedprime_core.config.with_profile`),
    so a ``lean`` run pairs with the ``paper`` run of the same seed and settings.
    """
    if key == "comm-profile":
        return with_profile(config, value)
    return {**config, key: value}


def comparison(plan: Plan, table: TableSpec) -> dict[str, Any]:
    """The numbers of one comparison table: value rows and paired-difference rows.

    Returns:
        ``{"keys": [...], "columns": [...], "rows": [...], "differences": [...]}``; each row
        holds its key values, ``runs`` and per column ``{"n", "mean", "std", "lo", "hi"}``.
    """
    keys = varying_keys(plan, table)
    columns = [*TEST_SETTINGS, "val", *(c.title for c in table.extra)]
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
        other_keys = [k for k in keys if k != diff.key]
        paired: dict[tuple, list[tuple[dict, dict]]] = {}
        for cell in cells:
            if cell.config[diff.key] != diff.value:
                continue
            partner = by_config.get(json.dumps(_twin(cell.config, diff.key, diff.minus), sort_keys=True))
            if partner is None or values[cell.name] is None or values[partner.name] is None:
                continue
            group = tuple(json.dumps(cell.config[k]) for k in other_keys)
            paired.setdefault(group, []).append((values[cell.name], values[partner.name]))
        for group, pairs in paired.items():
            row = {"key": dict(zip(other_keys, (json.loads(v) for v in group))), "runs": len(pairs), "diff": diff}
            row["stats"] = {
                col: _stats(
                    [None if a[col] is None or b[col] is None else a[col] - b[col] for a, b in pairs], interval=True
                )
                for col in columns
            }
            differences.append(row)
    return {"keys": keys, "columns": columns, "rows": rows, "differences": differences}


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


def write_comparison(plan: Plan, table: TableSpec) -> dict[str, Any]:
    """``<output>/<table>.md`` and ``.csv`` (long format: one line per row and column)."""
    data = comparison(plan, table)
    keys, columns = data["keys"], data["columns"]
    which = "final round" if table.round == "final" else "best-validation round"
    lines = [
        f"# {plan.name}: {table.name}",
        "",
        f"Sub-grid(s) {', '.join(table.grids)}. {plan.metric} (%) at the {which}, mean ± std over seeds "
        "(runs = finished seeds); extra columns: mean ± std over seeds of each run's value.",
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
        other = [k for k in keys if k != diff.key]
        lines += [
            "",
            f"## Paired differences: {diff.key} = {diff.value} minus {diff.key} = {diff.minus}",
            "",
            "Matched on seed and every other key; mean ± std [95% t confidence interval] over the pairs.",
            "",
            "| " + " | ".join([*other, "pairs", *columns]) + " |",
            "|---" * (len(other) + 1 + len(columns)) + "|",
        ]
        for row in rows:
            cells = [str(row["key"][k]) for k in other] + [str(row["runs"])]
            cells += [_cell_text(row["stats"][c], interval=True) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        if not rows:
            lines.append("| " + " | ".join(["-"] * (len(other) + 1 + len(columns))) + " |")
    stem = plan.output / table.name
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", *keys, "column", "n", "mean", "std", "ci95_low", "ci95_high"])
        for kind, rows in (("value", data["rows"]), ("difference", data["differences"])):
            for row in rows:
                key_cells = [
                    f"{row['diff'].value} - {row['diff'].minus}"
                    if kind == "difference" and k == row["diff"].key
                    else row["key"].get(k, "")
                    for k in keys
                ]
                for col in columns:
                    st = row["stats"][col]
                    writer.writerow(
                        [kind, *key_cells, col, int(st["n"]), *(f"{st[x]:.6g}" for x in ("mean", "std", "lo", "hi"))]
                    )
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
    return out

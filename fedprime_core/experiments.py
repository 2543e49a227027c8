"""Reproduce the paper's tables with one command: a grid of real `flwr run` federations.

    python -m fedprime_core.experiments run experiments/smoke.yaml
    python -m fedprime_core.experiments report experiments/smoke.yaml   # tables/plots only
    python -m fedprime_core.experiments plan experiments/smoke.yaml     # list the cells

A grid file (YAML)::

    name: smoke
    output: results/experiments/smoke        # relative to the app directory
    federation: {num-supernodes: 4, client-resources-num-cpus: 1}
    base: {num-server-rounds: 6, ...}          # run-config keys shared by every cell
    grids:                                     # named sub-grids: the cartesian product of
      main:                                    # every key given as a list; a name's part
                                               # before '-' picks the table (main-x -> main)
        method: [fedprime, fed-inter, fedavg-p]
        missing-setting: [miss-text, miss-image, miss-both]
        seed: [0, 1]
      robustness: {method: [fedprime, fedavg-p, centralized-p], missing-setting: [miss-both],
                   eta: [0.0, 0.5, 1.0]}

Every cell is one `flwr run . --stream` in simulation with its configuration written to a
TOML file; identical cells of different sub-grids run once. A finished cell (its
``checkpoint.json`` reached ``num-server-rounds``) is never recomputed, and an interrupted
cell resumes from its checkpoint, so a grid can be stopped and restarted at any time.
``centralized-p`` cells run with one SuperNode.

Outputs under ``output/``: ``runs/<cell>/`` (each run's results and its flwr log),
``main_table.md/.csv`` (the paper's main layout: method rows per training setting, the
five test settings as columns, mean and std over seeds), ``ablation_table.md/.csv``,
``robustness.png/.csv`` (metric vs missing rate), ``convergence_<setting>.png``, and
``cells.json`` (status and timing of every cell).

Comparison tables (any sub-grids, any keys), declared under ``tables``::

    tables:
      label-skew:                     # -> output/label-skew.md and label-skew.csv
        grids: [label-skew]           # the sub-grid(s) compared (default: the one named like the table)
        round: final                  # final (default) or best: the best-validation round
        extra:                        # optional columns from the rounds of each run's metrics.json
          - {key: bytes-sent, per: sampled, over: mean, scale: 1.0e-3, label: kB sent per client per round}
          - {key: inter-pool-size, over: final}
        differences:                  # optional paired differences between two values of one key
          - {key: method, value: pfpt, minus: fed-intra}

Rows are the combinations of the run-config keys that vary within the table's cells, seed
excepted; columns are the five test settings and ``val`` (metric in %, mean ± std over
seeds), then the extra columns (mean ± std over seeds of each run's value: ``over`` the
rounds that have ``key``, each divided by ``per`` of the same round if given, times
``scale``; ``key`` may be a ``/`` path into a round record, e.g. ``client-eval/accuracy``).
A difference pairs every run having ``key: value`` with the run whose configuration is the
same except ``key: minus`` (so matched on seed and every other key), and reports the mean,
std and a 95% t confidence interval of the per-pair differences, for every column. For
``key: comm-profile`` the keys the profile sets (wire-dtype, upload-delta, query-rank,
exchange-pooler) change with it and are no row keys of their own (``experiments/comm-paired.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cli import to_toml
from .config import ConfigError, at_profile, config_to_dict, parse_run_config, profile_keys, with_profile
from .data.missing import TEST_SETTINGS
from .launch import APP_DIR, flower_env, run_flwr, stage_app, stop_marked
from .metrics import headline_metric
from .progress import format_duration
from .yamlio import read_yaml_mapping

ABLATION_METHODS = ("fedavg-p", "fed-intra", "fed-inter", "fedprime")
#: Run-config keys naming files or folders: a relative value is relative to the grid file's folder.
PATH_KEYS = ("missing-table", "data-dir")
_CELL_KEYS = ("method", "missing-setting", "eta", "seed")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One federation of the grid."""

    name: str
    config: dict[str, Any]
    grids: tuple[str, ...]

    @property
    def label(self) -> dict[str, Any]:
        return {k: self.config[k] for k in _CELL_KEYS}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parsed grid file."""

    name: str
    output: Path
    federation: dict[str, Any]
    cells: tuple[Cell, ...]
    metric: str
    base_dir: Path = Path(".")
    tables: tuple[TableSpec, ...] = ()

    @property
    def runs_dir(self) -> Path:
        return self.output / "runs"

    def resolve_paths(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` with relative file settings made absolute against the grid file's folder.

        Cells are named and hashed with the values as written, so a grid gives the same cell
        names in every checkout.
        """
        out = dict(config)
        for key in PATH_KEYS:
            value = out.get(key)
            if value and not Path(value).expanduser().is_absolute():
                out[key] = str((self.base_dir / value).resolve())
        return out


@dataclasses.dataclass(frozen=True)
class ExtraColumn:
    """A column computed from the rounds of each run's ``metrics.json`` (see the module docstring)."""

    key: str
    per: str | None = None
    over: str = "mean"
    scale: float = 1.0
    label: str = ""

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        base = f"{self.key} / {self.per}" if self.per else self.key
        return f"{base} ({self.over})"


@dataclasses.dataclass(frozen=True)
class Difference:
    """Paired difference ``key: value`` minus ``key: minus``, matched on every other key."""

    key: str
    value: Any
    minus: Any


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A comparison table over named sub-grids (see the module docstring)."""

    name: str
    grids: tuple[str, ...]
    round: str = "final"
    extra: tuple[ExtraColumn, ...] = ()
    differences: tuple[Difference, ...] = ()
    axes: tuple[str, ...] = ()  # the sub-grids' keys, in the order written, to order the row keys


def cell_name(config: Mapping[str, Any]) -> str:
    """Readable, unique name: method-setting-eta-seed plus a hash of everything else."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    eta = f"{float(config['eta']):g}".replace(".", "p")
    return f"{config['method']}-{config['missing-setting']}-eta{eta}-s{config['seed']}-{digest}"


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a grid file; every cell's configuration is checked up front.

    Raises:
        ConfigError: naming the file, sub-grid and key that is wrong.
    """
    path = Path(path)
    spec = read_yaml_mapping(path, "grid file", ConfigError)
    unknown = set(spec) - {"name", "output", "federation", "base", "grids", "description", "tables"}
    if unknown:
        raise ConfigError(f"grid file {path}: unknown top-level key(s) {sorted(unknown)}")
    if not isinstance(spec.get("grids"), dict) or not spec["grids"]:
        raise ConfigError(f"grid file {path}: 'grids' must map sub-grid names to key lists")
    name = str(spec.get("name") or path.stem)
    output = Path(spec.get("output") or f"results/experiments/{name}")
    output = output if output.is_absolute() else APP_DIR / output
    base = dict(spec.get("base") or {})
    cells: dict[str, Cell] = {}
    for grid_name, axes in spec["grids"].items():
        if not isinstance(axes, dict):
            raise ConfigError(f"grid file {path}: sub-grid {grid_name!r} must map run-config keys to values")
        keys = list(axes)
        values = [v if isinstance(v, list) else [v] for v in axes.values()]
        for combo in itertools.product(*values):
            overrides = {**base, **dict(zip(keys, combo))}
            overrides.pop("run-name", None)
            overrides.pop("results-dir", None)
            overrides.pop("resume", None)
            try:
                config = config_to_dict(parse_run_config(overrides))
            except ConfigError as exc:
                raise ConfigError(
                    f"grid file {path}, sub-grid {grid_name!r}, cell {dict(zip(keys, combo))}: {exc}"
                ) from None
            config.pop("run-name")
            config.pop("results-dir")
            config.pop("resume")
            cname = cell_name(config)
            previous = cells.get(cname)
            grids = (*previous.grids, grid_name) if previous else (grid_name,)
            cells[cname] = Cell(cname, config, grids)
    datasets = {c.config["dataset"] for c in cells.values()}
    headline = {headline_metric(dataset) for dataset in datasets}
    metric = headline.pop() if len(headline) == 1 else "accuracy"  # a mixed grid: accuracy, which every set has
    tables = _parse_tables(path, spec.get("tables"), spec["grids"], tuple(cells.values()))
    return Plan(
        name, output, dict(spec.get("federation") or {}), tuple(cells.values()), metric, path.parent.resolve(), tables
    )


_TABLE_KEYS = {"grids", "round", "extra", "differences"}
_EXTRA_KEYS = {"key", "per", "over", "scale", "label"}
_OVER = ("mean", "final", "sum", "max", "min")


def _parse_tables(path: Path, raw: Any, grids: Mapping[str, Any], cells: tuple[Cell, ...]) -> tuple[TableSpec, ...]:
    """Validate the ``tables`` section against the sub-grids and cells it refers to."""
    from .config import OPTIONS

    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"grid file {path}: 'tables' must map table names to table specs")
    option_keys = {opt.key for opt in OPTIONS}
    tables = []
    for name, body in raw.items():
        where = f"grid file {path}, table {name!r}"
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a mapping with keys {sorted(_TABLE_KEYS)}")
        unknown = set(body) - _TABLE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_TABLE_KEYS)}")
        names = body.get("grids", [name])
        names = [names] if isinstance(names, str) else list(names)
        missing = [g for g in names if g not in grids]
        if not names or missing:
            raise ConfigError(f"{where}: no sub-grid named {missing or names}; the grid file has {sorted(grids)}")
        which = body.get("round", "final")
        if which not in ("final", "best"):
            raise ConfigError(f"{where}: 'round' must be 'final' or 'best', got {which!r}")
        extras = []
        for item in body.get("extra") or []:
            if not isinstance(item, dict) or "key" not in item or set(item) - _EXTRA_KEYS:
                raise ConfigError(
                    f"{where}: every 'extra' entry must be a mapping with 'key' "
                    f"and optionally {sorted(_EXTRA_KEYS - {'key'})}"
                )
            over = item.get("over", "mean")
            if over not in _OVER:
                raise ConfigError(f"{where}: extra column {item['key']!r}: 'over' must be one of {_OVER}, got {over!r}")
            try:
                scale = float(item.get("scale", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: extra column {item['key']!r}: 'scale' must be a number") from None
            extras.append(ExtraColumn(str(item["key"]), item.get("per"), over, scale, str(item.get("label", ""))))
        table_cells = [c for c in cells if set(c.grids) & set(names)]
        differences = []
        for item in body.get("differences") or []:
            if not isinstance(item, dict) or set(item) != {"key", "value", "minus"}:
                raise ConfigError(f"{where}: every 'differences' entry must be a mapping with key, value and minus")
            if item["key"] not in option_keys or item["key"] == "seed":
                raise ConfigError(f"{where}: difference key {item['key']!r} is not a run-config key other than seed")
            present = {json.dumps(c.config[item["key"]]) for c in table_cells}
            for side in ("value", "minus"):
                if json.dumps(_coerce_like(item[side], table_cells, item["key"])) not in present:
                    raise ConfigError(
                        f"{where}: no cell of the table has {item['key']} = {item[side]!r} "
                        f"(values present: {sorted(json.loads(v) for v in present)})"
                    )
            differences.append(
                Difference(
                    item["key"],
                    _coerce_like(item["value"], table_cells, item["key"]),
                    _coerce_like(item["minus"], table_cells, item["key"]),
                )
            )
        axes: list[str] = []
        for g in names:
            axes.extend(k for k in grids[g] if k not in axes)
        tables.append(TableSpec(str(name), tuple(names), which, tuple(extras), tuple(differences), tuple(axes)))
    return tuple(tables)


def _coerce_like(value: Any, cells: Sequence[Cell], key: str) -> Any:
    """``value`` with the type the validated configs hold for ``key`` (YAML 1 vs 1.0)."""
    for cell in cells:
        current = cell.config[key]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    return value


def federation_args(plan: Plan, cell: Cell) -> str:
    options = dict(plan.federation)
    if cell.config["method"] == "centralized-p":
        options["num-supernodes"] = 1
    return " ".join(f"{k}={v}" for k, v in options.items())


def cell_status(plan: Plan, cell: Cell) -> tuple[str, int]:
    """``("done" | "partial" | "todo", completed rounds)`` from the cell's checkpoint."""
    meta = plan.runs_dir / cell.name / "checkpoint.json"
    if not meta.is_file():
        return "todo", 0
    try:
        completed = int(json.loads(meta.read_text()).get("round", 0))
    except (OSError, ValueError):
        return "todo", 0
    return ("done" if completed >= int(cell.config["num-server-rounds"]) else "partial"), completed


def run_cell(plan: Plan, cell: Cell, home: Path, echo: bool = True, app_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) one cell with real `flwr run`; returns its status record.

    ``app_dir``: where ``flwr run .`` runs (a :func:`~fedprime_core.launch.stage_app` copy; default the repository).
    """
    status, completed = cell_status(plan, cell)
    if status == "done":
        return {"cell": cell.name, "status": "done", "skipped": True}
    run_dir = plan.runs_dir / cell.name
    overrides = {**plan.resolve_paths(cell.config), "results-dir": str(plan.runs_dir), "run-name": cell.name}
    if cell.config["method"] == "centralized-p":
        overrides.update({"min-available-nodes": 1, "min-train-nodes": 1})
    if status == "partial":
        overrides["resume"] = str(run_dir)
    toml_path = plan.output / "configs" / f"{cell.name}.toml"
    toml_path.parent.mkdir(parents=True, exist_ok=True)
    toml_path.write_text(to_toml(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"[{cell.name}] "
    started = time.perf_counter()
    code, output = run_flwr(
        ["run", ".", "--stream", "--federation-config", federation_args(plan, cell), "--run-config", str(toml_path)],
        flower_env(home),
        log_path=run_dir / f"flwr-{int(time.time())}.log",
        echo=(lambda line: print(prefix + line, flush=True)) if echo else None,
        cwd=app_dir,
    )
    seconds = time.perf_counter() - started
    final, _ = cell_status(plan, cell)
    ok = code == 0 and final == "done"
    return {
        "cell": cell.name,
        "status": "done" if ok else "failed",
        "exit-code": code,
        "seconds": seconds,
        "resumed-from": completed if status == "partial" else None,
    }


def run_plan(plan: Plan, echo: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished cell in order, then write the report. Returns the cell records."""
    plan.output.mkdir(parents=True, exist_ok=True)
    home = plan.output / ".flwr-home"
    home.mkdir(exist_ok=True)
    records = []
    staged = Path(tempfile.mkdtemp(prefix="fedprime-app-"))
    started = time.perf_counter()
    total = len(plan.cells)
    try:
        app_dir = stage_app(staged / "app")  # flwr run walks its whole folder: stage the app alone
        for index, cell in enumerate(plan.cells, 1):
            print(f"== cell {index}/{total}: {cell.name} ({', '.join(cell.grids)})", flush=True)
            record = run_cell(plan, cell, home, echo=echo, app_dir=app_dir)
            records.append(record)
            if record["status"] == "failed":
                print(
                    f"!! cell {cell.name} failed (exit {record['exit-code']}); see {plan.runs_dir / cell.name}",
                    flush=True,
                )
            (plan.output / "cells.json").write_text(json.dumps(records, indent=2))
            to_run = sum(cell_status(plan, c)[0] != "done" for c in plan.cells[index:])
            print(
                progress_line(index, total, record, time.perf_counter() - started, records, to_run),
                flush=True,
            )
    finally:
        stop_marked(f"FLWR_HOME={home}")  # the local SuperLink flwr run left in the background
        shutil.rmtree(staged, ignore_errors=True)
    write_report(plan)
    return records


def progress_line(
    index: int, total: int, record: dict[str, Any], elapsed: float, records: Sequence[dict[str, Any]], to_run: int
) -> str:
    """``== cell 3/29 done in 58s | 2m04s elapsed, about 25m10s left (26 cells to run)``.

    The estimate is the mean duration of the cells this invocation ran (finished cells that
    were skipped do not count) times the cells still to run.
    """
    outcome = "skipped (already done)" if record.get("skipped") else record["status"]
    took = f" in {format_duration(record['seconds'])}" if "seconds" in record else ""
    durations = [r["seconds"] for r in records if "seconds" in r]
    if to_run == 0:
        left = "nothing left to run"
    elif durations:
        mean = sum(durations) / len(durations)
        left = f"about {format_duration(mean * to_run)} left ({to_run} cell{'s' * (to_run != 1)} to run)"
    else:
        left = f"{to_run} cell{'s' * (to_run != 1)} to run"
    return f"== cell {index}/{total} {outcome}{took} | {format_duration(elapsed)} elapsed, {left}"


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
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


def varying_keys(plan: Plan, table: TableSpec) -> list[str]:
    """Run-config keys (seed excepted) that take more than one value among the table's cells."""
    cells = _table_cells(plan, table)
    keys = [k for k in cells[0].config if k != "seed"] if cells else []
    varying = [k for k in keys if len({json.dumps(c.config[k]) for c in cells}) > 1]
    if "comm-profile" in varying:  # keys that vary only because the profile does are no axes of their own
        varying = [k for k in varying if k not in profile_keys() or not all(at_profile(c.config, k) for c in cells)]
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


def _plot_convergence(plan: Plan, path_for: callable) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Train loss of every round; validation metric of the rounds the server evaluated
    # (every ``eval-every`` rounds and the last).
    losses: dict[tuple[str, str], list[dict[int, float]]] = defaultdict(list)
    scores: dict[tuple[str, str], list[dict[int, float]]] = defaultdict(list)
    for cell in plan.cells:
        if cell.config["method"] == "centralized-p" and not in_kind(cell, "main"):
            continue
        history = [r for r in _history(plan, cell) if r["round"] > 0 and not r.get("skipped")]
        if not history:
            continue
        key = (cell.config["missing-setting"], cell.config["method"])
        losses[key].append({r["round"]: r.get("train-loss", np.nan) for r in history})
        scores[key].append(
            {r["round"]: r["eval"].get("val", {}).get(plan.metric, np.nan) for r in history if r.get("eval")}
        )

    def mean_curve(runs: list[dict[int, float]]) -> tuple[list[int], list[float]]:
        rounds = sorted({k for run in runs for k in run})
        return rounds, [float(np.nanmean([run[k] for run in runs if k in run])) for k in rounds]

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("run", "report", "plan"))
    parser.add_argument("grid", help="a grid YAML file, e.g. experiments/smoke.yaml")
    parser.add_argument("--quiet", action="store_true", help="do not echo each run's log")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.grid)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "plan":
        for cell in plan.cells:
            status, completed = cell_status(plan, cell)
            print(f"{status:8s} {completed:4d}  {cell.name}  [{', '.join(cell.grids)}]")
        print(f"{len(plan.cells)} cells; output {plan.output}")
        return 0
    if args.command == "run":
        records = run_plan(plan, echo=not args.quiet)
        failed = [r for r in records if r["status"] == "failed"]
        print(f"{len(records) - len(failed)}/{len(records)} cells done; report in {plan.output}")
        return 1 if failed else 0
    print(json.dumps(write_report(plan), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

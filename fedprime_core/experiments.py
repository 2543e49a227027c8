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
from .config import ConfigError, config_to_dict, parse_run_config
from .data.missing import TEST_SETTINGS
from .launch import APP_DIR, flower_env, run_flwr, stage_app, stop_marked
from .progress import format_duration
from .yamlio import read_yaml_mapping

ABLATION_METHODS = ("fedavg-p", "fed-intra", "fed-inter", "fedprime")
ROBUSTNESS_METHODS = ("fedprime", "fedavg-p", "centralized-p")
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

    @property
    def runs_dir(self) -> Path:
        return self.output / "runs"


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
    unknown = set(spec) - {"name", "output", "federation", "base", "grids", "description"}
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
    metric = "macro_f1" if datasets == {"mmimdb"} else "accuracy"
    return Plan(name, output, dict(spec.get("federation") or {}), tuple(cells.values()), metric)


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
    overrides = {**cell.config, "results-dir": str(plan.runs_dir), "run-name": cell.name}
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

"""Running a plan's cells as real `flwr run` federations, resumably."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...progress import format_duration
from ..cli import to_toml
from ..launch import flower_env, run_flwr, stage_app, stop_marked
from .plan import (
    Cell,
    Plan,
    blind_cells_left,
    completed_rounds,
    estimate_remaining,
    federation_args,
    folder_settings_changed,
    missing_checkpoint_arrays,
    resumable_folder,
)
from .report import write_report


def cell_status(plan: Plan, cell: Cell) -> tuple[str, int]:
    """``("done" | "partial" | "todo", completed rounds)`` from the cell's checkpoint."""
    completed = completed_rounds(plan.run_dir(cell))
    if completed is None:
        return "todo", 0
    return ("done" if completed >= int(cell.config["num-server-rounds"]) else "partial"), completed


def run_cell(plan: Plan, cell: Cell, home: Path, echo: bool = True, app_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) one cell with real `flwr run`; returns its status record.

    ``app_dir``: where ``flwr run .`` runs (a :func:`~fedprime_core.tools.launch.stage_app` copy; default: the
    repository).
    """
    reused = plan.reused_from(cell)
    if reused is not None:  # another grid's finished run of the same cell: read there, never written
        return {"cell": cell.name, "status": "done", "skipped": True, "reused-from": str(reused)}
    adopted, candidates = resumable_folder(plan, cell)
    if adopted is not None:
        adopted.rename(plan.runs_dir / cell.name)  # the same run, under the name its new rounds give it
        print(f"== {cell.name}: resumes {adopted.name} (made with other resumable settings)", flush=True)
    elif len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        print(f"== {cell.name}: several run folders could be resumed ({names}); starting afresh", flush=True)
    status, completed = cell_status(plan, cell)
    changed = folder_settings_changed(plan, cell)
    if changed:
        reason = (
            f"its run folder {plan.runs_dir / cell.name} was made with other settings: {'; '.join(changed)} "
            "(a default changed since?); move the folder away to run the cell again"
        )
        return {"cell": cell.name, "status": "failed", "exit-code": None, "reason": reason}
    if status == "done":
        record = {"cell": cell.name, "status": "done", "skipped": True}
        return record if adopted is None else {**record, "adopted-from": adopted.name}
    run_dir = plan.runs_dir / cell.name
    set_aside = None
    lost = missing_checkpoint_arrays(run_dir) if status == "partial" else None
    if lost is not None:  # e.g. a partial run folder committed without its arrays: it cannot resume
        set_aside = plan.output / "runs-set-aside" / f"{cell.name}-{int(time.time())}"
        set_aside.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(set_aside)
        print(
            f"== {cell.name}: its checkpoint (round {completed}) names {lost}, which is missing, so it cannot "
            f"resume; the folder is set aside in {set_aside} and the cell starts over",
            flush=True,
        )
        status, completed = "todo", 0
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
        **({} if adopted is None else {"adopted-from": adopted.name}),
        **({} if set_aside is None else {"set-aside": str(set_aside)}),
    }


def run_plan(plan: Plan, echo: bool = True, report: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished cell in order, then write the report (unless ``report`` is false). Returns the cell records.

    ``report=False`` is for a study read blind until it is complete: a pilot read for its spread
    only (:mod:`.power`), or a session that ends with some seeds run, leaves no tables with
    means or differences beside its run folders. A ``blind`` grid writes none either while any
    cell is unfinished, whatever ``report`` says.
    """
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
                why = record.get("reason") or f"exit {record['exit-code']}; see {plan.runs_dir / cell.name}"
                print(f"!! cell {cell.name} failed: {why}", flush=True)
            (plan.output / "cells.json").write_text(json.dumps(records, indent=2))
            ahead = estimate_remaining(plan, plan.cells[index:])
            line = progress_line(index, total, record, time.perf_counter() - started, records, ahead["cells"], ahead)
            print(line, flush=True)
    finally:
        stop_marked(f"FLWR_HOME={home}")  # the local SuperLink flwr run left in the background
        shutil.rmtree(staged, ignore_errors=True)
    if report and not blind_cells_left(plan):
        write_report(plan)
    return records


def progress_line(
    index: int,
    total: int,
    record: dict[str, Any],
    elapsed: float,
    records: Sequence[dict[str, Any]],
    to_run: int,
    estimate: dict[str, Any] | None = None,
) -> str:
    """``== cell 3/29 done in 58s | 2m04s elapsed, about 25m10s left (26 cells to run)``.

    The estimate is ``estimate`` (:func:`~.plan.estimate_remaining` of the cells still to run:
    each arm's seconds per round in the grid's finished runs) when it covers every one of
    them; else the mean duration of the cells this invocation ran (finished cells that were
    skipped do not count) times the cells still to run.
    """
    outcome = record["status"]
    if record.get("skipped"):
        outcome = f"reused from {record['reused-from']}" if "reused-from" in record else "skipped (already done)"
    took = f" in {format_duration(record['seconds'])}" if "seconds" in record else ""
    durations = [r["seconds"] for r in records if "seconds" in r]
    if to_run == 0:
        left = "nothing left to run"
    elif estimate is not None and estimate["cells"] == to_run and not estimate["unknown"]:
        left = (
            f"about {format_duration(estimate['seconds'])} of rounds left ({to_run} cell{'s' * (to_run != 1)} "
            "to run, at each arm's seconds per round)"
        )
    elif durations:
        mean = sum(durations) / len(durations)
        left = f"about {format_duration(mean * to_run)} left ({to_run} cell{'s' * (to_run != 1)} to run)"
    else:
        left = f"{to_run} cell{'s' * (to_run != 1)} to run"
    return f"== cell {index}/{total} {outcome}{took} | {format_duration(elapsed)} elapsed, {left}"

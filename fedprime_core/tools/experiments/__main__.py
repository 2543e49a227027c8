"""``python -m fedprime_core.tools.experiments run|report|plan|power <grid.yaml>``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from ...config import ConfigError
from ...progress import format_duration
from . import __doc__ as GUIDE
from .plan import (
    Plan,
    blind_cells_left,
    by_seed,
    completed_rounds,
    estimate_remaining,
    folder_settings_changed,
    load_plan,
    missing_checkpoint_arrays,
    resumable_folder,
)
from .power import format_power, pilot_power
from .report import write_report
from .run import cell_status, run_plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.experiments",
        description=GUIDE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("run", "report", "plan", "power"))
    parser.add_argument("grid", help="a grid YAML file, e.g. experiments/smoke.yaml")
    parser.add_argument("--quiet", action="store_true", help="do not echo each run's log")
    parser.add_argument(
        "--by-seed",
        action="store_true",
        help="run (and plan: list) the cells seed by seed, every sub-grid's cells of one seed before the next "
        "seed's, so that a study stopped midway holds complete seeds; cell names do not change",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="run: do not write the tables and plots at the end (a study read blind until complete; "
        "write them later with the report command)",
    )
    parser.add_argument(
        "--finished",
        action="store_true",
        help="plan: print only the run folders of this grid's finished cells, one per line (not partial ones, "
        "not ones reused from another grid), e.g. to commit them: git add $(... plan GRID --finished)",
    )
    parser.add_argument(
        "--unblind",
        action="store_true",
        help="report: write the tables of a grid marked 'blind: true' before all its cells are done "
        "(this reads the study early; say so wherever its results are reported)",
    )
    sizing = parser.add_argument_group("power: the pilot's paired spread and the seeds it needs (no means shown)")
    sizing.add_argument("--table", help="the comparison table to size (default: every table of the grid)")
    sizing.add_argument("--column", help="the column to size on (default: the table's first extra column)")
    sizing.add_argument("--delta", type=float, default=2.0, help="smallest difference worth detecting (default 2)")
    sizing.add_argument("--power", type=float, default=0.8, help="power of the paired t test (default 0.8)")
    sizing.add_argument("--alpha", type=float, default=0.05, help="its two-sided level (default 0.05)")
    sizing.add_argument("--confidence", type=float, default=0.8, help="of the sd's upper bound (default 0.8)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.grid)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.by_seed:
        plan = dataclasses.replace(plan, cells=by_seed(plan.cells))
    command = {"plan": _plan, "power": _power, "run": _run, "report": _report}[args.command]
    return command(args, plan)


def _plan(args: argparse.Namespace, plan: Plan) -> int:
    """List every cell's status (or, with ``--finished``, only the own finished run folders) and the time left."""
    if args.finished:
        for cell in plan.cells:
            own = plan.runs_dir / cell.name  # a folder of its own is never reused from elsewhere
            if own.is_dir() and cell_status(plan, cell)[0] == "done":
                print(own)
        return 0
    for cell in plan.cells:
        status, completed = cell_status(plan, cell)
        if folder_settings_changed(plan, cell):
            status = "stale"
        elif status == "partial" and missing_checkpoint_arrays(plan.runs_dir / cell.name):
            status = "restart"  # its arrays are gone: `run` sets the folder aside and starts over
        adopt, _ = resumable_folder(plan, cell)
        reused = plan.reused_from(cell)
        note = ""
        if adopt is not None:
            status, completed = "resumes", completed_rounds(adopt)
            note = f"  (resumes {adopt.name})"
        elif reused is not None:
            note = f"  (reused from {reused.parent.parent})"
        print(f"{status:8s} {completed:4d}  {cell.name}  [{', '.join(cell.grids)}]{note}")
    left = estimate_remaining(plan)
    known = left["cells"] - left["unknown"]
    if known:
        uncounted = f"; {left['unknown']} cell(s) of methods with no finished run in this grid are not counted"
        print(
            f"{left['cells']} cells to run: about {format_duration(left['seconds'])} of rounds for {known} of them "
            "(each arm's median seconds per round in its finished runs)" + (uncounted if left["unknown"] else "")
        )
    elif left["cells"]:
        print(f"{left['cells']} cells to run; no finished run of their methods in this grid to time them by")
    print(f"{len(plan.cells)} cells; output {plan.output}")
    return 0


def _power(args: argparse.Namespace, plan: Plan) -> int:
    """The pilot's paired spread per comparison and the seeds it needs (no means), also as JSON."""
    tables = [t for t in plan.tables if args.table in (None, t.name)]
    if not tables:
        names = ", ".join(t.name for t in plan.tables) or "none"
        print(f"error: grid {args.grid} has no table {args.table!r} (its tables: {names})", file=sys.stderr)
        return 2
    for table in tables:
        try:
            result = pilot_power(plan, table, args.column, args.delta, args.power, args.alpha, args.confidence)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_power(result) + "\n")
        path = plan.output / f"power-{table.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _run(args: argparse.Namespace, plan: Plan) -> int:
    """Run what is not done; then the report, unless ``--no-report`` or a blind grid is unfinished."""
    records = run_plan(plan, echo=not args.quiet, report=not args.no_report)
    failed = [r for r in records if r["status"] == "failed"]
    left = blind_cells_left(plan)
    if args.no_report:
        where = f"no report written (--no-report); `report {args.grid}` writes it"
    elif left:
        where = f"no report written: the grid is blind until all {len(plan.cells)} cells are done ({len(left)} left)"
    else:
        where = f"report in {plan.output}"
    print(f"{len(records) - len(failed)}/{len(records)} cells done; {where}")
    return 1 if failed else 0


def _report(args: argparse.Namespace, plan: Plan) -> int:
    """The tables and plots of the finished cells (a blind grid: only once every cell is done, or ``--unblind``)."""
    left = blind_cells_left(plan)
    if left and not args.unblind:
        print(
            f"error: grid {args.grid} is read blind ('blind: true') and {len(left)} of its {len(plan.cells)} cells "
            f"are not done (e.g. {left[0].name}); finish them with `run`, or pass --unblind to read it early",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(write_report(plan), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fedprime_core.tools.experiments run|report|plan <grid.yaml>``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ...config import ConfigError
from . import __doc__ as GUIDE
from .plan import load_plan
from .report import write_report
from .run import cell_status, folder_settings_changed, run_plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.experiments",
        description=GUIDE,
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
            if folder_settings_changed(plan, cell):
                status = "stale"
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

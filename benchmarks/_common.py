"""Shared helpers of the benchmark scripts: command line, machine description, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/<name>.py` without an editable install
    sys.path.insert(0, str(ROOT))


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick`` and ``--out`` options."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--quick", action="store_true", help="smallest settings (seconds, for smoke tests)")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(HERE / f"{name}.json"),
        default=None,
        help=f"write the figures as JSON (default path: benchmarks/{name}.json)",
    )
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on (the 1-min load average says whether the CPU was shared)."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch-threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load-average-at-start": load_average(),
    }
    try:
        import numpy
        import scipy

        info["numpy"], info["scipy"] = numpy.__version__, scipy.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float], Any]:
    """Median wall time of ``reps`` calls of ``fn``; returns ``(median, all times, last result)``."""
    seconds, times, _, result = median_wall_cpu(fn, reps)
    return seconds, times, result


def median_wall_cpu(fn: Callable[[], Any], reps: int) -> tuple[float, list[float], float, Any]:
    """Like :func:`median_time`, plus the median CPU time of this process (all its threads).

    Returns ``(median wall s, all wall times, median CPU s, last result)``. CPU time is less
    sensitive than wall time to other processes sharing the CPU.
    """
    times, cpu, result = [], [], None
    for _ in range(max(reps, 1)):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), times, statistics.median(cpu), result


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): the growth exponent."""
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": {**payload.get("machine", {}), "load-average-at-end": load_average()}}
    out.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"\nwrote {out}")


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)

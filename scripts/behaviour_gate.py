"""The fixed-seed behaviour gate: a refactoring must not change what a run computes.

Record a reference at a commit before the change, then check the changed tree against it::

    python scripts/behaviour_gate.py record /tmp/gate/before       # at the old commit
    python scripts/behaviour_gate.py record /tmp/gate/after        # at the new commit
    python scripts/behaviour_gate.py compare /tmp/gate/before /tmp/gate/after

``record`` runs the tree in the current directory with ``flwr run . --stream`` in
simulation (4 SuperNodes, 3 rounds of the default method on the embedded set, client-side
and server-side evaluation, fixed seed) and keeps its run folder. ``compare`` holds every
accuracy, F1, count, byte, pool size and alignment figure of ``metrics.json`` and
``clients.json`` to be identical, losses and the alignment objective to within float noise
(relative 1e-4), and the
final global state (``final.npz``) to within 1e-6; wall-clock figures (``*seconds*``)
and node ids (random per run) are ignored. Two runs at one commit differ by about 1e-8 in the state
(thread scheduling), never in a metric. It prints every difference and exits 1 if there is one.

The environment must have the project installed (``pip install -e '.[dev]'``); the run
gets its own Flower home and local SuperLink ports (``fedprime_core.tools.launch``), so it
can run beside other federations, and its processes are stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path.cwd()
RUN_NAME = "gate"
OVERRIDES = (
    "num-server-rounds=3 max-train-samples=600 max-test-samples=200 client-test-samples=50 "
    "tau=8 kappa=2 seed=42 eval-every=1"
)
IGNORED = ("node-id", "seconds", "elapsed", "started", "finished", "time", "when", "pid", "flwr-run-id", "results-dir")
#: Figures that are continuous functions of the trained state (a loss, the alignment's objective):
#: the state carries about 1e-8 of thread-scheduling noise between runs, so they may move in the
#: last float32 digits; compared within LOSS_RTOL.
NOISY = ("loss", "objective")
LOSS_RTOL = 1e-4
STATE_ATOL = 1e-6


def record(out: Path) -> None:
    """Run the gate's federation on the tree in the current directory into ``out``."""
    sys.path.insert(0, str(ROOT))
    from fedprime_core.tools.launch import flower_env, run_flwr, stop_marked

    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="gate-flwr-home-"))
    args = [
        "run",
        ".",
        "--stream",
        "--federation-config",
        "num-supernodes=4 client-resources-num-cpus=1",
        "--run-config",
        f'results-dir="{out}" run-name="{RUN_NAME}" {OVERRIDES}',
    ]
    try:
        code, _ = run_flwr(args, flower_env(home), log_path=out / "flwr-output.log", timeout=1800, cwd=ROOT)
    finally:
        stop_marked(f"FLWR_HOME={home}")
        shutil.rmtree(home, ignore_errors=True)
    if code != 0 or not (out / RUN_NAME / "final.npz").is_file():
        sys.exit(f"the gate's run failed (exit {code}); see {out / 'flwr-output.log'}")
    print(f"recorded {out / RUN_NAME}")


def _ignored(path: str) -> bool:
    last = path.rsplit("/", 1)[-1].lower()
    return any(word in last for word in IGNORED)


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if _ignored(path):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                if not _ignored(f"{path}/{key}"):
                    out.append(f"{path}/{key}: only in {'after' if key not in a else 'before'}")
                continue
            _diff(a[key], b[key], f"{path}/{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and any(word in path.lower() for word in NOISY):
        if not (math.isclose(a, b, rel_tol=LOSS_RTOL, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))):
            out.append(f"{path}: {a!r} -> {b!r}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        out.append(f"{path}: {a!r} -> {b!r}")


def compare(before: Path, after: Path) -> int:
    """Print every difference between two recorded gate runs; the number found."""
    found: list[str] = []
    for name in ("metrics.json", "clients.json"):
        a = json.loads((before / RUN_NAME / name).read_text())
        b = json.loads((after / RUN_NAME / name).read_text())
        _diff(a, b, name, found)
    with np.load(before / RUN_NAME / "final.npz") as a, np.load(after / RUN_NAME / "final.npz") as b:
        keys_a, keys_b = set(a.files), set(b.files)
        for key in sorted(keys_a ^ keys_b):
            found.append(f"final.npz/{key}: only in {'after' if key in keys_b else 'before'}")
        identical = 0
        worst = 0.0
        for key in sorted(keys_a & keys_b):
            x, y = a[key], b[key]
            if x.shape != y.shape or x.dtype != y.dtype:
                found.append(f"final.npz/{key}: {x.dtype}{x.shape} -> {y.dtype}{y.shape}")
                continue
            if np.array_equal(x, y):
                identical += 1
                continue
            gap = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            worst = max(worst, gap)
            if gap > STATE_ATOL:
                found.append(f"final.npz/{key}: max |difference| {gap:.3g}")
        shared = len(keys_a & keys_b)
        print(f"final.npz: {identical} of {shared} arrays bit-identical, largest other difference {worst:.3g}")
    for line in found:
        print(line)
    print("gate: same behaviour" if not found else f"gate: {len(found)} difference(s)")
    return len(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the gate's federation on the tree in the current directory")
    rec.add_argument("out", type=Path)
    cmp_ = sub.add_parser("compare", help="compare two recorded runs")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out.resolve())
    else:
        sys.exit(1 if compare(args.before, args.after) else 0)


if __name__ == "__main__":
    main()

"""Fault injection in a real Flower simulation: the federation must finish with finite metrics.

    python benchmarks/faults.py [--rounds 4] [--out benchmarks/faults.json]

Six clients, of which (by ``fault-plan``, see fedprime_core/tools/faults.py):

* client 1 crashes in rounds 2-3 (an exception: Flower returns an error reply);
* client 2 sends NaN in every round;
* client 3 sends an array of the wrong shape in rounds 1-2;
* client 4 claims zero training samples in round 3;
* client 5 is too slow (sleeps 90 s) in round 2, past the 60 s round timeout.

Prints, per round, how many replies were accepted and rejected and why, and the final
server-side metrics; exits non-zero if the run did not complete or a metric is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import machine

from fedprime_core.tools.launch import flower_env, run_flwr, stop_marked

PLAN = "1:crash@2-3,2:nan,3:shape@1-2,4:zero@3,5:slow@2"
REASONS = {
    "client error": "crash or timeout (error reply)",
    "NaN or Inf": "NaN/Inf in arrays",
    "has shape": "wrong shape",
    "num-examples must be": "non-positive sample count",
}


def classify(reason: str) -> str:
    return next((label for key, label in REASONS.items() if key in reason), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("faults.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home, results = Path(tmp) / "flwr-home", Path(tmp) / "results"
        home.mkdir()
        overrides = (
            f'num-server-rounds={args.rounds} results-dir="{results}" run-name="faults" fault-plan="{PLAN}" '
            "round-timeout=60.0 min-train-nodes=2 min-available-nodes=6 fraction-evaluate=0.0 "
            "tau=8 kappa=2 max-train-samples=600 max-test-samples=200"
        )
        started = time.perf_counter()
        try:
            code, output = run_flwr(
                [
                    "run",
                    ".",
                    "--stream",
                    "--federation-config",
                    "num-supernodes=6 client-resources-num-cpus=1",
                    "--run-config",
                    overrides,
                ],
                flower_env(home),
            )
        finally:
            stop_marked(f"FLWR_HOME={home}")
        wall = time.perf_counter() - started
        metrics_file = results / "faults" / "metrics.json"
        if code != 0 or not metrics_file.is_file():
            print(output[-4000:])
            print(f"run failed (exit {code})")
            return 1
        history = json.loads(metrics_file.read_text())
    rounds = [r for r in history if r["round"] > 0]
    print(f"fault plan: {PLAN}  (6 clients, round timeout 60 s)")
    print("| round | sampled | accepted | rejected | reasons | train loss | full-modal acc |")
    print("|---|---|---|---|---|---|---|")
    totals: Counter[str] = Counter()
    for r in rounds:
        kinds = Counter(classify(reason) for reason in r.get("rejected-reasons", []))
        totals.update(kinds)
        missing = r["sampled"] - r["accepted"] - r["rejected"]  # no reply at all within the timeout
        if missing:
            kinds["no reply before the timeout"] += missing
            totals["no reply before the timeout"] += missing
        acc = r.get("eval", {}).get("full-modal", {}).get("accuracy")
        print(
            f"| {r['round']} | {r['sampled']} | {r['accepted']} | {r['rejected']} | "
            f"{', '.join(f'{k} x{v}' for k, v in kinds.items()) or '-'} | {r.get('train-loss', float('nan')):.4f} | "
            f"{'-' if acc is None else f'{100 * acc:.1f}%'} |"
        )
    final = rounds[-1].get("eval", {})
    finite = all(math.isfinite(v) for m in final.values() for v in m.values())
    summary = {
        "benchmark": "faults",
        "machine": machine(),
        "plan": PLAN,
        "rounds-completed": len(rounds),
        "rounds-skipped": sum(bool(r.get("skipped")) for r in rounds),
        "replies-accepted": sum(r["accepted"] for r in rounds),
        "faults-caught": dict(totals),
        "final-metrics-finite": finite,
        "final-full-modal-accuracy": final.get("full-modal", {}).get("accuracy"),
        "wall-seconds": round(wall, 1),
    }
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if finite and len(rounds) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())

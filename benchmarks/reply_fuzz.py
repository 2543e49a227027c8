"""Fuzz campaign of the server's reply path: how many hostile replies are accepted, rejected, crash or hang.

    python benchmarks/reply_fuzz.py [--records 200] [--methods fedprime,pfpt] [--out]

For every method, ``--records`` replies drawn by ``tests/hostile.py`` (any value Flower can
carry under known or unknown keys of every record, arrays of any dtype and shape, records
left out) go, one per round, through the server's reply path beside three honest replies:
the client's log lines, parse, validate, aggregate, the round record, ``RunOutputs.persist``
(metrics, summary, clients.json, checkpoint). Counted per method:

* **accepted** / **rejected**: the fourth node's outcome;
* **crashes**: any exception out of that path (type and message kept, first few);
* **hangs**: a record that took longer than ``--hang`` seconds (interrupted by an alarm);
* **traces**: rejected replies after which the round differs from the round without them
  (global arrays, personal pools, clients.json, train loss).

The script needs only the strategy's hooks, so it also measures older commits: run it
from a checkout of the commit with ``tests/hostile.py`` copied there.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import load_average, machine, parser, table


class Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Hang


def main() -> int:
    p = parser("reply_fuzz", __doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200, help="hostile replies per method")
    p.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    p.add_argument("--hang", type=int, default=60, help="seconds after which a record counts as a hang")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.records = 3
        args.methods = args.methods or "fed-intra"

    from hypothesis import HealthCheck, given, seed, settings

    import fedprime_core.results as results
    from tests.hostile import HONEST, HOSTILE, METHODS, ReplyRound, apply, is_finite_state, mutations, same_outcome

    results.plot_curves = lambda *a, **k: None  # drawn from the round records only; slow, and nothing a client sent
    methods = [m for m in args.methods.split(",") if m] or list(METHODS)
    info = machine()
    figures: dict[str, Any] = {}
    signal.signal(signal.SIGALRM, _alarm)

    def play(method: str, parts: dict[str, Any] | None) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            round_ = ReplyRound(method, Path(tmp) / "fuzz")
            replies = [round_.honest(node) for node in HONEST]
            if parts is not None:
                replies.append(round_.message(HOSTILE, parts))
            return round_.run(replies)

    def campaign(method: str) -> tuple[Counter[str], Counter[str]]:
        baseline = play(method, None)
        with tempfile.TemporaryDirectory() as tmp:
            honest_parts = ReplyRound(method, Path(tmp) / "fuzz").reply_parts(HOSTILE)
        counts: Counter[str] = Counter()
        crashes: Counter[str] = Counter()

        @seed(args.seed)
        @settings(max_examples=args.records, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(ops=mutations())
        def one(ops):
            parts = apply(honest_parts, ops)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    ReplyRound(method, Path(tmp) / "probe").message(HOSTILE, parts)
            except Exception:  # noqa: BLE001 - Flower itself refuses to carry it: no client can send it
                counts["not carriable"] += 1
                return
            signal.alarm(args.hang)
            try:
                outcome = play(method, parts)
            except Hang:
                counts["hangs"] += 1
                return
            except Exception as exc:  # noqa: BLE001 - that is what is counted
                counts["crashes"] += 1
                crashes[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                return
            finally:
                signal.alarm(0)
            status = outcome["status"].get(HOSTILE, "missing")
            counts[status] += 1
            if not is_finite_state(outcome["arrays"]):
                counts["non-finite state"] += 1
            if status == "rejected" and not same_outcome(outcome, baseline):
                counts["traces"] += 1

        one()
        return counts, crashes

    for method in methods:
        started = time.perf_counter()
        counts, crashes = campaign(method)
        records = sum(counts.get(k, 0) for k in ("accepted", "rejected", "crashes", "hangs", "missing"))
        figures[method] = {
            "records": records,
            **{k: counts.get(k, 0) for k in ("accepted", "rejected", "crashes", "hangs", "traces", "not carriable")},
            "non-finite state": counts.get("non-finite state", 0),
            "crash kinds": dict(crashes.most_common(8)),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(method, json.dumps(figures[method]), flush=True)
    rows = [
        [m, f["records"], f["accepted"], f["rejected"], f["crashes"], f["hangs"], f["traces"], f["not carriable"]]
        for m, f in figures.items()
    ]
    total = [sum(r[i] for r in rows) for i in range(1, 8)]
    rows.append(["all", *total])
    print(table(["method", "records", "accepted", "rejected", "crashes", "hangs", "traces", "not carriable"], rows))
    info["load-average-at-end"] = load_average()
    if args.out:
        payload = {"benchmark": "reply_fuzz", "machine": info, "records-per-method": args.records, "figures": figures}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

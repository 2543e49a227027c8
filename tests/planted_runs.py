"""Finished experiment-runner cells planted on disk, as the ServerApp writes them (for the report and power tests)."""

from __future__ import annotations

import json

from fedprime_core.data.missing import TEST_SETTINGS


def fake_run(plan, cell, accuracy: float, bytes_sent: float, pool: int) -> None:
    """A finished run's summary.json and metrics.json, as the ServerApp writes them."""
    run = plan.runs_dir / cell.name
    run.mkdir(parents=True)
    final = {"round": 2, "val": accuracy, **{s: accuracy for s in TEST_SETTINGS}}
    (run / "summary.json").write_text(json.dumps({"metric": "accuracy", "final": final, "best": final}))
    rounds = [{"round": 0, "eval": {}}] + [
        {"round": r, "bytes-sent": bytes_sent * r * 2, "sampled": 2, "inter-pool-size": pool + r} for r in (1, 2)
    ]
    (run / "metrics.json").write_text(json.dumps(rounds))

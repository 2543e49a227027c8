"""The primary comparisons of experiments/alignment-regimes.yaml, as its protocol fixes them.

Each align arm minus the position run of the same inter-init and seed on the clients' own
test accuracy (final round): mean, sd, 95% t interval, two-sided paired t p-value and Holm's
correction over the arms; the per-arm table with server-side columns, re-matches and pool
size; no-op pairs (an align run whose alignment changed nothing in any round).

    python scripts/regimes_primary.py results/experiments/alignment-regimes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedprime_core.tools.experiments.report import _stats, holm, no_op_pair, paired_t

COLUMNS = {"client": "clients' own test", "sat": "server same-as-train", "full": "server full-modal"}


def read_runs(output: Path) -> list[dict[str, Any]]:
    """One row per finished run: its arm, seed and final-round figures (accuracy in %)."""
    rows = []
    for folder in sorted((output / "runs").iterdir()):
        try:
            cfg = json.loads((folder / "config.json").read_text())
            history = json.loads((folder / "metrics.json").read_text())
        except FileNotFoundError:
            continue
        trained = [r for r in history if r.get("round", 0) > 0]
        if not trained or trained[-1]["round"] != cfg["num-server-rounds"]:
            continue
        last = trained[-1]
        evaluation = last.get("eval") or {}
        top = last.get("eval-top-tau") if last.get("eval-top-tau-same") is False else evaluation
        rows.append(
            {
                "arm": (
                    cfg["inter-merge"],
                    cfg.get("inter-init", "shared"),
                    cfg.get("align-start", "warm"),
                    cfg.get("align-on", "prompt"),
                ),
                "seed": cfg["seed"],
                "client": 100 * last["client-eval"]["test-accuracy"],
                "sat": 100 * evaluation["same-as-train"]["accuracy"],
                "full": 100 * evaluation["full-modal"]["accuracy"],
                "top": 100 * top["same-as-train"]["accuracy"],
                "rematched": sum(r.get("inter-rematched", 0) for r in trained) / len(trained),
                "pool": last.get("inter-pool-size"),
                "config": cfg,
                "history": history,
            }
        )
    return rows


def describe(values: list[float]) -> tuple[int, float, float, float, float]:
    """``(n, mean, sd, 95% half-width, two-sided p of mean = 0)``; the interval and p as the runner's tables give them.

    Fewer than 2 pairs give a nan p; pairs all equal to 0 give p = 1 (:func:`paired_t`, as the report does).
    """
    st = _stats(values, interval=True)
    n, mean, sd = int(st["n"]), st["mean"], st["std"]
    return n, mean, sd, st["hi"] - mean, paired_t(n, mean, sd)[1]


def main(output: Path) -> None:
    rows = read_runs(output)
    arms = sorted({r["arm"] for r in rows})
    print("| arm | runs | " + " | ".join(COLUMNS.values()) + " | same-as-train, top-tau | re-matched/round | pool |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    for arm in arms:
        chosen = [r for r in rows if r["arm"] == arm]
        cells = [
            f"{describe([r[k] for r in chosen])[1]:.2f} ± {describe([r[k] for r in chosen])[2]:.2f}"
            for k in (*COLUMNS, "top", "rematched", "pool")
        ]
        print(f"| {', '.join(arm)} | {len(chosen)} | " + " | ".join(cells) + " |")
    twins = {(r["arm"][1], r["seed"]): r for r in rows if r["arm"][0] == "position"}
    comparisons = []
    for arm in (a for a in arms if a[0] == "align"):
        pairs = [(r, twins[(arm[1], r["seed"])]) for r in rows if r["arm"] == arm and (arm[1], r["seed"]) in twins]
        comparisons.append((arm, pairs))
    pvalues = [describe([a["client"] - b["client"] for a, b in pairs])[4] for _, pairs in comparisons]
    print()
    print("| align arm - position | pairs | no-op pairs | " + " | ".join(COLUMNS.values()) + " | p | Holm |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    for (arm, pairs), p, adjusted in zip(comparisons, pvalues, holm(pvalues)):
        cells = []
        for key in COLUMNS:
            _, mean, sd, half, _ = describe([a[key] - b[key] for a, b in pairs])
            cells.append(f"{mean:+.2f} ± {sd:.2f} [{mean - half:+.2f}, {mean + half:+.2f}]")
        noops = sum(no_op_pair(a["config"], a["history"], b["config"], b["history"]) is not None for a, b in pairs)
        print(
            f"| {', '.join(arm[1:])} | {len(pairs)} | {noops} | " + " | ".join(cells) + f" | {p:.3f} | {adjusted:.3f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Paired differences between arms of a finished grid, pooled over whatever you do not group by.

The experiments runner's comparison tables (``python -m fedprime_core.tools.experiments report``)
pair runs on one key and give one row per combination of every other varying key, so with
two seeds a row has two pairs and a 95% interval tens of points wide. This script reads the
run folders a grid wrote (``<output>/runs/<cell>/config.json``, ``summary.json``,
``metrics.json``) and pools the pairs over the keys you do not name with ``--by``
(typically the missing setting and the seed), and it compares several arms against one
baseline at once (an ablation: each option alone, and the full change)::

    # lean - paper per method, pooled over missing settings and seeds
    python scripts/paired_differences.py results/experiments/comm-smoke \\
        --arm paper:comm-profile=paper --arm lean:comm-profile=lean --by method

    # each of lean's options alone against paper, and what the options alone leave of lean's change
    python scripts/paired_differences.py results/experiments/comm-ablation \\
        --arm paper:comm-profile=paper,exchange-pooler=true,query-rank=0 \\
        --arm lean:comm-profile=lean \\
        --arm pooler-off:comm-profile=paper,exchange-pooler=false \\
        --arm rank-8:comm-profile=paper,query-rank=8 \\
        --by method --residual lean

How runs are matched:

* An **arm** is ``NAME:key=value,...`` over run-config keys (values as in ``config.json``:
  ``false``, ``8``, ``paper``). A run belongs to the arm whose assignments it matches; a run
  matching two arms is an error (make the arms more specific), a run matching none is left out
  (counted in the output). The first arm is the baseline unless ``--baseline`` names another.
* Runs **pair** when their configurations are equal apart from the arm keys (and, when
  ``comm-profile`` is an arm key, the four keys a profile sets: wire-dtype, upload-delta,
  query-rank, exchange-pooler) and bookkeeping keys (results-dir, run-name, resume). So a
  pair is matched on seed, missing setting, method and every other setting.
* **Differences** are arm - baseline per pair, in points for the accuracies; per group of the
  ``--by`` keys: number of pairs, mean, std, 95% t interval (mean ± t(0.975, n-1) std / sqrt(n))
  and how many pairs fall below and above zero.
* **No-op pairs**: a pair whose two runs ran the same algorithm in effect (every per-round
  result identical to the bit, or, where they differ in ``inter-merge`` only, an ``align`` run
  whose alignment changed nothing in any round: ``inter-align-noop``;
  ``fedprime_core.tools.experiments.report.no_op_pair``) measures nothing. Each difference
  table counts them (``no-op``) and gives, under it, the same differences over the other
  pairs only.
* ``--residual ARM``: per pair, (ARM - baseline) minus the sum of (other arm - baseline) over
  the other arms present for that pair: what the single options do not account for of ARM's
  change (the options left out of the ablation plus any interaction between options).

Columns: final-round (or ``--round best``) metric in % on the five test settings and ``val``
(from ``summary.json``), and kB sent / received per client per round (the mean over the
rounds of ``bytes-sent-per-client`` / ``bytes-received-per-client`` in ``metrics.json``).

Outputs: markdown tables on stdout; ``--csv`` a long-format CSV (``kind`` value / difference
/ difference-differing (the pairs that are no no-op) / residual, the group keys, ``arm`` (the
arm, ``A - baseline`` or ``A - baseline - other arms``), ``column``, ``n``, ``mean``, ``std``,
``ci95_low``, ``ci95_high``, ``below_zero``, ``above_zero``, ``noop_pairs`` (difference rows));
``--plot`` a PNG of the validation metric per evaluated round (or, with
``--plot-metric train-loss``, the train loss of every round), mean over the runs of each
arm, one panel per group.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedprime_core.config import profile_keys
from fedprime_core.tools.experiments.plan import BOOKKEEPING_KEYS, TEST_COLUMNS
from fedprime_core.tools.experiments.report import no_op_pair

BYTES_COLUMNS = {
    "kB sent per client per round": "bytes-sent-per-client",
    "kB received per client per round": "bytes-received-per-client",
}
#: Keys that name where a run was written, not what it ran.
BOOKKEEPING = frozenset(BOOKKEEPING_KEYS)
#: The keys ``comm-profile`` sets; they move with the profile.
PROFILE_KEYS = frozenset(profile_keys())


def parse_value(text: str) -> Any:
    """``false`` -> False, ``8`` -> 8, ``0.5`` -> 0.5, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = spec.partition(":")
    if not sep or not name or not body:
        raise argparse.ArgumentTypeError(f"arm {spec!r}: expected NAME:key=value[,key=value...]")
    assignments = {}
    for part in body.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"arm {spec!r}: {part!r} is not key=value")
        assignments[key.strip()] = parse_value(value.strip())
    return name, assignments


def run_folders(paths: list[Path]) -> list[Path]:
    """Every folder holding a config.json and summary.json under the given grid or runs folders."""
    found = []
    for path in paths:
        base = path / "runs" if (path / "runs").is_dir() else path
        found += sorted(d for d in base.iterdir() if (d / "config.json").is_file() and (d / "summary.json").is_file())
    return found


def load_run(folder: Path, which_round: str) -> dict[str, Any] | None:
    summary = json.loads((folder / "summary.json").read_text())
    if summary.get("status") != "finished":
        return None
    config = json.loads((folder / "config.json").read_text())
    row = summary[which_round]
    values = {c: None if row.get(c) is None else 100.0 * float(row[c]) for c in TEST_COLUMNS}
    history = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else []
    for label, key in BYTES_COLUMNS.items():
        per_round = [float(r[key]) for r in history if r.get(key) is not None]
        values[label] = float(np.mean(per_round)) / 1e3 if per_round else None
    curves = {
        "val": {
            int(r["round"]): 100.0 * float(r["eval"]["val"][summary.get("metric", "accuracy")])
            for r in history
            if r.get("eval", {}).get("val")
        },
        "train-loss": {
            int(r["round"]): float(r["train-loss"])
            for r in history
            if r.get("train-loss") is not None and not r.get("skipped")
        },
    }
    return {"name": folder.name, "config": config, "values": values, "curves": curves, "history": history}


def stats(values: list[float]) -> dict[str, float]:
    from scipy import stats as sps

    arr = np.asarray(values, dtype=float)
    out = {"n": arr.size, "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "below": 0, "above": 0}
    if arr.size:
        out["mean"] = float(arr.mean())
        out["std"] = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        out["below"], out["above"] = int((arr < 0).sum()), int((arr > 0).sum())
    if arr.size > 1:
        half = float(sps.t.ppf(0.975, arr.size - 1)) * out["std"] / math.sqrt(arr.size)
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


def fmt(st: dict[str, float], interval: bool) -> str:
    if st["n"] == 0:
        return "-"
    text = f"{st['mean']:+.2f}" if interval else f"{st['mean']:.2f}"
    if st["n"] > 1:
        text += f" ± {st['std']:.2f}"
    if interval and st["n"] > 1:
        text += f" [{st['lo']:+.2f}, {st['hi']:+.2f}]"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", type=Path, help="grid output folders (holding runs/) or runs/ folders")
    parser.add_argument("--arm", action="append", type=parse_arm, required=True, help="NAME:key=value[,key=value]")
    parser.add_argument("--baseline", help="the arm the others are compared with (default: the first)")
    parser.add_argument("--by", action="append", default=[], help="group key (repeatable); the rest is pooled")
    parser.add_argument(
        "--where",
        action="append",
        type=lambda s: parse_arm("where:" + s)[1],
        default=[],
        help="key=value[,key=value]: keep only runs matching (repeatable)",
    )
    parser.add_argument(
        "--residual", action="append", default=[], help="arm whose change the other arms should explain"
    )
    parser.add_argument("--round", choices=("final", "best"), default="final")
    parser.add_argument("--columns", help="comma-separated subset of the columns to print (default: all)")
    parser.add_argument("--csv", type=Path, help="write the long-format CSV here")
    parser.add_argument("--plot", type=Path, help="write a PNG of a per-round curve per arm here")
    parser.add_argument(
        "--plot-metric",
        choices=("val", "train-loss"),
        default="val",
        help="the curve --plot draws: val (%%, evaluated rounds) or train-loss (every round)",
    )
    parser.add_argument("--title", default="", help="heading of the markdown output and the plot")
    args = parser.parse_args(argv)

    arms = dict(args.arm)
    if len(arms) != len(args.arm):
        parser.error("arm names must be unique")
    baseline = args.baseline or args.arm[0][0]
    if baseline not in arms or any(r not in arms or r == baseline for r in args.residual):
        parser.error("--baseline and --residual must name arms (not the baseline itself)")
    arm_keys = {k for a in arms.values() for k in a}
    ignored = BOOKKEEPING | arm_keys | (PROFILE_KEYS if "comm-profile" in arm_keys else frozenset())

    runs, skipped, unmatched = [], 0, 0
    for folder in run_folders(args.grids):
        run = load_run(folder, args.round)
        if run is None:
            skipped += 1
            continue
        if any(any(run["config"].get(k) != v for k, v in w.items()) for w in args.where):
            continue
        matches = [n for n, a in arms.items() if all(run["config"].get(k) == v for k, v in a.items())]
        if len(matches) > 1:
            parser.error(f"run {run['name']} matches arms {matches}; make them more specific")
        if not matches:
            unmatched += 1
            continue
        run["arm"] = matches[0]
        runs.append(run)
    if not runs:
        parser.error("no finished run matches any arm")

    columns = [*TEST_COLUMNS, *BYTES_COLUMNS]
    shown = args.columns.split(",") if args.columns else columns
    unknown = [c for c in shown if c not in columns]
    if unknown:
        parser.error(f"unknown columns {unknown}; use {columns}")
    group_of = lambda run: tuple(run["config"].get(k) for k in args.by)  # noqa: E731
    pair_key = lambda run: json.dumps(  # noqa: E731
        {k: v for k, v in run["config"].items() if k not in ignored}, sort_keys=True
    )
    by_pair: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in runs:
        slot = by_pair[pair_key(run)]
        if run["arm"] in slot:
            parser.error(f"runs {slot[run['arm']]['name']} and {run['name']} are the same arm of one pair")
        slot[run["arm"]] = run

    groups = sorted({group_of(r) for r in runs}, key=lambda g: json.dumps(g))
    csv_rows: list[list[Any]] = []
    out: list[str] = []
    if args.title:
        out += [f"# {args.title}", ""]
    out += [
        f"{len(runs)} finished runs in {len(arms)} arms ({', '.join(arms)}); {skipped} unfinished, "
        f"{unmatched} matching no arm. Metric in % at the {args.round} round; kB per client per round.",
        "",
        "## Values (mean ± std over runs)",
        "",
        "| " + " | ".join([*args.by, "arm", "runs", *shown]) + " |",
        "|---" * (len(args.by) + 2 + len(shown)) + "|",
    ]
    for group in groups:
        for arm in arms:
            members = [r for r in runs if r["arm"] == arm and group_of(r) == group]
            if not members:
                continue
            row = [str(g) for g in group] + [arm, str(len(members))]
            for col in columns:
                st = stats([r["values"][col] for r in members if r["values"][col] is not None])
                if col in shown:
                    row.append(fmt(st, interval=False))
                csv_rows.append(["value", *group, arm, col, st["n"], st["mean"], st["std"], "", "", "", "", ""])
            out.append("| " + " | ".join(row) + " |")

    def differences(kind: str, name: str, label: str, per_pair, noop=None) -> None:
        """A table of ``per_pair(slot) -> (group, {column: difference}) | None``; with ``noop(slot) -> reason | None``
        it counts the no-op pairs and adds the differences over the other pairs."""
        counted = noop is not None
        out.extend(
            [
                "",
                f"## {label}",
                "",
                "| "
                + " | ".join([*args.by, *(["pairs used"] if counted else []), "pairs"])
                + (" | no-op" if counted else "")
                + " | "
                + " | ".join(shown)
                + " |",
                "|---" * (len(args.by) + 1 + 2 * counted + len(shown)) + "|",
            ]
        )
        for group in groups:
            slots = [slot for slot in by_pair.values() if (d := per_pair(slot)) and d[0] == group]
            if not slots:
                continue
            flagged = [noop(slot) is not None for slot in slots] if counted else [False] * len(slots)
            parts = [("all", kind, slots)]
            if counted:
                parts.append(("differing", kind + "-differing", [s for s, f in zip(slots, flagged) if not f]))
            for used, row_kind, chosen in parts:
                diffs = [per_pair(slot) for slot in chosen]
                row = [str(g) for g in group] + ([used] if counted else []) + [str(len(diffs))]
                if counted:
                    row.append(str(sum(flagged)))
                for col in columns:
                    st = stats([d[1][col] for d in diffs if d[1][col] is not None])
                    if col in shown:
                        row.append(fmt(st, interval=True))
                    figures = [st["n"], st["mean"], st["std"], st["lo"], st["hi"], st["below"], st["above"]]
                    csv_rows.append([row_kind, *group, name, col, *figures, sum(flagged) if counted else ""])
                out.append("| " + " | ".join(row) + " |")

    def delta(slot: dict, arm: str) -> dict[str, float | None]:
        a, b = slot[arm]["values"], slot[baseline]["values"]
        return {c: None if a[c] is None or b[c] is None else a[c] - b[c] for c in columns}

    for arm in arms:
        if arm == baseline:
            continue
        differences(
            "difference",
            f"{arm} - {baseline}",
            f"Paired differences {arm} - {baseline} (mean ± std [95% t interval]); no-op: pairs whose two runs "
            "ran the same algorithm (identical per-round results, or an alignment that changed nothing); "
            "'differing' leaves them out",
            lambda slot, arm=arm: (group_of(slot[arm]), delta(slot, arm)) if arm in slot and baseline in slot else None,
            lambda slot, arm=arm: no_op_pair(
                slot[arm]["config"],
                slot[arm]["history"],
                slot[baseline]["config"],
                slot[baseline]["history"],
                (slot[arm]["values"], slot[baseline]["values"]),
            ),
        )
    for arm in args.residual:

        def residual(slot: dict, arm: str = arm):
            if arm not in slot or baseline not in slot:
                return None
            others = [o for o in slot if o not in (arm, baseline)]
            if not others:
                return None
            total = delta(slot, arm)
            for other in others:
                part = delta(slot, other)
                total = {c: None if total[c] is None or part[c] is None else total[c] - part[c] for c in columns}
            return group_of(slot[arm]), total

        differences(
            "residual",
            f"{arm} - {baseline} - other arms",
            f"Residual: ({arm} - {baseline}) minus the other arms' differences, per pair (mean ± std [95% t interval])",
            residual,
        )
        subtracted: dict[tuple, set[str]] = defaultdict(set)
        for slot in by_pair.values():
            if arm in slot and baseline in slot:
                subtracted[group_of(slot[arm])].add(
                    ", ".join(o for o in arms if o in slot and o not in (arm, baseline))
                )
        out += [
            "",
            "Arms subtracted: "
            + "; ".join(
                f"{', '.join(map(str, g)) or 'all'}: {' / '.join(sorted(v)) or 'none'}"
                for g, v in sorted(subtracted.items(), key=lambda kv: json.dumps(kv[0]))
            )
            + ".",
        ]

    print("\n".join(out))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "kind",
                    *args.by,
                    "arm",
                    "column",
                    "n",
                    "mean",
                    "std",
                    "ci95_low",
                    "ci95_high",
                    "below_zero",
                    "above_zero",
                    "noop_pairs",
                ]
            )
            for row in csv_rows:
                writer.writerow([f"{x:.4f}" if isinstance(x, float) else x for x in row])
    if args.plot:
        plot(runs, groups, list(arms), args.by, group_of, args.plot, args.title, args.plot_metric)
    return 0


def plot(runs, groups, arms, by, group_of, path: Path, title: str, metric: str = "val") -> None:
    """One panel per group: the mean over each arm's runs of ``metric`` per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for index, arm in enumerate(arms):
            curves = [
                r["curves"][metric] for r in runs if r["arm"] == arm and group_of(r) == group and r["curves"][metric]
            ]
            if not curves:
                continue
            rounds = sorted({k for c in curves for k in c})
            mean = [float(np.mean([c[k] for c in curves if k in c])) for k in rounds]
            # dashed and thinning lines keep arms that coincide visible on top of each other
            ax.plot(
                rounds,
                mean,
                marker=".",
                linestyle=("-", "--", ":", "-.")[index % 4],
                linewidth=2.6 - 0.5 * (index % 4),
                label=f"{arm} ({len(curves)} runs)",
            )
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(by, group)) or "all", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(("val (%)" if metric == "val" else "train loss") + ", mean over runs")
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    if title:  # wrapped to the figure's width (a single panel is narrow)
        fig.suptitle(textwrap.fill(title, width=int(22 * cols + 20)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

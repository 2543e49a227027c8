"""scripts/paired_differences.py on run folders with planted accuracies: pairs, pooling, residuals."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("same-as-train", "miss-both", "full-modal", "text-only", "image-only", "val")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("paired_differences", ROOT / "scripts" / "paired_differences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(runs: Path, name: str, config: dict, accuracy: float, status: str = "finished") -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    base = {"method": "fedprime", "seed": 0, "missing-setting": "miss-both", "run-name": name, "results-dir": "x"}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    final = {s: accuracy for s in SETTINGS}
    (folder / "summary.json").write_text(json.dumps({"status": status, "metric": "accuracy", "final": final}))
    rounds = [{"round": 1, "bytes-sent-per-client": 1000.0, "bytes-received-per-client": 1000.0, "train-loss": 1.0}]
    (folder / "metrics.json").write_text(json.dumps(rounds))


def rows(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with open(path) as handle:
        return {(r["kind"], r["method"], r["arm"], r["column"]): r for r in csv.DictReader(handle)}


def test_planted_differences_are_paired_pooled_and_split(tmp_path, script, capsys):
    runs = tmp_path / "runs"
    paper = {"comm-profile": "paper", "exchange-pooler": True, "query-rank": 0}
    # Per seed and setting, lean loses 3 points: 2 from the pooler, 1 it does not explain.
    # Accuracies differ by seed and setting, so only the pairing gives these exact differences.
    for method in ("fedprime", "fedavg-p"):
        for seed in (0, 1, 2):
            for setting, offset in (("miss-text", 0.0), ("miss-image", 0.1)):
                key = {"method": method, "seed": seed, "missing-setting": setting}
                base = 0.5 + 0.05 * seed + offset
                tag = f"{method}-{setting}-{seed}"
                write_run(runs, f"{tag}-paper", {**key, **paper}, base)
                write_run(runs, f"{tag}-lean", {**key, "comm-profile": "lean", "exchange-pooler": False}, base - 0.03)
                write_run(runs, f"{tag}-pool", {**key, **paper, "exchange-pooler": False}, base - 0.02)
    write_run(runs, "unfinished", {"comm-profile": "paper"}, 0.9, status="failed")
    out = tmp_path / "pooled.csv"
    code = script.main(
        [
            str(tmp_path),
            "--arm",
            "paper:comm-profile=paper,exchange-pooler=true,query-rank=0",
            "--arm",
            "lean:comm-profile=lean",
            "--arm",
            "pooler-off:comm-profile=paper,exchange-pooler=false",
            "--by",
            "method",
            "--residual",
            "lean",
            "--csv",
            str(out),
        ]
    )
    assert code == 0
    assert "36 finished runs in 3 arms" in capsys.readouterr().out
    table = rows(out)
    # Per-round records hold only a train loss, the same for every run, but the runs' accuracies differ.
    assert {r["noop_pairs"] for k, r in table.items() if k[0] == "difference"} == {"0"}
    for method in ("fedprime", "fedavg-p"):
        lean = table[("difference", method, "lean - paper", "full-modal")]
        assert int(lean["n"]) == 6 and float(lean["mean"]) == pytest.approx(-3.0, abs=1e-3)
        assert float(lean["std"]) == pytest.approx(0.0, abs=1e-3) and int(lean["below_zero"]) == 6
        pool = table[("difference", method, "pooler-off - paper", "val")]
        assert float(pool["mean"]) == pytest.approx(-2.0, abs=1e-3)
        residual = table[("residual", method, "lean - paper - other arms", "same-as-train")]
        assert float(residual["mean"]) == pytest.approx(-1.0, abs=1e-3)
        sent = table[("value", method, "paper", "kB sent per client per round")]
        assert float(sent["mean"]) == pytest.approx(1.0)


def test_a_run_matching_two_arms_is_an_error(tmp_path, script):
    write_run(tmp_path / "runs", "a", {"comm-profile": "paper", "exchange-pooler": False}, 0.5)
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--arm", "p:comm-profile=paper", "--arm", "q:exchange-pooler=false"])


def write_history(runs: Path, name: str, accuracy: float, loss: float, noop: list[int] | None = None) -> None:
    """Replace a planted run's metrics.json with two rounds of results (evaluations, train loss, pool size)."""
    evaluation = {s: {"accuracy": accuracy, "macro_f1": accuracy, "loss": 1.0} for s in SETTINGS}
    rounds = []
    for r in (1, 2):
        record = {"round": r, "train-loss": loss / r, "inter-pool-size": 6, "eval": evaluation}
        if noop is not None:
            record["inter-align-noop"] = noop[r - 1]
        rounds.append(record)
    (runs / name / "metrics.json").write_text(json.dumps(rounds))


def test_no_op_pairs_are_counted_and_left_out_of_the_differing_rows(tmp_path, script, capsys):
    runs = tmp_path / "runs"
    # seeds 0, 1: the same algorithm under both names (identical results; an alignment that changed
    # nothing with float noise in the loss); seeds 2, 3: align 3 points better.
    for seed, flags in ((0, None), (1, [1, 1]), (2, [0, 1]), (3, None)):
        base = 0.5 + 0.02 * seed
        gain = 0.03 if seed >= 2 else 0.0
        for merge, accuracy, loss in (("position", base, 2.0), ("align", base + gain, 2.0 + 1e-12 * seed)):
            name = f"s{seed}-{merge}"
            write_run(runs, name, {"seed": seed, "inter-merge": merge}, accuracy)
            write_history(runs, name, accuracy, loss, flags if merge == "align" else None)
    out = tmp_path / "noop.csv"
    code = script.main(
        [str(tmp_path), "--arm", "position:inter-merge=position", "--arm", "align:inter-merge=align", "--by", "method"]
        + ["--csv", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "| method | pairs used | pairs | no-op | same-as-train |" in text
    assert "| fedprime | all | 4 | 2 | +1.50" in text and "| fedprime | differing | 2 | 2 | +3.00" in text
    table = rows(out)
    every = table[("difference", "fedprime", "align - position", "miss-both")]
    differing = table[("difference-differing", "fedprime", "align - position", "miss-both")]
    assert (int(every["n"]), int(every["noop_pairs"])) == (4, 2) and float(every["mean"]) == pytest.approx(1.5)
    assert int(differing["n"]) == 2 and float(differing["mean"]) == pytest.approx(3.0)

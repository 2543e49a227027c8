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

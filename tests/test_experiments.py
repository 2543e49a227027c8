"""The experiments runner: grid files, real `flwr run` cells, resumability, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedprime_core.config import ConfigError
from fedprime_core.experiments import cell_status, load_plan, main, run_plan, table_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grid", ["smoke", "paper-food101", "paper-mmimdb"])
def test_shipped_grids_are_valid(grid):
    plan = load_plan(ROOT / "experiments" / f"{grid}.yaml")
    assert plan.cells
    names = [c.name for c in plan.cells]
    assert len(names) == len(set(names))
    kinds = {g.split("-")[0] for c in plan.cells for g in c.grids}
    assert {"main", "ablation", "robustness"} <= kinds
    shared = [c for c in plan.cells if len(c.grids) > 1]
    assert shared, "ablation cells identical to main cells must run once"


def test_alignment_grid_pairs_align_with_position_and_resolves_its_table():
    plan = load_plan(ROOT / "experiments" / "alignment.yaml")
    fedprime = [c for c in plan.cells if c.config["method"] == "fedprime"]
    assert len(fedprime) == 2 * 2 * 3  # align/position x two backbones x three seeds
    pairs = {}
    for cell in fedprime:
        key = (cell.config["backbone"], cell.config["seed"])
        pairs.setdefault(key, set()).add(cell.config["inter-merge"])
    assert all(merges == {"align", "position"} for merges in pairs.values())
    assert {c.config["method"] for c in plan.cells} == {"fedprime", "fed-intra", "fedavg-p", "pfpt"}
    # The missing table is named relative to the grid file and resolved against it at run time.
    cell = plan.cells[0]
    assert cell.config["missing-table"] == "alignment-missing-table.yaml"
    resolved = Path(plan.resolve_paths(cell.config)["missing-table"])
    assert resolved.is_absolute() and resolved.is_file()


def test_paper_grids_use_the_paper_settings():
    plan = load_plan(ROOT / "experiments" / "paper-food101.yaml")
    cell = next(c for c in plan.cells if c.config["method"] == "fedprime")
    cfg = cell.config
    assert (cfg["model"], cfg["num-classes"], cfg["num-server-rounds"], cfg["tau"], cfg["kappa"]) == (
        "dandelin/vilt-b32-mlm",
        8,
        250,
        20,
        5,
    )
    assert plan.federation["num-supernodes"] == 20


def test_bad_grid_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grids:\n  main:\n    method: [fedprime, nope]\n")
    with pytest.raises(ConfigError, match="sub-grid 'main'.*'method' = 'nope'"):
        load_plan(bad)
    bad.write_text("grid:\n  main: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        load_plan(bad)
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
def test_a_small_grid_runs_with_flwr_and_is_not_recomputed(tmp_path, tiny_vilt, capsys):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(
        f"""
name: tiny
output: {tmp_path / "out"}
federation: {{num-supernodes: 2, client-resources-num-cpus: 1}}
base: {{num-server-rounds: 1, max-train-samples: 240, max-test-samples: 80, tau: 6, kappa: 2,
        fraction-evaluate: 0.0, missing-setting: miss-text}}
grids:
  main: {{method: [fedprime, fedavg-p], seed: [0]}}
  ablation: {{method: [fedprime], seed: [0]}}
"""
    )
    plan = load_plan(grid)
    assert len(plan.cells) == 2
    records = run_plan(plan, echo=False)
    assert [r["status"] for r in records] == ["done", "done"]
    assert all(cell_status(plan, c)[0] == "done" for c in plan.cells)
    rows = table_rows(plan, "main")
    assert {r["method"] for r in rows} == {"fedprime", "fedavg-p"}
    assert all(0.0 <= r["full-modal"][0] <= 1.0 for r in rows)
    table = (plan.output / "main_table.md").read_text()
    assert "| miss-text | 0.7 | fedprime | 1 |" in table
    assert (plan.output / "ablation_table.csv").is_file()
    assert list(plan.output.glob("convergence_*.png"))
    again = run_plan(plan, echo=False)
    assert all(r.get("skipped") for r in again)  # a finished cell is not recomputed
    cells = json.loads((plan.output / "cells.json").read_text())
    assert len(cells) == 2

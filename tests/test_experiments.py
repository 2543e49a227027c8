"""The experiments runner: grid files, real `flwr run` cells, resumability, tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedprime_core.config import ConfigError
from fedprime_core.data.missing import TEST_SETTINGS
from fedprime_core.tools.experiments.__main__ import main
from fedprime_core.tools.experiments.plan import by_seed, cell_name, completed_rounds, load_plan, stale_settings
from fedprime_core.tools.experiments.report import (
    comparison,
    curve_label,
    table_rows,
    varying_keys,
    write_comparison,
    write_report,
)
from fedprime_core.tools.experiments.run import cell_status, run_cell, run_plan
from tests.planted_runs import fake_run

ROOT = Path(__file__).resolve().parents[1]


def write_grid(tmp_path: Path, name: str, body: str) -> Path:
    """A grid file ``<tmp_path>/<name>.yaml`` named ``name``, writing to ``<tmp_path>/out``, with ``body`` after."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    grid = tmp_path / f"{name}.yaml"
    grid.write_text(f"name: {name}\noutput: {tmp_path / 'out'}\n{body}")
    return grid


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


GRID_FILES = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if "missing-table" not in p.name)


@pytest.mark.parametrize("path", GRID_FILES, ids=[p.stem for p in GRID_FILES])
def test_every_shipped_grid_file_is_valid(path):
    plan = load_plan(path)
    assert plan.cells and len({c.name for c in plan.cells}) == len(plan.cells)
    assert path.read_text().startswith("#")  # each says what it is for and how it was run


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
    # The paper's one global missing table; its heterogeneous variant in a grid file of its own.
    assert all(c.config["missing-alpha"] == 0.0 and c.config["fraction-evaluate"] == 1.0 for c in plan.cells)
    variant = load_plan(ROOT / "experiments" / "paper-food101-heterogeneous.yaml")
    assert {c.config["missing-alpha"] for c in variant.cells} == {1.0}
    twins = {c.name for c in plan.cells if "main" in c.grids[0]}
    assert {cell_name({**c.config, "missing-alpha": 0.0}) for c in variant.cells} <= twins  # all else equal


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
@pytest.mark.flower
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
    # Run folders kept in git without their checkpoint arrays (experiments/README.md): a finished
    # one still counts as done; a partial one cannot resume, so it is set aside and run again.
    done_dir, partial_dir = (plan.runs_dir / c.name for c in plan.cells)
    for folder in (done_dir, partial_dir):
        for arrays in folder.glob("checkpoint-*.npz"):
            arrays.unlink()
    meta = json.loads((partial_dir / "checkpoint.json").read_text())
    (partial_dir / "checkpoint.json").write_text(json.dumps({**meta, "round": 0}))
    capsys.readouterr()
    assert main(["plan", str(grid)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:2]] == ["done", "restart"]
    third = run_plan(plan, echo=False)
    assert third[0] == {"cell": plan.cells[0].name, "status": "done", "skipped": True}
    assert third[1]["status"] == "done" and third[1]["resumed-from"] is None
    aside = Path(third[1]["set-aside"])
    assert aside.parent == plan.output / "runs-set-aside" and (aside / "metrics.json").is_file()
    assert cell_status(plan, plan.cells[1]) == ("done", 1) and list(partial_dir.glob("checkpoint-*.npz"))
    assert "cannot resume; the folder is set aside" in capsys.readouterr().out


def test_an_option_added_later_keeps_cell_names_and_a_changed_default_is_refused(tmp_path, capsys):
    grid = tmp_path / "names.yaml"
    grid.write_text(
        f"""
name: names
output: {tmp_path / "out"}
base: {{num-server-rounds: 2, lr: 0.1}}
grids:
  main: {{method: [fedprime], seed: [0, 1]}}
"""
    )
    plan = load_plan(grid)
    first, second = plan.cells
    # A key the options table gains later enters the config at its default: same name.
    older = {k: v for k, v in first.config.items() if k != "node-wait"}
    assert cell_name(older) == first.name
    assert cell_name({**first.config, "lr": 0.2}) != first.name  # a changed setting is a new cell
    # A run folder from before the key existed stands for the cell ...
    for cell in plan.cells:
        fake_run(plan, cell, accuracy=0.5, bytes_sent=100.0, pool=3)
        stored = {k: v for k, v in cell.config.items() if k != "node-wait"}
        (plan.runs_dir / cell.name / "checkpoint.json").write_text(json.dumps({"round": 2}))
        (plan.runs_dir / cell.name / "config.json").write_text(json.dumps(stored))
    assert stale_settings(first.config, older) == []
    # ... but one made when a default differed is refused, naming the setting, without running.
    stored = {**second.config, "momentum": 0.5}
    (plan.runs_dir / second.name / "config.json").write_text(json.dumps(stored))
    records = run_plan(plan, echo=False)
    assert records[0] == {"cell": first.name, "status": "done", "skipped": True}
    assert (
        records[1]["status"] == "failed"
        and "'momentum' (0.5 in the run folder, 0.0 in the grid)" in records[1]["reason"]
    )
    capsys.readouterr()
    assert main(["plan", str(grid)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:2]] == ["done", "stale"]
    # Settings that may change on resume, and file paths, are not compared.
    assert stale_settings(first.config, {**first.config, "round-timeout": 5.0, "data-dir": "/elsewhere"}) == []


def test_by_seed_runs_every_arm_of_a_seed_before_the_next_seed(tmp_path, capsys):
    grid = write_grid(
        tmp_path,
        "order",
        "base: {num-server-rounds: 1}\ngrids:\n"
        "  a: {method: [fedprime], inter-merge: [align, position], seed: [0, 1]}\n"
        "  b: {method: [fed-inter, pfpt], seed: [0, 1]}\n",
    )
    plan = load_plan(grid)
    arms = lambda cells: [(c.config["seed"], c.config["method"], c.config["inter-merge"]) for c in cells]  # noqa: E731
    assert [seed for seed, _, _ in arms(plan.cells)] == [0, 1, 0, 1, 0, 1, 0, 1]
    ordered = by_seed(plan.cells)
    assert arms(ordered) == [
        (0, "fedprime", "align"),
        (0, "fedprime", "position"),
        (0, "fed-inter", "align"),
        (0, "pfpt", "align"),
        (1, "fedprime", "align"),
        (1, "fedprime", "position"),
        (1, "fed-inter", "align"),
        (1, "pfpt", "align"),
    ]
    assert {c.name for c in ordered} == {c.name for c in plan.cells}  # the same cells under the same names
    capsys.readouterr()
    assert main(["plan", str(grid), "--by-seed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[2] for line in lines if line.split()[0] in ("todo", "partial", "done")]
    assert (
        len(listed) == len(plan.cells)
        and lines[-2] == "8 cells to run; no finished run of their methods in this grid to time them by"
    )
    assert listed == [c.name for c in ordered]


def test_raising_a_grids_rounds_resumes_its_runs_under_their_new_names(tmp_path, capsys):
    from fedprime_core.tools.experiments.plan import resumable_folder

    def grid(rounds: int, lr: str = "0.1") -> Path:
        return write_grid(
            tmp_path,
            "longer",
            f"""
base: {{num-server-rounds: {rounds}, eval-every: {rounds}, lr: {lr}}}
grids:
  main: {{method: [fedprime, fed-inter], seed: [0]}}
""",
        )

    short = load_plan(grid(2))
    for cell in short.cells:
        fake_run(short, cell, accuracy=0.5, bytes_sent=100.0, pool=3)
        (short.runs_dir / cell.name / "checkpoint.json").write_text(json.dumps({"round": 2}))
        (short.runs_dir / cell.name / "config.json").write_text(json.dumps(cell.config))
    long = load_plan(grid(4))  # more rounds, evaluated at the end: every cell has a new name
    assert not {c.name for c in long.cells} & {c.name for c in short.cells}
    for old, new in zip(short.cells, long.cells):
        assert resumable_folder(long, new) == (short.runs_dir / old.name, [short.runs_dir / old.name])
    capsys.readouterr()
    assert main(["plan", str(grid(4))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["resumes", "2"], ["resumes", "2"]]
    assert f"(resumes {short.cells[0].name})" in lines[0]
    # Fewer rounds than the folder holds, or a setting that is not resumable: nothing to resume.
    assert resumable_folder(load_plan(grid(1)), load_plan(grid(1)).cells[0]) == (None, [])
    assert resumable_folder(load_plan(grid(4, "0.2")), load_plan(grid(4, "0.2")).cells[0]) == (None, [])
    # Two folders that could both be the run: ambiguous, so neither is taken.
    twin = short.runs_dir / (short.cells[0].name[:-8] + "0" * 8)
    shutil.copytree(short.runs_dir / short.cells[0].name, twin)
    folder, candidates = resumable_folder(long, long.cells[0])
    assert folder is None and len(candidates) == 2
    shutil.rmtree(twin)
    # A folder that was finished under the new rounds already is taken and skipped, not rerun.
    (short.runs_dir / short.cells[1].name / "checkpoint.json").write_text(json.dumps({"round": 4}))
    long = load_plan(grid(4))
    (short.runs_dir / short.cells[0].name).rename(short.runs_dir / "elsewhere")  # only the done cell is run
    records = [run_cell(long, long.cells[1], tmp_path / "home", echo=False)]
    assert records == [
        {"cell": long.cells[1].name, "status": "done", "skipped": True, "adopted-from": short.cells[1].name}
    ]
    assert (long.runs_dir / long.cells[1].name / "summary.json").is_file()
    assert not (short.runs_dir / short.cells[1].name).exists()


def test_convergence_curves_keep_profiles_and_backbones_apart():
    plan = load_plan(ROOT / "experiments" / "comm-alignment.yaml")
    fedprime = [c for c in plan.cells if c.config["method"] == "fedprime"]
    labels = {curve_label(c, fedprime) for c in fedprime}
    assert "fedprime backbone=vilt model=tiny-vilt inter-merge=align comm-profile=paper" in labels
    assert "fedprime backbone=text-encoder model=tiny-bert inter-merge=position comm-profile=lean" in labels
    assert len(labels) == len(fedprime) // 3  # one curve per arm, the three seeds averaged
    assert all("wire-dtype" not in label for label in labels)  # the profile names its own keys


def test_comparison_tables_give_means_extras_and_paired_differences(tmp_path):
    grid = tmp_path / "cmp.yaml"
    grid.write_text(
        f"""
name: cmp
output: {tmp_path / "out"}
base: {{num-server-rounds: 2, missing-setting: none}}
grids:
  skew: {{method: [pfpt, fed-intra], label-alpha: [0.1, 0.0], seed: [0, 1, 2]}}
  other: {{method: [fedprime], seed: [0]}}
tables:
  skew:
    extra:
      - {{key: bytes-sent, per: sampled, over: mean, scale: 1.0e-3, label: kB}}
      - {{key: inter-pool-size, over: final}}
    differences:
      - {{key: method, value: pfpt, minus: fed-intra}}
"""
    )
    plan = load_plan(grid)
    assert [t.name for t in plan.tables] == ["skew"]
    table = plan.tables[0]
    assert varying_keys(plan, table) == ["method", "label-alpha"]  # seed excepted; the other sub-grid is not in it
    for cell in plan.cells:
        if "skew" not in cell.grids:
            continue
        cfg = cell.config
        gain = 0.05 + 0.01 * cfg["seed"] if cfg["method"] == "pfpt" else 0.0  # pfpt better by 5, 6, 7 points
        fake_run(plan, cell, 0.5 + 0.1 * cfg["seed"] + gain, 1000.0 * (1 + (cfg["method"] == "pfpt")), 10)
    data = comparison(plan, table)
    row = next(r for r in data["rows"] if r["key"] == {"method": "pfpt", "label-alpha": 0.1})
    assert row["runs"] == 3
    assert row["stats"]["full-modal"]["mean"] == pytest.approx(100 * (0.6 + 0.06))
    assert row["stats"]["full-modal"]["std"] == pytest.approx(100 * 0.11)  # seeds 0, 1, 2: 0.55, 0.66, 0.77
    assert row["stats"]["kB"]["mean"] == pytest.approx(1.5 * 2)  # bytes per client per round: mean of 2 and 4 kB
    assert row["stats"]["inter-pool-size (final)"]["mean"] == 12
    diffs = [d for d in data["differences"] if d["key"] == {"label-alpha": 0.1}]
    assert len(diffs) == 1 and diffs[0]["runs"] == 3
    stat = diffs[0]["stats"]["full-modal"]
    assert stat["mean"] == pytest.approx(6.0) and stat["std"] == pytest.approx(1.0)
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2)
    assert (stat["lo"], stat["hi"]) == pytest.approx((6.0 - half, 6.0 + half))
    write_report(plan)
    text = (plan.output / "skew.md").read_text()
    assert "| method | label-alpha | runs | same-as-train |" in text
    assert "## Paired differences: method = pfpt minus method = fed-intra" in text
    assert f"6.00 ± 1.00 [{6 - half:.2f}, {6 + half:.2f}]" in text
    lines = (plan.output / "skew.csv").read_text().splitlines()
    assert lines[0] == "kind,method,label-alpha,column,n,mean,std,ci95_low,ci95_high,noop_pairs"
    assert any(line.startswith("difference,pfpt - fed-intra,0.1,full-modal,3,6,") for line in lines)
    # The planted runs record no results per round, so no pair can be told to be a no-op.
    assert diffs[0]["noop"] == 0 and diffs[0]["differing"]["full-modal"]["n"] == 3


def test_bad_tables_name_the_problem(tmp_path):
    grid = tmp_path / "bad.yaml"
    head = "grids:\n  skew: {method: [pfpt, fed-intra], seed: [0, 1]}\ntables:\n"
    grid.write_text(head + "  skew: {grids: [nope]}\n")
    with pytest.raises(ConfigError, match="no sub-grid named \\['nope'\\]"):
        load_plan(grid)
    grid.write_text(head + "  skew: {differences: [{key: method, value: pfpt, minus: fedavg-p}]}\n")
    with pytest.raises(ConfigError, match="no cell of the table has method = 'fedavg-p'"):
        load_plan(grid)
    grid.write_text(head + "  skew: {extra: [{key: bytes-sent, over: median}]}\n")
    with pytest.raises(ConfigError, match="'over' must be one of"):
        load_plan(grid)
    grid.write_text(head + "  skew: {colour: red}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_plan(grid)


def test_a_comm_profile_difference_pairs_each_lean_run_with_its_paper_twin(tmp_path):
    from fedprime_core.config import with_profile

    grid = tmp_path / "comm.yaml"
    grid.write_text(
        f"""
name: comm
output: {tmp_path / "out"}
base: {{num-server-rounds: 2, missing-setting: miss-both}}
grids:
  comm: {{method: [fedprime, fed-intra], seed: [0, 1, 2], comm-profile: [paper, lean]}}
  pinned: {{method: [fedprime], seed: [0], comm-profile: [lean], wire-dtype: [float32]}}
tables:
  comm:
    grids: [comm, pinned]
    differences:
      - {{key: comm-profile, value: lean, minus: paper}}
"""
    )
    plan = load_plan(grid)
    table = plan.tables[0]
    # upload-delta and query-rank differ between the cells only because the
    # profile does: no rows of their own; wire-dtype was pinned by one cell, so it is an axis.
    assert varying_keys(plan, table) == ["method", "comm-profile", "wire-dtype"]
    for cell in plan.cells:
        cfg = cell.config
        cost = 0.01 * (1 + cfg["seed"]) if cfg["comm-profile"] == "lean" else 0.0  # lean 1, 2, 3 points worse
        fake_run(plan, cell, 0.6 + 0.1 * cfg["seed"] - cost, 1000.0, 10)
    data = comparison(plan, table)
    by_key = {(d["key"]["method"], d["key"]["wire-dtype"]): d for d in data["differences"]}
    assert set(by_key) == {("fedprime", "float16"), ("fed-intra", "float16"), ("fedprime", "float32")}
    for key in (("fedprime", "float16"), ("fed-intra", "float16")):
        stat = by_key[key]["stats"]["val"]
        assert by_key[key]["runs"] == 3  # every seed's lean run paired with its paper twin
        assert stat["mean"] == pytest.approx(-2.0) and stat["std"] == pytest.approx(1.0)
    # The run that pinned wire-dtype=float32 keeps it in its twin, which is the paper run of seed 0.
    pinned = by_key[("fedprime", "float32")]
    assert pinned["runs"] == 1 and pinned["stats"]["val"]["mean"] == pytest.approx(-1.0)
    twin = with_profile(next(c.config for c in plan.cells if "pinned" in c.grids), "paper")
    assert (twin["wire-dtype"], twin["upload-delta"], twin["query-rank"], twin["exchange-pooler"]) == (
        "float32",
        False,
        0,
        True,
    )
    write_report(plan)
    assert (
        "## Paired differences: comm-profile = lean minus comm-profile = paper" in (plan.output / "comm.md").read_text()
    )


def planted_run(plan, cell, accuracy: float, loss: float, noop: list[int] | None = None) -> None:
    """A finished run whose metrics.json holds per-round results (two rounds), as the ServerApp writes them."""
    run = plan.runs_dir / cell.name
    run.mkdir(parents=True)
    evaluation = {s: {"accuracy": accuracy, "macro_f1": accuracy / 2, "loss": 1.0} for s in ("val", *TEST_SETTINGS)}
    rounds = [{"round": 0, "eval": evaluation}]
    for r in (1, 2):
        record = {"round": r, "train-loss": loss / r, "inter-pool-size": 6, "eval": evaluation, "skipped": False}
        record["client-eval"] = {"test-accuracy": accuracy, "test-num-examples": 40, "num-examples": 8}
        if noop is not None:
            record["inter-align-noop"] = noop[r - 1]
        rounds.append(record)
    (run / "metrics.json").write_text(json.dumps(rounds))
    final = {"round": 2, **{s: accuracy for s in ("val", *TEST_SETTINGS)}}
    (run / "summary.json").write_text(json.dumps({"metric": "accuracy", "final": final, "best": final}))


def test_paired_differences_count_pairs_in_which_both_arms_ran_the_same_algorithm(tmp_path):
    from fedprime_core.tools.experiments.report import no_op_pair

    grid = tmp_path / "noop.yaml"
    grid.write_text(
        f"""
name: noop
output: {tmp_path / "out"}
base: {{num-server-rounds: 2, missing-setting: miss-both}}
grids:
  merge: {{method: [fedprime], inter-merge: [align, position], seed: [0, 1, 2, 3]}}
tables:
  merge:
    extra:
      - {{key: client-eval/test-accuracy, over: final, scale: 100, label: clients' own test}}
    differences:
      - {{key: inter-merge, value: align, minus: position}}
"""
    )
    plan = load_plan(grid)
    cells = {(c.config["seed"], c.config["inter-merge"]): c for c in plan.cells}
    # seed 0: the same algorithm, identical results; seed 1: the alignment changed nothing in any
    # round (float noise in the loss); seed 2: it changed something in round 2; seed 3: no flag.
    # Where the arms differ, align is 4 points better.
    for seed, align_flags in ((0, None), (1, [1, 1]), (2, [1, 0]), (3, None)):
        differ = seed >= 2
        planted_run(plan, cells[(seed, "position")], 0.5 + 0.01 * seed, 2.0)
        loss = 2.0 if seed == 0 else 2.0 + 1e-12 * seed
        planted_run(plan, cells[(seed, "align")], 0.5 + 0.01 * seed + 0.04 * differ, loss, align_flags)
    data = comparison(plan, plan.tables[0])
    (row,) = data["differences"]
    assert row["runs"] == 4 and row["noop"] == 2
    assert row["stats"]["full-modal"]["n"] == 4 and row["stats"]["full-modal"]["mean"] == pytest.approx(2.0)
    assert row["differing"]["full-modal"]["n"] == 2 and row["differing"]["full-modal"]["mean"] == pytest.approx(4.0)
    assert row["differing"]["clients' own test"]["mean"] == pytest.approx(4.0)  # the client-side column
    write_report(plan)
    text = (plan.output / "merge.md").read_text()
    assert "| pairs used | pairs | no-op pairs | same-as-train |" in text
    assert "| all | 4 | 2 | 2.00 ± 2.31" in text and "| differing | 2 | 2 | 4.00 ± 0.00" in text
    lines = (plan.output / "merge.csv").read_text().splitlines()
    assert any(line.startswith("difference-differing,align - position,full-modal,2,4,") for line in lines)
    # The flag speaks for align vs position only: the same run against another method is no no-op.
    align, position = (plan.runs_dir / cells[(1, m)].name for m in ("align", "position"))
    history = [json.loads((folder / "metrics.json").read_text()) for folder in (align, position)]
    config = cells[(1, "align")].config
    assert no_op_pair(config, history[0], {**config, "inter-merge": "position"}, history[1]) == "alignment no-op"
    other = {**config, "method": "fed-intra", "inter-merge": "align"}
    assert no_op_pair(config, history[0], other, history[1]) is None


def test_every_alignment_regime_pairs_with_the_position_run_of_its_inter_init(tmp_path):
    """A cold / delta align run pairs with the position run of the same inter-init and seed (a position
    run holds align-start and align-on at their defaults), and the no-op flag still speaks for it."""
    grid = tmp_path / "regimes.yaml"
    grid.write_text(
        f"""
name: regimes
output: {tmp_path / "out"}
base: {{num-server-rounds: 2, missing-setting: miss-both, method: fedprime, inter-init: independent}}
grids:
  position: {{inter-merge: [position], seed: [0, 1]}}
  align: {{inter-merge: [align], align-start: [warm, cold], align-on: [prompt, delta], seed: [0, 1]}}
tables:
  regimes:
    grids: [position, align]
    differences:
      - {{key: inter-merge, value: align, minus: position}}
"""
    )
    plan = load_plan(grid)
    for cell in plan.cells:
        config = cell.config
        noop = config["inter-merge"] == "align" and config["align-start"] == "cold" and config["seed"] == 0
        shift = 0.0 if config["inter-merge"] == "position" else 0.03
        planted_run(plan, cell, 0.5 + shift + 0.01 * config["seed"], 2.0, [1, 1] if noop else [0, 0])
    data = comparison(plan, plan.tables[0])
    rows = {(r["key"]["align-start"], r["key"]["align-on"]): r for r in data["differences"]}
    assert set(rows) == {("warm", "prompt"), ("warm", "delta"), ("cold", "prompt"), ("cold", "delta")}
    for (start, _), row in rows.items():
        assert row["runs"] == 2 and row["stats"]["full-modal"]["mean"] == pytest.approx(3.0)
        assert row["noop"] == (1 if start == "cold" else 0)


def test_table_curves_give_each_arm_per_round_means_over_seeds(tmp_path):
    from fedprime_core.tools.experiments.report import table_curves

    grid = write_grid(
        tmp_path,
        "curves",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  merge: {method: [fedprime], inter-merge: [align, position], seed: [0, 1, 2]}
tables:
  merge:
    extra:
      - {key: client-eval/test-accuracy, over: final, scale: 100, label: clients' own test}
      - {key: inter-pool-size, over: mean}
      - {key: train-loss, over: final, label: final train loss}
""",
    )
    plan = load_plan(grid)
    for cell in plan.cells:
        if cell.config["seed"] == 2 and cell.config["inter-merge"] == "position":
            continue  # unfinished: left out of the curves as of the table
        accuracy = 0.5 + 0.02 * cell.config["seed"] + (0.1 if cell.config["inter-merge"] == "align" else 0.0)
        planted_run(plan, cell, accuracy, 2.0 + cell.config["seed"])
    data = table_curves(plan, plan.tables[0])
    assert data["keys"] == ["inter-merge"]
    # an 'over: mean' column is no curve, and a train-loss column is the first curve already
    assert data["columns"] == ["train loss", "clients' own test"]
    curves = {(c["key"]["inter-merge"], c["column"]): c for c in data["curves"]}
    align = curves[("align", "clients' own test")]
    assert align["rounds"] == [1, 2] and align["n"] == [3, 3]
    assert align["mean"] == pytest.approx([62.0, 62.0]) and align["std"] == pytest.approx([2.0, 2.0])
    loss = curves[("position", "train loss")]  # planted loss / round for seeds 0 and 1: 2, 3 then 1, 1.5
    assert loss["n"] == [2, 2] and loss["mean"] == pytest.approx([2.5, 1.25])
    out = write_report(plan)
    assert out["merge_curves"] == [str(plan.output / "merge_curves.csv"), str(plan.output / "merge_curves.png")]
    lines = (plan.output / "merge_curves.csv").read_text().splitlines()
    assert lines[0] == "inter-merge,column,round,n,mean,std"
    assert "align,clients' own test,2,3,62,2" in lines
    assert (plan.output / "merge_curves.png").stat().st_size > 0


def test_two_factor_differences_and_holm_tests_on_the_primary_column(tmp_path):
    from scipy import stats

    from fedprime_core.tools.experiments.report import holm, primary_tests

    grid = write_grid(
        tmp_path,
        "factors",
        """
base: {num-server-rounds: 2, missing-setting: miss-both, method: fedavg-p}
grids:
  d: {map-prompt-init: [normal, reference], max-grad-norm: [1.0, 0.0], seed: [0, 1, 2, 3]}
tables:
  d:
    primary: same-as-train
    differences:
      - {key: map-prompt-init, value: reference, minus: normal}
      - {key: [map-prompt-init, max-grad-norm], value: [reference, 0.0], minus: [normal, 1.0]}
""",
    )
    plan = load_plan(grid)
    table = plan.tables[0]
    assert table.primary == "same-as-train" and table.differences[1].keys == ("map-prompt-init", "max-grad-norm")
    # The reference init costs 10 points with clipping and 30 without; seeds add their own noise.
    noise = {0: 0.0, 1: 0.01, 2: -0.02, 3: 0.015}
    for cell in plan.cells:
        cfg = cell.config
        cost = 0.0 if cfg["map-prompt-init"] == "normal" else (0.10 if cfg["max-grad-norm"] == 1.0 else 0.30)
        extra = noise[cfg["seed"]] if cfg["map-prompt-init"] == "reference" else 0.0
        fake_run(plan, cell, 0.6 - cost + extra, 1000.0, 10)
    data = comparison(plan, table)
    both = [r for r in data["differences"] if r["diff"] == table.differences[1]]
    assert len(both) == 1 and both[0]["key"] == {} and both[0]["runs"] == 4  # nothing left to group by
    assert both[0]["stats"]["same-as-train"]["mean"] == pytest.approx(-30 + 100 * sum(noise.values()) / 4)
    tests = primary_tests(data, table)
    assert len(tests) == 3  # reference - normal at each clipping level, and the two-factor change
    diffs = [100 * (noise[s] - 0.0) for s in range(4)]
    expected = stats.ttest_1samp([d - 30 for d in diffs], 0.0).pvalue
    joint = next(t for t in tests if t["difference"].startswith("map-prompt-init = reference, max-grad-norm = 0.0"))
    assert joint["p"] == pytest.approx(expected) and joint["n"] == 4
    assert [t["holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    write_report(plan)
    text = (plan.output / "d.md").read_text()
    assert "## Paired differences: map-prompt-init = reference, max-grad-norm = 0.0 minus " in text
    assert "## Tests on same-as-train: paired t, Holm over the 3 comparisons" in text
    assert "without finished pairs yet" not in text
    lines = (plan.output / "d_tests.csv").read_text().splitlines()
    header = "difference,group,column,n,noop_pairs,mean,ci95_low,ci95_high,t,p,holm_p,alpha,detectable_80"
    assert lines[0] == header and len(lines) == 4
    # each row's detectable difference is at Holm's first step over the 3 rows, at its own pairs' sd
    from fedprime_core.tools.experiments.significance import detectable_difference

    for test in tests:
        assert test["alpha"] == pytest.approx(0.05 / 3)
        assert test["detectable"] == pytest.approx(detectable_difference(test["sd"], 4, 0.8, 0.05 / 3))
    assert joint["detectable"] > 0 and "| detectable (80%) |" in text
    assert any(
        line.startswith("difference,reference - normal,0.0 - 1.0,same-as-train,4,-29.875,")
        for line in (plan.output / "d.csv").read_text().splitlines()
    )


def test_a_pooled_key_joins_rows_but_never_pairs_across_its_values(tmp_path):
    # Seeds 0-1 ran with fixed text padding, seeds 2-3 with batch padding (a rounding-only change);
    # the table pools them, and each pair must still hold both arms at the same padding.
    grid = write_grid(
        tmp_path,
        "pooled",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  pilot: {method: [fedprime, fed-inter], seed: [0, 1]}
  more: {method: [fedprime, fed-inter], seed: [2, 3], text-padding: batch}
tables:
  t:
    grids: [pilot, more]
    pool: text-padding
    primary: same-as-train
    differences:
      - {key: method, value: fedprime, minus: fed-inter}
""",
    )
    plan = load_plan(grid)
    table = plan.tables[0]
    assert table.pool == ("text-padding",) and varying_keys(plan, table) == ["method"]
    # fedprime is 5 points better at every seed; batch-padded runs sit 20 points lower in both arms,
    # so a pair across paddings would show -15 or +25.
    for cell in plan.cells:
        base = 0.5 - (0.2 if cell.config["text-padding"] == "batch" else 0.0)
        fake_run(plan, cell, base + (0.05 if cell.config["method"] == "fedprime" else 0.0), 1000.0, 10)
    data = comparison(plan, table)
    assert [r["runs"] for r in data["rows"]] == [4, 4]
    (diff,) = data["differences"]
    assert diff["runs"] == 4 and diff["key"] == {}
    assert diff["stats"]["same-as-train"]["mean"] == pytest.approx(5.0)
    assert diff["stats"]["same-as-train"]["std"] == pytest.approx(0.0, abs=1e-9)
    write_report(plan)
    assert "Pooled over text-padding" in (plan.output / "t.md").read_text()


@pytest.mark.parametrize(
    "pool, message",
    [("nonsense", "'pool' must list run-config keys"), ("seed", "may not name seed"), ("method", "difference changes")],
)
def test_a_bad_pool_names_the_problem(tmp_path, pool, message):
    grid = write_grid(
        tmp_path,
        "badpool",
        f"""
base: {{num-server-rounds: 2}}
grids:
  t: {{method: [pfpt, fed-intra], seed: [0]}}
tables:
  t: {{pool: {pool}, differences: [{{key: method, value: pfpt, minus: fed-intra}}]}}
""",
    )
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)


def test_a_report_reads_each_runs_history_once_per_version_of_the_file(tmp_path):
    from fedprime_core.tools.experiments.report import _history

    grid = write_grid(tmp_path, "cache", "base: {num-server-rounds: 2}\ngrids:\n  g: {method: [fedprime], seed: [0]}\n")
    plan = load_plan(grid)
    (cell,) = plan.cells
    assert _history(plan, cell) == []  # no run yet
    fake_run(plan, cell, accuracy=0.5, bytes_sent=10.0, pool=3)
    first = _history(plan, cell)
    assert [r["round"] for r in first] == [0, 1, 2] and _history(plan, cell) is first
    path = plan.runs_dir / cell.name / "metrics.json"
    path.write_text(json.dumps([*first, {"round": 3}]))  # the run moved on: read again
    assert [r["round"] for r in _history(plan, cell)] == [0, 1, 2, 3]


def test_paired_t_on_degenerate_pairs():
    from scipy import stats

    from fedprime_core.tools.experiments.report import paired_t

    assert paired_t(5, 1.0, 2.0) == pytest.approx(tuple(stats.ttest_1samp([1, 3, -1, 3, -1], 0.0)))
    t, p = paired_t(1, 3.0, 0.0)  # one pair: nothing to test, left out of a Holm family
    assert np.isnan(t) and np.isnan(p)
    t, p = paired_t(5, 0.0, 0.0)  # both arms identical in every pair: no evidence, kept in the family
    assert np.isnan(t) and p == 1.0
    assert paired_t(4, -2.0, 0.0) == (-np.inf, 0.0)


def test_holm_adjusts_step_down_and_keeps_order():
    from fedprime_core.tools.experiments.report import holm

    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


@pytest.mark.parametrize(
    "table, message",
    [
        ("{primary: nonsense, differences: [{key: method, value: pfpt, minus: fed-intra}]}", "'primary' must name"),
        ("{primary: val}", "it declares none"),
        ("{differences: [{key: [method, seed], value: [pfpt, 0], minus: [fed-intra, 1]}]}", "other than seed"),
        ("{differences: [{key: [method, lr], value: [pfpt], minus: [fed-intra, 0.1]}]}", "must be a list of 2 values"),
        ("{differences: [{key: [method, lr], value: [pfpt, 0.3], minus: [fed-intra, 0.1]}]}", "no cell of the table"),
    ],
)
def test_bad_primary_and_two_factor_differences_name_the_problem(tmp_path, table, message):
    grid = write_grid(
        tmp_path,
        "bad",
        f"""
base: {{num-server-rounds: 2}}
grids:
  t: {{method: [pfpt, fed-intra], lr: [0.05, 0.1], seed: [0]}}
tables:
  t: {table}
""",
    )
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)


def test_a_declared_comparison_without_pairs_yet_is_named_and_left_out_of_holm(tmp_path):
    grid = write_grid(
        tmp_path,
        "partial",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  t: {method: [fedprime, fedavg-p, centralized-p], seed: [0, 1]}
tables:
  t:
    primary: same-as-train
    differences:
      - {key: method, value: centralized-p, minus: fedprime}
      - {key: method, value: fedprime, minus: fedavg-p}
""",
    )
    plan = load_plan(grid)
    for cell in plan.cells:
        if cell.config["method"] != "centralized-p":  # still running
            fake_run(plan, cell, 0.5 + 0.1 * (cell.config["method"] == "fedprime") + 0.01 * cell.config["seed"], 1.0, 2)
    write_report(plan)
    text = (plan.output / "t.md").read_text()
    assert "Holm over the 1 comparisons" in text
    assert "without finished pairs yet (not in the adjustment): method = centralized-p minus method = fedprime." in text


def _evaluated_run(plan, cell, accuracies: dict[int, float]) -> None:
    """A finished 4-round run whose clients evaluated only in the rounds of ``accuracies`` (round -> accuracy)."""
    run = plan.runs_dir / cell.name
    run.mkdir(parents=True)
    evaluation = {s: {"accuracy": 0.5, "macro_f1": 0.25, "loss": 1.0} for s in ("val", *TEST_SETTINGS)}
    rounds = [{"round": 0, "eval": evaluation}]
    for r in (1, 2, 3, 4):
        record = {"round": r, "train-loss": 1.0 / r, "eval": evaluation, "skipped": False}
        if r in accuracies:
            record["client-eval"] = {"test-accuracy": accuracies[r], "test-num-examples": 40, "num-examples": 8}
        rounds.append(record)
    (run / "metrics.json").write_text(json.dumps(rounds))
    final = {"round": 4, **{s: 0.5 for s in ("val", *TEST_SETTINGS)}}
    (run / "summary.json").write_text(json.dumps({"metric": "accuracy", "final": final, "best": final}))


def _level_plan(tmp_path, seeds: int, level_off: str):
    """align vs position over ``seeds`` seeds, 4 rounds, the clients' own test as the primary column."""
    grid = write_grid(
        tmp_path,
        "level",
        f"""
base: {{num-server-rounds: 4, missing-setting: miss-both, method: fedprime}}
grids:
  merge: {{inter-merge: [align, position], seed: {list(range(seeds))}}}
tables:
  merge:
    extra:
      - {{key: client-eval/test-accuracy, over: final, scale: 100, label: clients' own test}}
    primary: clients' own test
    level-off: {level_off}
    differences:
      - {{key: inter-merge, value: align, minus: position}}
""",
    )
    return load_plan(grid)


def test_levelling_off_reads_each_runs_gain_between_its_last_two_evaluations(tmp_path):
    from fedprime_core.tools.experiments.report import levelling

    plan = _level_plan(tmp_path, seeds=3, level_off="1.0")
    table = plan.tables[0]
    assert table.level_off == 1.0
    # align gains 0.4, 0.6, 0.5 points from round 2 to 4 (levelled off); position 3, 2, 4 (not).
    # A gain before round 2 is no part of it.
    gains = {"align": [0.004, 0.006, 0.005], "position": [0.03, 0.02, 0.04]}
    for cell in plan.cells:
        gain = gains[cell.config["inter-merge"]][cell.config["seed"]]
        _evaluated_run(plan, cell, {1: 0.1, 2: 0.6, 4: 0.6 + gain})
    rows = {r["key"]["inter-merge"]: r for r in levelling(plan, table)}
    assert rows["align"]["rounds"] == [(2, 4)] and rows["align"]["runs"] == 3
    assert rows["align"]["mean"] == pytest.approx(0.5) and rows["align"]["std"] == pytest.approx(0.1)
    assert rows["align"]["levelled"] and not rows["position"]["levelled"]
    assert rows["position"]["mean"] == pytest.approx(3.0)
    write_report(plan)
    text = (plan.output / "merge.md").read_text()
    assert "## Levelling off on clients' own test" in text and "Levelled off: a mean gain under 1." in text
    assert "| align | 3 | 2->4 | 0.50 ± 0.10 | yes |" in text and "| position | 3 | 2->4 | 3.00 ± 1.00 | no |" in text
    lines = (plan.output / "merge_levelling.csv").read_text().splitlines()
    assert lines[0] == "inter-merge,runs,rounds,gain_mean,gain_std,threshold,levelled_off"
    assert "position,3,2->4,3,1,1,no" in lines


def test_a_run_with_one_evaluation_or_unfinished_is_no_part_of_the_levelling(tmp_path):
    from fedprime_core.tools.experiments.report import levelling

    plan = _level_plan(tmp_path, seeds=2, level_off="2")
    cells = {(c.config["inter-merge"], c.config["seed"]): c for c in plan.cells}
    _evaluated_run(plan, cells[("align", 0)], {2: 0.5, 3: 0.52})
    _evaluated_run(plan, cells[("align", 1)], {4: 0.9})  # one evaluation: no gain to read
    (plan.runs_dir / cells[("position", 0)].name).mkdir(parents=True)  # unfinished
    rows = levelling(plan, plan.tables[0])
    assert len(rows) == 1 and rows[0]["runs"] == 1 and rows[0]["rounds"] == [(2, 3)]
    assert rows[0]["mean"] == pytest.approx(2.0) and not rows[0]["levelled"]  # 2 is not under 2


@pytest.mark.parametrize(
    "table, message",
    [
        ("{primary: own, level-off: 0, DIFF}", "'level-off' must be a number > 0"),
        ("{level-off: 1.0}", "'level-off' reads the primary column"),
        ("{primary: same-as-train, level-off: 1.0, DIFF}", "must name one of the 'over: final' extra columns"),
        ("{primary: own, level-off: -1, DIFF}", "'level-off' must be a number > 0"),
        ("{primary: own, level-off: yes, DIFF}", "'level-off' must be a number > 0"),
    ],
)
def test_a_bad_level_off_is_refused_with_what_to_fix(tmp_path, table, message):
    diff = "differences: [{key: inter-merge, value: align, minus: position}]"
    extra = "extra: [{key: client-eval/test-accuracy, over: final, label: own}]"
    body = table.replace("DIFF", diff).replace("{", "{" + extra + ", ", 1)
    grid = write_grid(
        tmp_path,
        "bad",
        f"base: {{missing-setting: miss-both, method: fedprime}}\n"
        f"grids:\n  merge: {{inter-merge: [align, position], seed: [0]}}\ntables:\n  merge: {body}\n",
    )
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)


def _finished(plan, cell, accuracy: float, rounds: int = 2) -> None:
    """A finished cell as the runner leaves it: results, its config.json and a checkpoint at the last round."""
    fake_run(plan, cell, accuracy, 100.0, 4)
    (plan.runs_dir / cell.name / "config.json").write_text(json.dumps(cell.config))
    (plan.runs_dir / cell.name / "checkpoint.json").write_text(json.dumps({"round": rounds}))


def test_run_with_no_report_leaves_no_tables_for_a_study_read_blind(tmp_path, capsys):

    grid = write_grid(
        tmp_path,
        "blind",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  merge: {method: [fedprime], inter-merge: [align, position], seed: [0, 1]}
tables:
  merge:
    differences:
      - {key: inter-merge, value: align, minus: position}
""",
    )
    plan = load_plan(grid)
    for cell in plan.cells:  # every cell finished: the runner skips them all and runs no federation
        _finished(plan, cell, 0.5)
    assert main(["run", str(grid), "--no-report", "--quiet"]) == 0
    assert "4/4 cells done; no report written (--no-report)" in capsys.readouterr().out
    assert not list(plan.output.glob("merge*")) and (plan.output / "cells.json").is_file()
    assert main(["run", str(grid), "--quiet"]) == 0  # the default writes the report
    assert (plan.output / "merge.md").is_file()


def test_a_follow_up_grid_reuses_another_grids_finished_runs_of_the_same_cells(tmp_path, capsys):
    base = "base: {num-server-rounds: 2, missing-setting: miss-both}\n"
    study = load_plan(
        write_grid(
            tmp_path / "study", "study", base + "grids:\n  main: {method: [fedprime, fed-inter], seed: [0, 1, 2]}\n"
        )
    )
    by_name = {(c.config["method"], c.config["seed"]): c for c in study.cells}
    for seed in (0, 1):
        _finished(study, by_name[("fedprime", seed)], 0.60 + seed / 100)
    _finished(study, by_name[("fed-inter", 0)], 0.5)
    partial = study.runs_dir / by_name[("fedprime", 2)].name  # still running in the study: never reused
    _finished(study, by_name[("fedprime", 2)], 0.9, rounds=1)
    follow = write_grid(
        tmp_path / "follow",
        "follow",
        base
        + f"reuse: [{study.output}]\n"
        + """grids:
  ours: {method: [fedprime], seed: [0, 1, 2]}
  switch: {method: [fedprime], readout: [first-prompt], seed: [0, 1, 2]}
tables:
  readout:
    grids: [ours, switch]
    differences:
      - {key: readout, value: first-prompt, minus: cls}
""",
    )
    plan = load_plan(follow)
    assert plan.reuse == (study.output,)
    ours = {c.config["seed"]: c for c in plan.cells if c.config["readout"] == "cls"}
    assert ours[0].name == by_name[("fedprime", 0)].name  # the same settings name the same cell
    assert plan.run_dir(ours[0]) == study.runs_dir / ours[0].name
    assert plan.reused_from(ours[2]) is None and plan.run_dir(ours[2]) == plan.runs_dir / ours[2].name
    assert cell_status(plan, ours[1]) == ("done", 2) and cell_status(plan, ours[2]) == ("todo", 0)

    assert main(["plan", str(follow)]) == 0
    listing = capsys.readouterr().out
    assert f"{ours[0].name}  [ours]  (reused from {study.output})" in listing
    assert f"todo        0  {ours[2].name}" in listing

    switch = {c.config["seed"]: c for c in plan.cells if c.config["readout"] == "first-prompt"}
    for seed in (0, 1, 2):
        _finished(plan, switch[seed], 0.7)
    record = run_cell(plan, ours[0], tmp_path / "home")
    assert record == {
        "cell": ours[0].name,
        "status": "done",
        "skipped": True,
        "reused-from": str(study.runs_dir / ours[0].name),
    }
    assert not (plan.runs_dir / ours[0].name).exists()  # nothing copied or written
    data = comparison(plan, plan.tables[0])
    cls_row = next(r for r in data["rows"] if r["key"] == {"readout": "cls"})
    assert cls_row["runs"] == 2  # the two reused finished runs; the study's partial seed 2 is not one
    assert cls_row["stats"]["full-modal"]["mean"] == pytest.approx(60.5)
    assert data["differences"][0]["runs"] == 2  # paired with the reused runs, seed by seed
    # the study's own folder is untouched, and a changed setting there is not reused
    assert completed_rounds(partial) == 1
    stored = json.loads((study.runs_dir / ours[1].name / "config.json").read_text())
    (study.runs_dir / ours[1].name / "config.json").write_text(json.dumps({**stored, "lr": 0.5}))
    assert load_plan(follow).reused_from(ours[1]) is None
    # the runner skips what is reused and says from where (every other cell is finished here)
    (study.runs_dir / ours[1].name / "config.json").write_text(json.dumps(stored))
    _finished(plan, ours[2], 0.6)
    assert main(["run", str(follow), "--no-report", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("reused from") == 2 and "6/6 cells done" in out
    # what to commit: this grid's own finished folders, not the reused ones, not the study's partial
    assert main(["plan", str(follow), "--finished"]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(listed) == sorted(str(plan.runs_dir / c.name) for c in (*switch.values(), ours[2]))


@pytest.mark.parametrize(
    ("reuse", "message"),
    [
        ("{a: 1}", "'reuse' must list other grids' output folders"),
        ("[OWN]", "names this grid's own output"),
        ("[NOWHERE]", "has no runs/ folder"),
    ],
)
def test_a_bad_reuse_names_the_problem(tmp_path, reuse, message):
    own = tmp_path / "g" / "out"
    (own / "runs").mkdir(parents=True)
    reuse = reuse.replace("OWN", str(own)).replace("NOWHERE", str(tmp_path / "nowhere"))
    grid = write_grid(tmp_path / "g", "g", f"reuse: {reuse}\ngrids:\n  main: {{method: [fedprime], seed: [0]}}\n")
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)


def test_a_report_flags_final_values_from_an_earlier_round_and_client_evaluations_with_fewer_clients(tmp_path):
    from fedprime_core.tools.experiments.report import run_checks

    grid = write_grid(
        tmp_path,
        "checks",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  main: {method: [fedprime, fed-intra], seed: [0, 1]}
tables:
  main:
    extra:
      - {key: client-eval/test-accuracy, over: final, scale: 100, label: clients' own test}
      - {key: train-loss, over: final}
""",
    )
    plan = load_plan(grid)
    table = plan.tables[0]
    for cell in plan.cells:
        planted_run(plan, cell, 0.5, 1.0)
    data = write_comparison(plan, table)
    assert data["rows"] and run_checks(plan, table) == []
    assert "covers as many clients in every run: yes." in (plan.output / "main.md").read_text()

    def rewrite(cell, change):
        path = plan.runs_dir / cell.name / "metrics.json"
        rounds = json.loads(path.read_text())
        change(rounds)
        path.write_text(json.dumps(rounds))

    first, second, third, fourth = plan.cells
    rewrite(first, lambda rounds: rounds[-1].pop("client-eval"))  # the last round's evaluation is missing
    for cell, clients in ((second, 4), (third, 4), (fourth, 3)):  # one client's evaluation failed in one run

        def per_client(rounds, clients=clients):
            for record in rounds[1:]:
                record["client-eval-per-client"] = {f"c{i}": {"test-accuracy": 0.5} for i in range(clients)}

        rewrite(cell, per_client)
    notes = run_checks(plan, table)
    assert len(notes) == 2
    assert notes[0] == (
        f"{first.name}: 'clients' own test' comes from round 1, not from the run's last round 2 "
        "(that round recorded no value)"
    )
    assert notes[1] == (
        f"'clients' own test': client-side evaluation covered 4 clients in 2 runs and fewer in 1: {fourth.name} (3)"
    )
    write_comparison(plan, table)
    text = (plan.output / "main.md").read_text()
    assert "covers as many clients in every run: no, 2 findings:" in text and f"- {first.name}: " in text


def test_plan_estimates_the_unfinished_cells_from_the_rounds_the_finished_ones_took(tmp_path, capsys):
    from fedprime_core.tools.experiments.plan import estimate_remaining

    grid = write_grid(
        tmp_path,
        "cost",
        "base: {num-server-rounds: 4, missing-setting: miss-both}\n"
        "grids:\n  main: {method: [fedprime, fedavg-p, pfpt], seed: [0, 1, 2]}\n"
        "  slow: {method: [fedprime], lr: [0.5], seed: [0]}\n",
    )
    plan = load_plan(grid)
    cells = {(c.config["method"], c.config["seed"], c.config["lr"]): c for c in plan.cells}

    def ran(cell, seconds: list[float], finished: bool) -> None:
        run = plan.runs_dir / cell.name
        run.mkdir(parents=True)
        rounds = [{"round": 0, "round-seconds": 999.0}]  # round 0 (evaluation before training) is no round's cost
        rounds += [{"round": r, "round-seconds": s} for r, s in enumerate(seconds, 1)]
        (run / "metrics.json").write_text(json.dumps(rounds))
        (run / "checkpoint.json").write_text(json.dumps({"round": len(seconds) if not finished else 4}))

    lr = 0.05
    ran(cells[("fedprime", 0, lr)], [10.0] * 4, True)
    ran(cells[("fedprime", 1, lr)], [30.0] * 4, True)  # the arm's median: 20 s a round
    ran(cells[("fedavg-p", 0, lr)], [100.0] * 4, True)
    ran(cells[("fedavg-p", 1, lr)], [100.0], False)  # partial: 3 rounds left
    left = estimate_remaining(plan)
    # fedprime s2: 4 x 20; fedprime lr 0.5 (no run of its own arm): its method's median, 4 x 20;
    # fedavg-p s1: 3 x 100, s2: 4 x 100; pfpt: no finished run, not counted
    assert left == {"cells": 7, "seconds": 80 + 80 + 300 + 400, "unknown": 3}
    assert main(["plan", str(grid)]) == 0
    assert "7 cells to run: about 14m20s of rounds for 4 of them" in capsys.readouterr().out


def test_a_blind_grid_writes_no_tables_until_every_cell_is_done(tmp_path, capsys):
    from fedprime_core.tools.experiments.plan import unfinished_cells

    body = """
blind: true
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  merge: {method: [fedprime], inter-merge: [align, position], seed: [0, 1]}
tables:
  merge:
    differences:
      - {key: inter-merge, value: align, minus: position}
"""
    grid = write_grid(tmp_path, "blind", body)
    plan = load_plan(grid)
    assert plan.blind
    for cell in plan.cells[:3]:
        _finished(plan, cell, 0.5)
    assert [c.name for c in unfinished_cells(plan)] == [plan.cells[3].name]
    capsys.readouterr()
    assert main(["report", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "is read blind ('blind: true') and 1 of its 4 cells are not done" in err and "--unblind" in err
    assert not list(plan.output.glob("merge*"))
    assert main(["report", str(grid), "--unblind"]) == 0 and (plan.output / "merge.md").is_file()
    (plan.output / "merge.md").unlink()
    _finished(plan, plan.cells[3], 0.5)
    assert main(["run", str(grid), "--quiet"]) == 0  # complete: the runner writes the report as usual
    assert "4/4 cells done; report in" in capsys.readouterr().out and (plan.output / "merge.md").is_file()
    write_grid(tmp_path, "blind", body.replace("blind: true", "blind: yes please"))
    with pytest.raises(ConfigError, match="'blind' must be true or false"):
        load_plan(grid)


@pytest.mark.parametrize(
    ("holm_p", "mean", "lo", "hi", "expected"),
    [
        (0.001, 3.0, 1.5, 4.5, "higher"),
        (0.001, -2.5, -3.5, -1.5, "lower"),
        (0.01, 0.8, 0.3, 1.3, "higher (under the margin)"),
        (0.40, 0.2, -1.1, 1.5, "no difference of 2 or more"),
        (0.40, 0.2, -2.6, 3.0, "inconclusive"),
        (0.06, 1.2, -0.1, 2.5, "inconclusive"),
        (float("nan"), 1.0, float("nan"), float("nan"), "untested"),
    ],
)
def test_the_reading_rule_words_each_test_as_declared(holm_p, mean, lo, hi, expected):
    from fedprime_core.tools.experiments.report import verdict

    assert verdict({"holm": holm_p, "mean": mean, "lo": lo, "hi": hi}, margin=2.0) == expected


def test_a_table_with_a_margin_gives_each_test_its_verdict(tmp_path):
    grid = write_grid(
        tmp_path,
        "words",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  main: {method: [fedprime, fed-intra, fed-inter], seed: [0, 1, 2, 3]}
tables:
  main:
    primary: same-as-train
    margin: 2
    differences:
      - {key: method, value: fedprime, minus: fed-intra}
      - {key: method, value: fedprime, minus: fed-inter}
""",
    )
    plan = load_plan(grid)
    assert plan.tables[0].margin == 2.0
    noise = {0: 0.001, 1: -0.002, 2: 0.003, 3: 0.0}
    for cell in plan.cells:
        seed, method = cell.config["seed"], cell.config["method"]
        gain = {"fedprime": 0.10, "fed-intra": 0.0, "fed-inter": 0.10}[method]  # 10 points over fed-intra
        fake_run(plan, cell, 0.5 + gain + (noise[seed] if method != "fed-inter" else 0.0), 100.0, 4)
    write_report(plan)
    lines = (plan.output / "main_tests.csv").read_text().splitlines()
    assert lines[0].endswith(",alpha,detectable_80,verdict")
    rows = {line.split(",")[0]: line for line in lines[1:]}
    assert rows["method = fedprime minus method = fed-intra"].endswith(",higher")
    assert rows["method = fedprime minus method = fed-inter"].endswith(",no difference of 2 or more")
    assert "| detectable (80%) | verdict |" in (plan.output / "main.md").read_text()


@pytest.mark.parametrize(
    ("margin", "primary", "message"),
    [("0", "same-as-train", "'margin' must be a number > 0"), ("2", None, "names no 'primary'")],
)
def test_a_bad_margin_names_the_problem(tmp_path, margin, primary, message):
    table = f"    margin: {margin}\n" + (f"    primary: {primary}\n" if primary else "")
    grid = write_grid(
        tmp_path,
        "m",
        "grids:\n  main: {method: [fedprime, fed-intra], seed: [0, 1]}\ntables:\n  main:\n"
        + table
        + "    differences:\n      - {key: method, value: fedprime, minus: fed-intra}\n",
    )
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)


def _per_client_run(plan, cell, accuracies: dict[str, float], examples: dict[str, int]) -> None:
    """A finished two-round run whose client-side evaluation holds each client's own test accuracy."""
    run = plan.runs_dir / cell.name
    run.mkdir(parents=True)
    rounds = [{"round": 0, "eval": {}}]
    for r in (1, 2):
        per_client = {
            c: {"test-accuracy": accuracies[c] * r / 2, "test-num-examples": examples[c], "num-examples": 1}
            for c in accuracies
        }
        total = sum(examples[c] for c in accuracies)
        mean = sum(per_client[c]["test-accuracy"] * examples[c] for c in accuracies) / total
        record = {"round": r, "train-loss": 1.0 / r, "skipped": False}
        record["client-eval"] = {"test-accuracy": mean, "test-num-examples": total}
        record["client-eval-per-client"] = per_client
        rounds.append(record)
    (run / "metrics.json").write_text(json.dumps(rounds))
    final = {"round": 2, **{s: 0.5 for s in ("val", *TEST_SETTINGS)}}
    (run / "summary.json").write_text(json.dumps({"metric": "accuracy", "final": final, "best": final}))


def test_a_column_over_some_clients_is_their_sample_weighted_mean_with_paired_differences(tmp_path):
    """Planted per-client accuracies: a ``clients`` column is the weighted mean of those clients only, per
    round (so its curve too), and the table pairs it by seed like any column."""
    from fedprime_core.tools.experiments.report import run_checks, table_curves

    grid = write_grid(
        tmp_path,
        "kinds",
        """
base: {num-server-rounds: 2, missing-setting: miss-both}
grids:
  main: {method: [fedprime, fed-intra], seed: [0, 1, 2]}
tables:
  main:
    extra:
      - {key: client-eval/test-accuracy, over: final, scale: 100, label: all clients}
      - {key: client-eval/test-accuracy, over: final, scale: 100, clients: [0, 2], label: even sites}
      - {key: client-eval/test-accuracy, over: final, scale: 100, clients: [1, '3']}
    primary: all clients
    differences:
      - {key: method, value: fedprime, minus: fed-intra}
""",
    )
    plan = load_plan(grid)
    table = plan.tables[0]
    odd = "client-eval/test-accuracy of clients 1, 3 (final)"
    assert [c.title for c in table.extra] == ["all clients", "even sites", odd]
    examples = {"0": 100, "1": 200, "2": 300, "3": 400}
    for cell in plan.cells:
        seed, ours = cell.config["seed"], cell.config["method"] == "fedprime"
        # fedprime: 10 points better on the even sites, the same on the odd ones; seeds shift every client.
        acc = {c: 0.4 + 0.05 * seed + 0.1 * (ours and int(c) % 2 == 0) + 0.01 * int(c) for c in examples}
        _per_client_run(plan, cell, acc, examples)
    data = comparison(plan, table)
    row = next(r for r in data["rows"] if r["key"] == {"method": "fedprime"})
    # seed 0: even sites (0.5 * 100 + 0.52 * 300) / 400 = 0.515; odd sites (0.41 * 200 + 0.43 * 400) / 600.
    assert row["stats"]["even sites"]["mean"] == pytest.approx(100 * (0.515 + 0.05))
    assert row["stats"][odd]["mean"] == pytest.approx(100 * ((0.41 * 200 + 0.43 * 400) / 600 + 0.05))
    (diff,) = data["differences"]
    assert diff["runs"] == 3
    assert diff["stats"]["even sites"]["mean"] == pytest.approx(10.0) and diff["stats"]["even sites"]["std"] < 1e-9
    assert diff["stats"][odd]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert diff["stats"]["all clients"]["mean"] == pytest.approx(10.0 * 400 / 1000)
    curves = {(c["key"]["method"], c["column"]): c for c in table_curves(plan, table)["curves"]}
    assert curves[("fedprime", "even sites")]["rounds"] == [1, 2]
    assert curves[("fedprime", "even sites")]["mean"] == pytest.approx([100 * 0.565 / 2, 100 * 0.565])
    write_report(plan)
    text = (plan.output / "main.md").read_text()
    assert "| even sites |" in text and "10.00 ± 0.00" in text

    # A run whose last round lacks one client of a group: that group's final value is not taken from a
    # mean over the others; it falls back to the last round that had them all, and the checks say so.
    first = plan.cells[0]
    path = plan.runs_dir / first.name / "metrics.json"
    rounds = json.loads(path.read_text())
    del rounds[-1]["client-eval-per-client"]["2"]
    path.write_text(json.dumps(rounds))
    notes = run_checks(plan, table)
    assert any(note.startswith(f"{first.name}: 'even sites' comes from round 1") for note in notes)
    assert not any("'" + odd + "' comes from" in note for note in notes)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{key: train-loss, over: final, clients: [0]}", "needs a 'client-eval/<metric>' key"),
        ("{key: client-eval/test-accuracy, per: sampled, clients: [0]}", "and no 'per'"),
        ("{key: client-eval/test-accuracy, clients: []}", "non-empty list of client ids"),
        ("{key: client-eval/test-accuracy, clients: 3}", "non-empty list of client ids"),
        ("{key: client-eval/test-accuracy, clients: [0, -1]}", "partition ids >= 0"),
        ("{key: client-eval/test-accuracy, clients: ['../x']}", "partition ids >= 0, or sites' client ids"),
        ("{key: client-eval/test-accuracy, clients: [1.5]}", "partition ids >= 0"),
        ("{key: client-eval/test-accuracy, clients: [1, 2, 1]}", r"client id\(s\) \['1'\] more than once"),
        ("{key: client-eval/test-accuracy, clients: [1, '1']}", r"client id\(s\) \['1'\] more than once"),
        (
            "{key: client-eval/test-accuracy, clients: [0], label: x}\n"
            "      - {key: client-eval/test-accuracy, label: x}",
            r"two extra columns have the title \['x'\]",
        ),
    ],
)
def test_a_bad_clients_entry_names_the_problem(tmp_path, entry, message):
    grid = write_grid(
        tmp_path,
        "c",
        f"grids:\n  main: {{method: [fedprime], seed: [0]}}\ntables:\n  main:\n    extra:\n      - {entry}\n",
    )
    with pytest.raises(ConfigError, match=message):
        load_plan(grid)

"""Sizing a study from its pilot (fedprime_core.tools.experiments.power): blind to the means, right on the seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from fedprime_core.tools.experiments.__main__ import main
from fedprime_core.tools.experiments.plan import load_plan
from fedprime_core.tools.experiments.power import paired_power, pilot_power, sd_upper_bound, seeds_needed
from tests.planted_runs import fake_run


@pytest.mark.parametrize("n, sd, delta", [(3, 1.0, 2.0), (5, 1.0, 1.0), (8, 2.0, 1.5)])
def test_paired_power_is_the_rejection_rate_of_simulated_paired_t_tests(n, sd, delta):
    rng = np.random.default_rng(0)
    differences = rng.normal(delta, sd, size=(40_000, n))
    t = differences.mean(1) / (differences.std(1, ddof=1) / np.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert paired_power(sd, n, delta) == pytest.approx(rejected, abs=0.01)


def test_seeds_needed_is_the_first_count_that_reaches_the_power():
    for sd in (0.41, 0.72, 1.0, 2.0, 3.1):
        n = seeds_needed(sd, 2.0)
        assert paired_power(sd, n, 2.0) >= 0.8
        assert n == 2 or paired_power(sd, n - 1, 2.0) < 0.8
    assert seeds_needed(2.0, 2.0) == 10  # the fashion study's header: about 10 seeds at sd 2
    assert seeds_needed(0.0, 2.0) == 2
    assert seeds_needed(100.0, 0.1) is None  # beyond MAX_SEEDS
    with pytest.raises(ValueError, match="delta"):
        seeds_needed(1.0, 0.0)


@pytest.mark.parametrize("n, sd, alpha", [(3, 1.0, 0.05), (5, 2.0, 0.01), (10, 2.0, 0.0125), (20, 0.5, 0.05)])
def test_the_detectable_difference_is_where_the_power_reaches_80_percent(n, sd, alpha):
    from fedprime_core.tools.experiments.significance import detectable_difference

    delta = detectable_difference(sd, n, 0.8, alpha)
    assert paired_power(sd, n, delta, alpha) == pytest.approx(0.8, abs=1e-6)
    # the inverse of the seed count: n pairs suffice for it, n - 1 do not
    assert seeds_needed(sd, delta * 1.0001, 0.8, alpha) <= n
    assert n == 2 or seeds_needed(sd, delta * 0.999, 0.8, alpha) > n - 1
    # it scales with the spread, and more pairs or a looser alpha detect less
    assert detectable_difference(2 * sd, n, 0.8, alpha) == pytest.approx(2 * delta, rel=1e-6)
    assert detectable_difference(sd, n + 5, 0.8, alpha) < delta < detectable_difference(sd, n, 0.8, alpha / 2)


def test_power_is_finite_where_scipys_noncentral_t_gives_nan():
    from fedprime_core.tools.experiments.significance import _power_by_integration

    # scipy 1.17's nct.sf returns nan at some points (df 2, shift 6.4 * sqrt 3); the integral stands in
    assert 0.99 < paired_power(1.0, 3, 6.4) < 1.0
    for df, shift in ((2, 3.0), (4, 2.5), (9, 2.0), (2, 11.09)):
        critical = stats.t.ppf(0.975, df)
        expected = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
        if np.isfinite(expected):
            assert _power_by_integration(critical, df, shift) == pytest.approx(expected, abs=1e-7)


def test_the_detectable_difference_of_degenerate_pairs():
    from fedprime_core.tools.experiments.significance import detectable_difference

    assert detectable_difference(0.0, 4) == 0.0  # every pair shows the difference exactly
    assert np.isnan(detectable_difference(1.0, 1)) and np.isnan(detectable_difference(float("nan"), 5))
    with pytest.raises(ValueError, match="power and alpha"):
        detectable_difference(1.0, 5, power=1.0)
    # power at or under alpha: no difference at all is already "detected" that often
    assert detectable_difference(1.0, 3, 0.01, 0.05) == 0.0 == detectable_difference(1.0, 3, 0.05, 0.05)


def test_the_sd_bound_is_the_chi_square_quantile():
    # P(s <= bound) over repeated pilots of 3 values: the bound of s covers sigma 80% of the time
    rng = np.random.default_rng(1)
    s = rng.normal(0, 1.0, size=(40_000, 3)).std(1, ddof=1)
    covered = np.mean(np.array([sd_upper_bound(v, 3, 0.8) for v in s[:4000]]) >= 1.0)
    assert covered == pytest.approx(0.8, abs=0.02)
    assert sd_upper_bound(0.41, 3) == pytest.approx(0.868, abs=1e-3)  # the fashion pilot's reading


GRID = """
name: pilot
output: {out}
base: {{num-server-rounds: 2, missing-setting: none}}
grids:
  arms: {{method: [pfpt, fed-intra], seed: [0, 1, 2]}}
tables:
  pilot:
    grids: [arms]
    extra:
      - {{key: inter-pool-size, over: final, label: pool}}
    differences:
      - {{key: method, value: pfpt, minus: fed-intra}}
"""


def planted_pilot(tmp_path):
    grid = tmp_path / "pilot.yaml"
    grid.write_text(GRID.format(out=tmp_path / "out"))
    plan = load_plan(grid)
    for cell in plan.cells:
        seed = cell.config["seed"]
        gain = 0.05 + 0.01 * seed if cell.config["method"] == "pfpt" else 0.0  # pfpt ahead by 5, 6, 7 points
        fake_run(plan, cell, 0.5 + 0.1 * seed + gain, 1000.0, 10)
    return grid, plan


def test_pilot_power_reads_the_spread_of_the_pairs_and_not_their_mean(tmp_path, capsys):
    grid, plan = planted_pilot(tmp_path)
    result = pilot_power(plan, plan.tables[0], column="full-modal", delta=2.0)
    (row,) = result["comparisons"]
    assert row["difference"] == "method: pfpt - fed-intra" and row["pairs"] == 3 and row["no-op pairs"] == 0
    assert row["sd"] == pytest.approx(1.0)  # differences of 5, 6 and 7 points
    assert row["sd-upper"] == pytest.approx(sd_upper_bound(1.0, 3))
    assert (row["seeds"], row["seeds-at-upper"]) == (seeds_needed(1.0, 2.0), seeds_needed(row["sd-upper"], 2.0))
    assert result["seeds"] == row["seeds"]
    assert "mean" not in json.dumps(result)
    # The command line: the same figures, no mean anywhere in what it prints or writes.
    assert main(["power", str(grid), "--column", "full-modal"]) == 0
    printed = capsys.readouterr().out
    assert "| method: pfpt - fed-intra | - | 3 | 0 | 1.00 |" in printed
    assert "6.00" not in printed and "Means are not shown" in printed
    written = json.loads((plan.output / "power-pilot.json").read_text())
    assert written["comparisons"][0]["sd"] == pytest.approx(1.0)


def test_pilot_power_names_what_it_cannot_find(tmp_path, capsys):
    grid, plan = planted_pilot(tmp_path)
    assert main(["power", str(grid), "--table", "nope"]) == 2
    assert "has no table 'nope' (its tables: pilot)" in capsys.readouterr().err
    assert main(["power", str(grid), "--column", "nope"]) == 2
    assert "has no column 'nope'" in capsys.readouterr().err
    # By default the table's first extra column (the primary metric by convention): here the pool, equal in both arms.
    result = pilot_power(plan, plan.tables[0])
    assert result["column"] == "pool" and result["comparisons"][0]["sd"] == 0.0


def test_a_run_folder_made_with_other_settings_is_left_out_of_the_reading(tmp_path, caplog):
    """A folder the runner would refuse (a default changed since) stands for nothing in a table or a pilot reading."""
    _, plan = planted_pilot(tmp_path)
    stale = next(c for c in plan.cells if c.config["method"] == "pfpt" and c.config["seed"] == 2)
    (plan.runs_dir / stale.name / "config.json").write_text(json.dumps({**stale.config, "lr": 0.5}))
    result = pilot_power(plan, plan.tables[0], column="full-modal")
    (row,) = result["comparisons"]
    assert row["pairs"] == 2 and row["sd"] == pytest.approx(np.std([5.0, 6.0], ddof=1))
    assert f"left out of the report: {stale.name} was made with other settings: 'lr'" in caplog.text


def test_a_report_reads_each_run_folders_settings_once_and_again_when_they_change(tmp_path, monkeypatch):
    from fedprime_core.tools.experiments import report

    _, plan = planted_pilot(tmp_path)
    for cell in plan.cells:  # as the runner leaves them: each folder with its settings
        (plan.runs_dir / cell.name / "config.json").write_text(json.dumps(cell.config))
    calls = []
    real = report.folder_settings_changed
    monkeypatch.setattr(report, "folder_settings_changed", lambda p, c: calls.append(c.name) or real(p, c))
    pilot_power(plan, plan.tables[0], column="full-modal")
    pilot_power(plan, plan.tables[0], column="full-modal")
    assert calls and len(calls) == len(set(calls))  # one reading per folder over both (36 before the cache)
    stale = next(c for c in plan.cells if c.config["method"] == "pfpt" and c.config["seed"] == 2)
    (plan.runs_dir / stale.name / "config.json").write_text(json.dumps({**stale.config, "lr": 0.5}))
    (row,) = pilot_power(plan, plan.tables[0], column="full-modal")["comparisons"]
    assert row["pairs"] == 2 and calls.count(stale.name) == 2

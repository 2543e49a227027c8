"""scripts/max_of_chance.py: the exact maximum of chance-level evaluations against closed forms and simulation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("max_of_chance", ROOT / "scripts" / "max_of_chance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_one_evaluation_is_chance(script):
    row = script.max_of_chance(1, 1000, 8)
    assert row.mean == pytest.approx(12.5, abs=1e-9)
    assert row.chance == 12.5


@pytest.mark.parametrize("k", [1, 2, 5, 30])
def test_one_sample_closed_form(script, k):
    # One sample, two classes: the maximum is 1 unless all K evaluations miss, so E = 1 - 2**-K.
    row = script.max_of_chance(k, 1, 2)
    assert row.mean == pytest.approx(100.0 * (1.0 - 0.5**k), abs=1e-9)


def test_exact_agrees_with_simulation_and_grows_with_rounds(script):
    few = script.max_of_chance(10, 400, 5, simulate=20000, seed=1)
    many = script.max_of_chance(250, 400, 5)
    assert few.simulated_mean == pytest.approx(few.mean, abs=0.05)
    assert few.chance < few.mean < many.mean
    assert few.low <= few.median <= few.high
    assert many.low > few.chance  # 250 draws: the maximum is above chance in nearly every run


def test_documented_reference_figures(script):
    # docs/findings/reference-code.md, D2: 249 evaluations of 1,823 samples, 8 classes.
    row = script.max_of_chance(249, 1823, 8)
    assert round(row.mean, 2) == 14.73
    assert (round(row.low, 2), round(row.high, 2)) == (14.26, 15.30)
    assert round(script.max_of_chance(125, 1823, 8).mean, 2) == 14.54


def test_cli_writes_json_and_rejects_bad_input(script, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert script.main(["--evaluations", "3", "7", "--samples", "50", "--classes", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["evaluations"] for r in rows] == [3, 7]
    assert "max of 3 evaluations" in capsys.readouterr().out
    assert script.main(["--evaluations", "0", "--samples", "50", "--classes", "4"]) == 2
    assert "evaluations must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="classes"):
        script.max_of_chance(3, 10, 1)

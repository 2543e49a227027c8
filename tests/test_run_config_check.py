"""Config mistakes caught in a second: ``cli check --run-config``, and a ServerApp that says what to fix.

``flwr run`` validates the run config's keys at the SuperLink (an unknown key gets only
"[code: 15] Invalid run configuration."), its values only once the ServerApp starts, and a
string without quotes is refused by the ``flwr`` CLI; the check reads the same string the same
way and names the problem.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from flwr.app import Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER

from fedprime_core.config import ConfigError
from fedprime_core.tools.cli import main, parse_run_config_args
from tests.processes import ROOT


def check(*run_configs: str) -> int:
    return main(["check", *(arg for rc in run_configs for arg in ("--run-config", rc))])


def test_a_good_run_config_string_passes_and_prints_the_whole_config(capsys):
    assert check('method="fed-inter" num-server-rounds=3 lr=0.1 server-eval=false results-dir="/tmp/r"') == 0
    out = capsys.readouterr().out
    assert 'method = "fed-inter"' in out and "num-server-rounds = 3" in out and "server-eval = false" in out
    assert "tau = 20" in out  # every key, defaults included
    assert check("tau=8", "kappa=2") == 0  # repeated, as flwr run allows


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ("num-server-round=3", "unknown run config key(s): 'num-server-round' (did you mean 'num-server-rounds'?)"),
        ('method="nope"', "run config key 'method' = 'nope' is not allowed; use one of: fedprime"),
        ("method=nope", 'a string needs quotes: method="nope"'),
        ("tau=3 kappa=5", "'kappa' = 5 must not exceed 'tau' = 3"),
        ("lr=-1", "'lr' = -1.0 must be greater than 0.0"),
        ("tau = 3", "not a key=value pair"),
    ],
)
def test_a_bad_run_config_string_is_named(run_config, message, capsys):
    assert check(run_config) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_the_string_is_read_as_flower_reads_it(tmp_path):
    assert parse_run_config_args(['method="pfpt" tau=8 lr=0.5 server-eval=true']) == {
        "method": "pfpt",
        "tau": 8,
        "lr": 0.5,
        "server-eval": True,
    }
    assert parse_run_config_args(["run-name='with spaces inside'"]) == {"run-name": "with spaces inside"}
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fedprime"\nnum-server-rounds = 2\n')
    assert parse_run_config_args([str(toml)]) == {"method": "fedprime", "num-server-rounds": 2}
    with pytest.raises(ConfigError, match="cannot be given alongside"):
        parse_run_config_args(["tau=3", str(toml)])


def test_a_toml_file_is_checked_as_flwr_run_reads_it(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fed-inter"\nnum-server-rounds = 2\n')
    assert main(["check", str(toml)]) == 0
    assert 'method = "fed-inter"' in capsys.readouterr().out
    toml.write_text("num-server-round = 2\n")
    assert main(["check", str(toml)]) == 2
    assert "did you mean 'num-server-rounds'?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ('missing-table="{tmp}/absent.yaml"', "absent.yaml' does not exist"),
        ('missing-table="{tmp}/bad-table.yaml"', "bad-table.yaml"),
        ('dataset="food101" data-dir="{tmp}/nowhere"', "run config key 'data-dir': dataset root"),
        ('dataset="food101" data-dir="{tmp}/empty-site"', "cannot detect the layout of food101"),
        (
            'dataset="food101" data-dir="{tmp}/empty-site" data-layout="jsonl"',
            "holds no split file; expected train.jsonl",
        ),
        ('resume="{tmp}/no-run"', "no checkpoint.json there"),
    ],
)
def test_a_file_the_run_config_names_is_checked(run_config, message, tmp_path, capsys):
    # its mixture sums to 1.5
    (tmp_path / "bad-table.yaml").write_text("0: {complete: 0.5, text-missing: 0.5, image-missing: 0.5}\n")
    (tmp_path / "empty-site").mkdir()
    assert check(run_config.format(tmp=tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_files_that_are_there_pass_the_check(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text("{}")
    (tmp_path / "good.yaml").write_text("default: {complete: 0.3, text-missing: 0.35, image-missing: 0.35}\n")
    assert check(f'resume="{run}" missing-table="{tmp_path}/good.yaml"') == 0, capsys.readouterr().err


def test_the_check_runs_as_a_command():
    cmd = [sys.executable, "-m", "fedprime_core.tools.cli", "check", "--run-config", "num-server-round=3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "did you mean 'num-server-rounds'?" in out.stderr


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_config_error_ends_the_serverapp_with_one_line_and_no_traceback(tmp_path):
    from server_app.app import main as server_main
    from tests.loopback import LoopbackGrid

    lines = _Lines()
    FLOWER_LOGGER.addHandler(lines)
    try:
        run_config = {"method": "nope", "results-dir": str(tmp_path)}
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        with pytest.raises(ConfigError) as info:
            server_main(LoopbackGrid(run_config, 0), context)
        # What Flower's ServerApp process does with an exception that ends the app (flwr/superlink/runtime/
        # run_serverapp.py, flwr/simulation/app.py): log it with its traceback, then exit with code 200.
        FLOWER_LOGGER.error("%s raised an exception", "ServerApp", exc_info=info.value)
        FLOWER_LOGGER.error("Exit Code: 200\nAn unhandled exception occurred in the ServerApp.")
        # An error that is not FedPrime's own keeps its traceback.
        FLOWER_LOGGER.error("%s raised an exception", "ServerApp", exc_info=ZeroDivisionError("bug"))
    finally:
        FLOWER_LOGGER.removeHandler(lines)
    errors = [r for r in lines.records if r.levelno >= logging.ERROR]
    assert errors[0].getMessage().startswith("FedPrime cannot start: run config key 'method' = 'nope' is not allowed")
    assert errors[0].exc_info is None
    assert errors[1].getMessage().startswith("Exit Code: 200")  # Flower's own note follows; no traceback between
    assert errors[2].exc_info is not None and len(errors) == 3

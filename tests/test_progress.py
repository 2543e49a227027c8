"""Progress lines of long steps: throttled, with elapsed and remaining time, quiet for quick steps."""

from __future__ import annotations

import logging

import pytest

from fedprime_core.progress import Progress, format_duration, remaining_seconds
from fedprime_core.tools.experiments.run import progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def lines(caplog):
    caplog.set_level(logging.INFO, logger="fedprime_core")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "fedprime_core.progress"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0.4s"), (9.96, "10.0s"), (42, "42s"), (185, "3m05s"), (3725, "1h02m")]
)
def test_durations_read_like_a_person_writes_them(seconds, text):
    assert format_duration(seconds) == text


def test_remaining_time_is_the_linear_estimate():
    assert remaining_seconds(elapsed=30, done=1, total=4) == pytest.approx(90)
    assert remaining_seconds(elapsed=30, done=0, total=4) is None


def test_a_long_step_logs_a_line_every_interval_with_the_estimate(lines):
    clock = Clock()
    progress = Progress("evaluating round 3", 600, unit="samples", every=10, clock=clock)
    for _ in range(6):  # 6 x 4 s, 60 samples each: lines at 12 s and 24 s (10 s apart at least)
        clock.now += 4
        progress.update(60, status="full-modal")
    assert lines() == [
        "evaluating round 3 (full-modal): 180/600 samples (30%), 12s elapsed, about 28s left",
        "evaluating round 3 (full-modal): 360/600 samples (60%), 24s elapsed, about 16s left",
    ]
    clock.now += 16
    progress.update(240)
    progress.close()
    assert lines()[-1] == "evaluating round 3: done, 600 samples in 40s"


def test_a_quick_step_says_nothing_unless_announced(lines):
    clock = Clock()
    with Progress("reading train.jsonl", 10, unit="rows", clock=clock) as progress:
        clock.now += 1
        progress.update(10)
    assert lines() == []
    with Progress("generating tiny-vilt", 600, unit="pretraining steps", announce=True, clock=clock):
        pass
    assert lines() == ["generating tiny-vilt (600 pretraining steps) ..."]


def test_scaled_amounts_and_unknown_totals(lines):
    clock = Clock()
    progress = Progress("reading train.jsonl", 40_000_000, unit="MB", scale=1e6, clock=clock)
    clock.now += 10
    progress.update(12_300_000)
    unknown = Progress("reading rows", None, unit="rows", clock=clock)
    clock.now += 10
    unknown.update(1234)
    assert lines() == [
        "reading train.jsonl: 12.3/40.0 MB (31%), 10s elapsed, about 23s left",
        "reading rows: 1,234 rows, 10s elapsed",
    ]


def test_the_experiment_runner_says_which_cell_and_how_long_is_left():
    records = [{"status": "done", "seconds": 60.0}, {"status": "done", "skipped": True}]
    line = progress_line(2, 29, records[-1], 75.0, records, to_run=27)
    assert line == "== cell 2/29 skipped (already done) | 1m15s elapsed, about 27m00s left (27 cells to run)"
    records.append({"status": "failed", "seconds": 120.0})
    line = progress_line(3, 29, records[-1], 200.0, records, to_run=1)
    assert line == "== cell 3/29 failed in 2m00s | 3m20s elapsed, about 1m30s left (1 cell to run)"
    assert progress_line(29, 29, records[-1], 200.0, records, to_run=0).endswith("nothing left to run")
    # the grid's own timing of each arm, when it covers every cell still to run
    ahead = {"cells": 2, "seconds": 5400.0, "unknown": 0}
    line = progress_line(3, 29, records[-1], 200.0, records, to_run=2, estimate=ahead)
    assert line.endswith("about 1h30m of rounds left (2 cells to run, at each arm's seconds per round)")
    partial = {"cells": 2, "seconds": 2700.0, "unknown": 1}  # an arm not timed yet: the mean duration instead
    assert progress_line(3, 29, records[-1], 200.0, records, to_run=2, estimate=partial).endswith(
        "about 3m00s left (2 cells to run)"
    )

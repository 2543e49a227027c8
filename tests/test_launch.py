"""fedprime_core.tools.launch: retrying a flwr command whose local SuperLink was slow to start."""

from __future__ import annotations

import pytest

from fedprime_core.tools import launch
from fedprime_core.tools.launch import SUPERLINK_START_FAILURE, retry_slow_superlink


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(launch.time, "sleep", lambda seconds: None)


def scripted(*outcomes):
    calls = []

    def once():
        calls.append(len(calls))
        code, output = outcomes[min(len(calls), len(outcomes)) - 1]
        return code, output, len(calls)

    return once, calls


def test_a_slow_superlink_is_retried_until_the_run_starts():
    once, calls = scripted((1, f"... {SUPERLINK_START_FAILURE} 15s"), (0, "run finished"))
    lines = []
    assert retry_slow_superlink(once, echo=lines.append) == 2
    assert len(calls) == 2 and "attempt 1 of 3" in lines[0]


def test_retries_stop_after_the_last_attempt_and_return_its_result():
    once, calls = scripted((1, SUPERLINK_START_FAILURE))
    assert retry_slow_superlink(once, attempts=3) == 3
    assert len(calls) == 3


def test_other_failures_are_not_retried():
    once, calls = scripted((2, "run config error"))
    assert retry_slow_superlink(once) == 1
    assert len(calls) == 1

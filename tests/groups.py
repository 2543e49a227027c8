"""The ``flower`` mark as an xdist group (imported by ``tests/conftest.py``; kept free of torch so that
``tests/test_xdist_groups.py`` can run it in a small pytest of its own)."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Tests marked ``flower`` share one xdist group: with ``pytest -n 2 --dist loadgroup`` (the
    README's test command) they run one after another on one worker while the other worker runs
    the in-process tests. Two federations at once on a 2-core machine would starve each other."""
    for item in items:
        if item.get_closest_marker("flower"):
            item.add_marker(pytest.mark.xdist_group("flower"))

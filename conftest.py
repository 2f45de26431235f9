"""Repository-level conftest: the plugin is loaded through its entry point.

Only settings for the project's own test runs live here: integration and
example tests boot real guests, so collect them after the fast tests to give
quick feedback first (unit and pytester tests fail in seconds).
"""

from __future__ import annotations

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the examples run without it
    pass
else:
    # Hypothesis's per-example wall-clock deadline (200 ms) times the host, not
    # the code: on a loaded 2-core runner a property test failed it once
    # (test_duration_roundtrip_within_display_precision) and passed 3/3 alone.
    # The properties are what these tests assert; how fast an example runs is
    # the benchmarks' business.
    settings.register_profile(
        "pytest-virtio", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("pytest-virtio")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def slow(item: pytest.Item) -> bool:
        path = str(item.path)
        return "/integration/" in path or "/examples/" in path

    items.sort(key=slow)

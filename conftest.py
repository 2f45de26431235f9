"""Repository-level conftest: the plugin is loaded through its entry point.

Only settings for the project's own test runs live here: integration and
example tests boot real guests, so collect them after the fast tests to give
quick feedback first (unit and pytester tests fail in seconds).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def slow(item: pytest.Item) -> bool:
        path = str(item.path)
        return "/integration/" in path or "/examples/" in path

    items.sort(key=slow)

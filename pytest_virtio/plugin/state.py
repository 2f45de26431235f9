"""The plugin's session state: the stash keys and the lookups over them.

Why its own module: hooks, fixtures and the marked workload all read this state,
and the hooks module imports the other two (``pytest_plugins``, the fixtures'
guest run); keeping the keys here lets each import them at the top, with no
circle and no import inside a function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.measure import Measurement
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings
from pytest_virtio.plugin.artifacts import dir_name
from pytest_virtio.plugin.plan import TestPlan, build_plan
from pytest_virtio.results.finish import Finish
from pytest_virtio.results.records import SessionResults

__all__ = [
    "FINISH_KEY",
    "GUESTS_KEY",
    "MEASURED_KEY",
    "OUTCOME_KEY",
    "PLANS_KEY",
    "PLAN_KEY",
    "REPORTS_KEY",
    "RESULTS_KEY",
    "SESSION_KEY",
    "SETTINGS_KEY",
    "SIGTERM_KEY",
    "USES_GUEST_KEY",
    "artifacts_dir",
    "artifacts_root",
    "plan_of",
]

SETTINGS_KEY = pytest.StashKey[Settings]()
SESSION_KEY = pytest.StashKey[VirtioSession]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
RESULTS_KEY = pytest.StashKey[SessionResults]()
MEASURED_KEY = pytest.StashKey[Measurement]()
OUTCOME_KEY = pytest.StashKey[list[str]]()
FINISH_KEY = pytest.StashKey[Finish]()
PLAN_KEY = pytest.StashKey[TestPlan]()
#: Plans by test-function node id, filled at collection, read by :func:`plan_of`.
PLANS_KEY = pytest.StashKey[dict[str, TestPlan]]()
#: The SIGTERM handler ours replaced, restored at unconfigure.
SIGTERM_KEY = pytest.StashKey[Any]()
#: Set on an item whose test booted a guest (its failure report names the artifacts).
USES_GUEST_KEY = pytest.StashKey[bool]()
#: The guests a test booted or took from a pool, in order (their kernel logs are read
#: for splats after the test body).
GUESTS_KEY = pytest.StashKey[list[Guest]]()


def plan_of(item: pytest.Item) -> TestPlan:
    """The test's plan, built at collection (``pytest_generate_tests``).

    Why a lookup by definition id: the plan is built once per test function,
    before pytest splits it into matrix items, and an item keeps no link to
    its definition.  A node collected some other way (no generate hook ran)
    gets its plan built here, once, and kept.
    """
    plan = item.stash.get(PLAN_KEY, None)
    if plan is None:
        plans = item.config.stash.get(PLANS_KEY, {})
        plan = plans.get(item.nodeid.partition("[")[0])
        if plan is None:
            plan = build_plan(item, item.config.stash[SETTINGS_KEY])
        item.stash[PLAN_KEY] = plan
    return plan


def artifacts_root(config: pytest.Config) -> Path:
    """The resolved ``--virtio-artifacts`` directory (relative to the rootdir)."""
    return (Path(config.rootpath) / config.stash[SETTINGS_KEY].artifacts).resolve()


def artifacts_dir(item: pytest.Item) -> Path:
    """The test's own directory in the artifacts tree (one per test id, see artifacts.py)."""
    return artifacts_root(item.config) / dir_name(item.nodeid)

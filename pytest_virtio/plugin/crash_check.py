"""The ``crash_check`` fixture (issue 28 item 4): the crash-state oracle inside a test.

A test runs its workload on a logged disk (``Disk(write_log=True)``), then calls
``crash_check(guest.logged_disk("data"), check=...)``.  The fixture runs
:func:`pytest_virtio.guests.crashcheck.check_crash_states` with the session's
provisioning and the test's artifacts directory, records the counts (generated,
checked, failed) for the terminal summary and ``--virtio-json``, and fails the
test naming the first bad state, its kept image and its ``reproduce.sh``.

Why a fixture and not a marker: the check runs after the workload and needs
the test's own invariant (a shell command or a callable over the checker
guest); a call in the body says where the workload ends and what holds, and a
test may check two disks with two invariants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pytest_virtio import spec as spec_mod
from pytest_virtio.guests.crashcheck import Check, CrashReport, check_crash_states
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.writelogs import LoggedDisk
from pytest_virtio.plugin import artifacts
from pytest_virtio.plugin.state import RESULTS_KEY, USES_GUEST_KEY, artifacts_dir, artifacts_root
from pytest_virtio.results.crash import CrashCount
from pytest_virtio.vhost_user.crashstates import DiscardRule

__all__ = ["CrashCheck", "crash_check"]

log = logging.getLogger(__name__)


class CrashCheck:
    """``crash_check(disk, ...)``: check a logged disk's crash states for this test."""

    def __init__(self, item: pytest.Item, session: VirtioSession) -> None:
        self._item = item
        self._session = session
        self.reports: list[CrashReport] = []

    def directory(self, disk: str) -> Path:
        """Where disk ``disk``'s crash images go: ``crash-states/<disk>`` in the test's
        artifacts directory (kept only for a failed state)."""
        return artifacts_dir(self._item) / "crash-states" / artifacts.dir_name(disk)

    def __call__(self, disk: LoggedDisk, *, check: Check | None = None, subsets: int = 16,
                 seed: int = 0, fs: str | None = "ext4",
                 spec: spec_mod.MachineSpec | None = None, fail_fast: bool = False,
                 discard: DiscardRule = DiscardRule.ZEROES) -> CrashReport:
        """Check every flush boundary, the final state and ``subsets`` seeded subsets
        of ``disk`` (arguments as :func:`check_crash_states`); fail the test at the end
        if any state failed, else return the report."""
        out = self.directory(disk.name)
        # An earlier run's images of this test and disk go first (never outside the tree).
        artifacts.replace_dir(artifacts_root(self._item.config), out, lambda d: d.mkdir())
        self._item.stash[USES_GUEST_KEY] = True
        report = check_crash_states(self._session, disk, out, subsets=subsets, seed=seed,
                                    check=check, fs=fs, spec=spec, fail_fast=fail_fast,
                                    discard=discard)
        self.reports.append(report)
        self._record(report)
        log.info("crash check of %s: %s", disk.name, report.summary())
        if not report.failed:
            _remove_if_empty(out)
        report.raise_on_failure()
        return report

    def _record(self, report: CrashReport) -> None:
        first = report.first_failure
        count = CrashCount(
            test_id=self._item.nodeid, disk=report.disk, seed=report.seed,
            generated=report.generated, checked=report.checked, failed=report.failed,
            seconds=round(report.timings.total, 3),
            first_failure=None if first is None else first.describe(),
            kept_image=None if report.kept_image is None else str(report.kept_image),
            reproducer=None if report.reproducer is None else str(report.reproducer))
        self._item.config.stash[RESULTS_KEY].crash.append(count)


def _remove_if_empty(directory: Path) -> None:
    """A passing check leaves no empty directories behind in the artifacts tree (the
    disk's, ``crash-states``, the test's own)."""
    for path in (directory, directory.parent, directory.parent.parent):
        try:
            path.rmdir()
        except OSError:
            return


@pytest.fixture
def crash_check(request: pytest.FixtureRequest, virtio_session: VirtioSession) -> CrashCheck:
    """Check a logged disk's crash states in this test: ``crash_check(guest.logged_disk(
    "data"), check="test -s $MNT/file")``; see :class:`CrashCheck`."""
    return CrashCheck(request.node, virtio_session)

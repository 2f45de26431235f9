"""``@pytest.mark.vm(scope=...)``: a guest per class/module/session, reaped, artifacts per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_virtio.plugin.artifacts import dir_name

TCG = "--virtio-accel=tcg"

#: Each test records the QEMU pid it got; module scope shares, the last
#: module's function-scoped test must get its own.
SHARED = """
import pytest

pytestmark = pytest.mark.vm(scope="module")

PIDS = []

def test_a(guest):
    guest.check("echo a > /tmp/mark")
    PIDS.append(guest.machine.pid)

def test_b(guest):
    # Same guest: the file test_a wrote is there.
    assert guest.check("cat /tmp/mark").stdout.strip() == "a"
    PIDS.append(guest.machine.pid)

def test_fails(guest):
    PIDS.append(guest.machine.pid)
    guest.check("echo failing-test-was-here")
    assert False, "deliberate"

@pytest.mark.vm(scope="function")
def test_own(guest):
    assert guest.run("cat /tmp/mark").rc != 0
    assert guest.machine.pid not in PIDS

def test_last(guest):
    PIDS.append(guest.machine.pid)
    assert len(set(PIDS)) == 1, PIDS
"""

OTHER_MODULE = """
import os
import subprocess

def test_other_module(guest):
    # The first module's shared guest was shut down when its module ended.
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True,
                         text=True).stdout
    mine = [l for l in out.splitlines() if os.environ["TMPDIR"] in l]
    assert mine and not [l for l in mine if "module-guest" in l], mine
    assert guest.run("cat /tmp/mark").rc != 0
"""


def test_module_scope_shares_one_guest_and_keeps_artifacts_per_failed_test(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(test_shared=SHARED, test_zother=OTHER_MODULE)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:randomly")
    result.assert_outcomes(passed=5, failed=1)
    kept = pytester.path / ".pytest-virtio"
    failed_dirs = [p.name for p in kept.iterdir()]
    # Artifacts only for the test that failed while using the shared guest.
    assert failed_dirs == [dir_name("test_shared.py::test_fails")], failed_dirs
    channel = (kept / failed_dirs[0] / "module-guest0" / "command.log").read_text()
    assert "failing-test-was-here" in channel
    assert (kept / failed_dirs[0] / "module-guest0" / "reproduce.sh").is_file()
    assert find_qemus(inner_tmp) == []
    assert not [p for p in inner_tmp.iterdir() if p.name.startswith("pv-")]


CLASS_SCOPED = """
import pytest

@pytest.mark.vm(scope="class")
class TestOne:
    def test_1(self, guest):
        guest.check("touch /tmp/one")

    def test_2(self, guest):
        guest.check("test -e /tmp/one")


@pytest.mark.vm(scope="class")
class TestTwo:
    def test_3(self, guest):
        # A new class, a new guest: TestOne's file is not here.
        assert guest.run("test -e /tmp/one").rc == 1
"""


def test_class_scope_gives_each_class_its_guest(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(CLASS_SCOPED)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert find_qemus(inner_tmp) == []


DIES = """
import pytest

pytestmark = pytest.mark.vm(scope="session")

def test_kills_its_guest(guest):
    guest.run("echo o > /proc/sysrq-trigger", timeout=5)

def test_gets_a_live_one(guest):
    assert guest.check("echo alive").stdout.strip() == "alive"
"""


def test_a_dead_shared_guest_is_replaced_for_the_next_test(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(DIES)
    result = pytester.runpytest_subprocess(TCG, "-v")
    # The first test may pass or fail (its guest powered off under the command).
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*test_gets_a_live_one PASSED*"])
    assert find_qemus(inner_tmp) == []


def test_bad_scope_fails_at_collection_naming_marker_and_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(scope="package")
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.vm: scope='package' is not one of function, "
                                 "class, module, session*"])


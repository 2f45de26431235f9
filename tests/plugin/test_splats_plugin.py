"""Kernel splats fail the test during which the guest logged them (issue 26 item 1).

One inner run, one guest shared by the module (boots are the cost under TCG): a real
hung task (an ext4 frozen with fsfreeze, a write blocked on it, khungtaskd's report)
fails its test with the report; the next test on the same guest is not charged; a
test that says it causes one (``splats(expect=)``) passes, and so does one that
tolerates it (``allow=``); a user's look-alike written into /dev/kmsg is not a splat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TCG = "--virtio-accel=tcg"

INNER = r'''
import pytest

pytestmark = pytest.mark.vm(scope="module", nics=[], disks=[{"name": "d0", "size": "64M"}])

def hang(guest):
    """A real hung task: a write blocked on a frozen ext4 for 4 s, reported by khungtaskd
    after 1 s (every report, not just the first ten of the boot)."""
    dev = guest.disk_path("d0")
    guest.check("echo -1 > /proc/sys/kernel/hung_task_warnings; "
                "echo 1 > /proc/sys/kernel/hung_task_timeout_secs; "
                f"mountpoint -q /mnt || {{ mkfs.ext4 -q -F {dev} && mount {dev} /mnt; }}; "
                "fsfreeze -f /mnt; (touch /mnt/blocked &); sleep 4; fsfreeze -u /mnt; sleep 0.5",
                timeout=120)


def test_a_hung_task_fails_the_test(guest):
    hang(guest)


def test_the_next_test_on_the_guest_is_not_charged(guest):
    guest.check("echo 'WARNING: CPU: 0 PID: 1 at fake.c:1 user text' > /dev/kmsg")


@pytest.mark.splats(expect=[r"INFO: task \S+ blocked for more than"])
def test_a_test_that_causes_one_says_so(guest):
    hang(guest)


@pytest.mark.splats(expect=[r"never logged by anyone"])
def test_an_expected_splat_that_never_came_fails(guest):
    pass


@pytest.mark.splats(allow=["hung task|blocked for more than"])
def test_an_allowed_splat_passes(guest):
    hang(guest)
'''


def test_splats_fail_their_own_test_only(pytester: pytest.Pytester, inner_tmp: Path,
                                          find_qemus: object) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*FAILED*test_a_hung_task_fails_the_test*",
        "*FAILED*test_an_expected_splat_that_never_came_fails*",
    ])
    assert "kernel splat (hung task) on guest 'module-guest0':" in out
    assert "INFO: task touch:" in out and "blocked for more than 1 seconds" in out
    assert "expected kernel splat matching 'never logged by anyone' was not logged" in out
    for name in ("test_the_next_test_on_the_guest_is_not_charged",
                 "test_a_test_that_causes_one_says_so", "test_an_allowed_splat_passes"):
        result.stdout.fnmatch_lines([f"PASSED*{name}*"])
    assert find_qemus(inner_tmp) == []  # type: ignore[operator]


def test_splats_off_does_not_look(pytester: pytest.Pytester, inner_tmp: Path) -> None:
    pytester.makepyfile(test_inner=INNER.split("\n\n@pytest.mark.splats")[0])
    result = pytester.runpytest_subprocess(TCG, "-p", "no:cacheprovider", "--virtio-splats=off",
                                           "-k", "hung_task")
    result.assert_outcomes(passed=1)


def test_a_bad_splats_marker_fails_collection_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.splats(alow=["x"])
        def test_a(): pass

        @pytest.mark.splats(allow=["("])
        def test_b(): pass
    """)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert "@pytest.mark.splats: unknown key 'alow' (allowed: 'allow', 'expect')" in out
    assert "@pytest.mark.splats: allow: '(' is not a regular expression" in out

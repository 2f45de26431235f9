"""Session progress (an image build, a wait for another builder) reaches the user's terminal."""

from __future__ import annotations

import pytest

TCG = "--virtio-accel=tcg"


PROGRESS = """
def test_says(virtio_session):
    virtio_session.progress("step 1/3 mmdebstrap: still running (10s in this step)")
"""


def test_session_progress_reaches_the_terminal(pytester: pytest.Pytester) -> None:
    """An image build inside a test is shown (the reporter was looked up too early: silence)."""
    pytester.makepyfile(PROGRESS)
    result = pytester.runpytest_subprocess(TCG, "-q")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["pytest-virtio: step 1/3 mmdebstrap: still running*"])


def test_session_progress_of_an_xdist_worker_names_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROGRESS)
    result = pytester.runpytest_subprocess(TCG, "-q", "-n", "1")
    result.assert_outcomes(passed=1)
    result.stderr.fnmatch_lines(["pytest-virtio [[]gw0[]]: step 1/3 mmdebstrap: still running*"])

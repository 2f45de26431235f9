"""``--virtio-snapshot`` as a user meets it: a bare flag or an ini value, the template said once."""

from __future__ import annotations

from pathlib import Path

import pytest

TCG = "--virtio-accel=tcg"

TWO = """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_fresh(guest, i):
    assert guest.run("cat /root/mark").rc != 0
    guest.check("echo x > /root/mark")
"""


@pytest.mark.parametrize("how", ["flag", "ini"])
def test_snapshot_option_restores_fresh_guests(pytester: pytest.Pytester, inner_tmp: Path,
                                               find_qemus, how: str) -> None:
    pytester.makepyfile(TWO)
    args = [TCG, "-p", "no:randomly"]
    if how == "flag":
        args.append("--virtio-snapshot")
    else:
        pytester.makeini("[pytest]\nvirtio_snapshot = on\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=3)
    saved = [line for line in result.stdout.lines if "template of a 512 MiB guest saved" in line]
    assert len(saved) == 1, result.stdout.str()
    assert find_qemus(inner_tmp) == []
    assert not [p for p in inner_tmp.iterdir() if p.name.startswith("pv-")]


def test_bad_snapshot_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--virtio-snapshot=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--virtio-snapshot*invalid choice*'maybe'*"])

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
    # argparse names every form the option takes: --virtio-snapshot, =on, =off.
    result.stderr.fnmatch_lines(["*--virtio-snapshot/--virtio-snapshot=on/"
                                 "--virtio-snapshot=off*'maybe'*"])


SEEN = """
from pytest_virtio.plugin.hooks import SETTINGS_KEY

def test_seen(request):
    print("snapshot", request.config.stash[SETTINGS_KEY].snapshot)
"""


@pytest.mark.parametrize(("args", "snapshot"), [
    (["--virtio-snapshot", "tests/"], True),  # as the README writes it
    (["--virtio-snapshot", "tests/", "other/"], True),
    (["--virtio-snapshot=on", "tests/"], True),
    (["--virtio-snapshot=off", "tests/"], False),
    (["tests/", "--virtio-snapshot"], True),
])
def test_snapshot_flag_leaves_the_next_path_a_path(
    pytester: pytest.Pytester, args: list[str], snapshot: bool
) -> None:
    """The bare flag takes no value: the path after it is collected, not parsed as one."""
    for folder in ("tests", "other"):
        pytester.mkdir(folder).joinpath(f"test_{folder}.py").write_text(SEEN)
    pytester.mkdir("elsewhere").joinpath("test_not_named.py").write_text(SEEN)
    result = pytester.runpytest(TCG, "-s", *args)
    result.assert_outcomes(passed=len([a for a in args if a.endswith("/")]))
    assert result.stdout.str().count(f"snapshot {snapshot}") == result.parseoutcomes()["passed"]

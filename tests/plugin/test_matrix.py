"""virtio_matrix ids and bad input, expect_drivers failures, missing QEMU devices.

The matrix and bad-input tests only collect (no guest boots); the
expect_drivers test boots one guest because its point is the message a
person reads when the guest's drivers are not what the marker says.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

TCG = "--virtio-accel=tcg"


def test_matrix_ids_read_like_the_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.virtio_matrix(disk=["ahci", "virtio-blk"], nic=["e1000", "virtio-net"])
        def test_io(guest):
            pass
        """
    )
    result = pytester.runpytest("--collect-only", "-q", TCG)
    result.stdout.fnmatch_lines(
        [
            "*test_io[[]disk=ahci-nic=e1000[]]",
            "*test_io[[]disk=ahci-nic=virtio-net[]]",
            "*test_io[[]disk=virtio-blk-nic=e1000[]]",
            "*test_io[[]disk=virtio-blk-nic=virtio-net[]]",
            "4 tests collected*",
        ]
    )


def test_matrix_choice_reaches_virtio_choice(pytester: pytest.Pytester) -> None:
    """Without booting: the parametrized fixture carries the leg's choice."""
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.virtio_matrix(root_bus=["ide", "nvme"])
        def test_leg(virtio_choice, request):
            assert virtio_choice == {"root_bus": request.node.callspec.id.split("=")[1]}
        """
    )
    result = pytester.runpytest("-v", TCG)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_leg[[]root_bus=ide[]] PASSED*"])


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ('virtio_matrix(dsik=["ide"])', ["*virtio_matrix*axis*'dsik'*'disk'*'nic'*"]),
        ('virtio_matrix(disk=["floppy"])', ["*virtio_matrix*disk*'floppy'*'ahci'*"]),
        ('virtio_matrix(nic=["e1000", "e1000"])', ["*virtio_matrix*repeats a value*"]),
        ('virtio_matrix(disk=[])', ["*virtio_matrix*'disk' needs at least one value*"]),
        ("virtio_matrix()", ["*virtio_matrix needs at least one axis*"]),
        ('virtio_matrix("ide")', ["*virtio_matrix*keyword arguments only*"]),
    ],
)
def test_bad_matrix_input_is_a_collection_error(
    pytester: pytest.Pytester, marker: str, expected: list[str]
) -> None:
    pytester.makepyfile(
        f"""
        import pytest
        @pytest.mark.{marker}
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(expected)
    assert "Traceback" not in result.stdout.str()


def test_matrix_without_guest_fixture_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.virtio_matrix(disk=["ide"])
        def test_x():
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*virtio_matrix needs the `guest` fixture*"])


def test_unmet_expect_drivers_fails_naming_what_is_there(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: Callable[[Path], list[str]]
) -> None:
    """Missing and unwanted drivers are named, with what is bound; built-ins count."""
    pytester.makepyfile(
        """
        import pytest
        # acpiphp is built into Debian's kernel (=y): it must count as present.
        @pytest.mark.expect_drivers("virtio_blk", "acpiphp", "e1000", absent=["virtio_pci"])
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG, "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*expected drivers missing: e1000; drivers that should be absent are present: "
            "virtio_pci*",
            "*bound drivers: *virtio_blk*",
            "*loaded modules: *virtio_blk*",
        ]
    )
    missing_line = next(line for line in out.splitlines() if "expected drivers missing" in line)
    assert "acpiphp" not in missing_line and "virtio_blk," not in missing_line
    assert find_qemus(inner_tmp) == []


def _qemu_without(tmp: Path, model: str) -> Path:
    """A QEMU launcher whose ``-device help`` lacks ``model``: a build without it.

    Everything else goes to the real binary, so the plugin's capability check
    is exercised exactly as on a host whose QEMU was built without the model.
    """
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    script = tmp / "qemu-no-model"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-device" ] && [ "$2" = "help" ]; then\n'
        f'  {real} -device help | grep -v \'name "{model}"\'\n'
        "  exit 0\nfi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_device_missing_from_qemu_skips_with_reason(
    pytester: pytest.Pytester, inner_tmp: Path
) -> None:
    qemu = _qemu_without(inner_tmp, "nvme")
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(disks=["nvme"])
        def test_nvme(guest):
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest(TCG, "-rs", f"--virtio-qemu={qemu}")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*QEMU lacks device model(s) nvme*"])
    assert os.access(qemu, os.X_OK)

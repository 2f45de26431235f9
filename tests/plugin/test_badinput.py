"""Bad input everywhere: each mistake is one line that names the fix.

Only one case boots a guest (the disk held by another guest); the rest are
caught at configure, collection or before QEMU starts.  README.md#troubleshooting
lists every message asserted here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_virtio.guests.session import mem_available_mib

TCG = "--virtio-accel=tcg"


def _line_with(text: str, needle: str) -> str:
    """The single output line carrying ``needle`` (the message must fit on it)."""
    lines = [ln for ln in text.splitlines()
             if needle in ln and not ln.startswith((" ", ">"))]  # not traceback source
    assert lines, f"{needle!r} not in output:\n{text}"
    return lines[0]


def test_unknown_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--virtio-acel=tcg")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = _line_with(result.stderr.str(), "--virtio-acel")
    assert "unrecognized arguments" in line


def test_bad_marker_value_is_a_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(memory="lots")
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "'lots'")
    assert "memory" in line


@pytest.mark.parametrize("which", ["kernel", "initrd", "rootfs"])
def test_missing_custom_image_is_a_usage_error(pytester: pytest.Pytester, which: str) -> None:
    paths = {k: pytester.makefile(f".{k}", "x") for k in ("kernel", "initrd", "rootfs")}
    paths[which] = pytester.path / f"no-such-{which}"
    args = [f"--virtio-{k}={p}" for k, p in paths.items()]
    result = pytester.runpytest(TCG, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = _line_with(result.stderr.str(), f"--virtio-{which}")
    assert f"no-such-{which} does not exist" in line and "give the path" in line


def test_directory_as_kernel_is_a_usage_error(pytester: pytest.Pytester) -> None:
    files = [pytester.makefile(f".{k}", "x") for k in ("initrd", "rootfs")]
    result = pytester.runpytest(TCG, f"--virtio-kernel={pytester.path}",
                                f"--virtio-initrd={files[0]}", f"--virtio-rootfs={files[1]}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a regular file" in _line_with(result.stderr.str(), "--virtio-kernel")


def test_kernel_file_without_modules(pytester: pytest.Pytester) -> None:
    """A kernel alone is the user-kernel route: a kernel file needs its modules."""
    kernel = pytester.path / "bzImage"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 16)
    result = pytester.runpytest(TCG, f"--virtio-kernel={kernel}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "give its modules with --virtio-modules" in _line_with(result.stderr.str(),
                                                                 "--virtio-kernel")


def test_kernel_that_is_not_a_kernel(pytester: pytest.Pytester) -> None:
    kernel = pytester.makefile(".kernel", "x")
    result = pytester.runpytest(TCG, f"--virtio-kernel={kernel}",
                                f"--virtio-modules={pytester.path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "neither a bzImage nor an ELF" in _line_with(result.stderr.str(), "--virtio-kernel")


def test_initrd_without_rootfs(pytester: pytest.Pytester) -> None:
    files = [pytester.makefile(f".{k}", "x") for k in ("kernel", "initrd")]
    result = pytester.runpytest(TCG, f"--virtio-kernel={files[0]}", f"--virtio-initrd={files[1]}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "give all three" in _line_with(result.stderr.str(), "--virtio-initrd")


def test_modules_without_kernel(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(TCG, f"--virtio-modules={pytester.path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "goes with --virtio-kernel" in _line_with(result.stderr.str(), "--virtio-modules")


CUSTOM_INITRD_TEST = """
import pytest

@pytest.mark.vm({kwargs})
def test_x(guest):
    pass
"""


@pytest.mark.parametrize("kwargs, key, why", [
    ("initramfs_modules=['ahci']", "initramfs_modules=['ahci']", "choose the modules it loads"),
    ("root_bus='ahci'", "root_bus='ahci'", "ahci, sd_mod drivers that bus needs"),
    ("kernel='/boot'", "kernel='/boot'", "build an initramfs for another kernel"),
])
def test_custom_initrd_refuses_what_it_cannot_honour(
    pytester: pytest.Pytester, kwargs: str, key: str, why: str
) -> None:
    """With --virtio-initrd these keys would be silently ignored: a collection error instead."""
    files = [pytester.makefile(f".{k}", "x") for k in ("kernel", "initrd", "rootfs")]
    pytester.makepyfile(CUSTOM_INITRD_TEST.format(kwargs=kwargs))
    result = pytester.runpytest(TCG, f"--virtio-kernel={files[0]}",
                                f"--virtio-initrd={files[1]}", f"--virtio-rootfs={files[2]}")
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), key)
    assert "@pytest.mark.vm" in line and "--virtio-initrd is used as is" in line and why in line


@pytest.mark.parametrize("kwargs, words", [
    ("image='no-such-recipe'", "cannot read image recipe"),
    ("image='bookworm-distro', initramfs_modules=['virtio_blk']", "boots the distro's own"),
    ("image='bookworm-distro', kernel='/boot/vmlinuz'", "image and kernel"),
    ("root_disk=3", "root_disk must be a path"),
])
def test_image_and_root_disk_keys_fail_at_collection(pytester: pytest.Pytester, kwargs: str,
                                                      words: str) -> None:
    """vm(image=...) names a recipe that must exist; its errors name the marker."""
    pytester.makepyfile(CUSTOM_INITRD_TEST.format(kwargs=kwargs))
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), words)
    assert "@pytest.mark.vm" in line


def test_custom_initrd_refuses_a_root_bus_matrix(pytester: pytest.Pytester) -> None:
    files = [pytester.makefile(f".{k}", "x") for k in ("kernel", "initrd", "rootfs")]
    pytester.makepyfile("""
        import pytest

        @pytest.mark.virtio_matrix(root_bus=["virtio-blk", "nvme"])
        def test_x(guest):
            pass
    """)
    result = pytester.runpytest(TCG, f"--virtio-kernel={files[0]}",
                                f"--virtio-initrd={files[1]}", f"--virtio-rootfs={files[2]}")
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "root_bus='nvme'")
    assert "@pytest.mark.virtio_matrix" in line and "--virtio-initrd is used as is" in line


def test_vm_kernel_key_is_checked_at_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CUSTOM_INITRD_TEST.format(kwargs="kernel='/no/such/bzImage'"))
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "/no/such/bzImage")
    assert "@pytest.mark.vm(kernel=)" in line and "does not exist" in line


def test_bad_timeout_scale(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(TCG, "--virtio-timeout-scale=-2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "must be positive" in _line_with(result.stderr.str(), "--virtio-timeout-scale")


def test_memory_beyond_available_is_refused_before_launch(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    avail = mem_available_mib()
    if avail is None or avail >= 60 * 1024:
        pytest.skip("needs a host with less than 60 GiB available")
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(memory="64G")
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "MemAvailable")
    assert "needs 65536 MiB" in line and "ask for less memory" in line
    assert find_qemus(inner_tmp) == []


def test_missing_disk_image_is_refused_before_launch(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(disks=[dict(name="data", image="/nonexistent/disk.img",
                                    bus="virtio-blk")])
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "image /nonexistent/disk.img")
    assert "disk 'data'" in line and "does not exist" in line and "give the path" in line
    assert find_qemus(inner_tmp) == []


def test_missing_cdrom_iso_is_refused_before_launch(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    """Like a disk image: one line naming the drive, not QEMU's exit under its argv."""
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(devices=[dict(kind="cdrom", iso="/nonexistent/disc.iso")])
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    line = _line_with(out, "iso /nonexistent/disc.iso")
    assert "cdrom 'cd0'" in line and "does not exist" in line and "existing ISO image" in line
    assert "--- command ---" not in out  # refused before QEMU ran
    assert find_qemus(inner_tmp) == []


def test_socket_dir_too_long_names_tmpdir(
    pytester: pytest.Pytester, inner_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = inner_tmp / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    pytester.makepyfile("def test_x(guest): pass")
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "too long for unix socket paths")
    assert "set TMPDIR to a shorter directory" in line


def test_disk_in_use_by_another_guest_names_the_file(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    image = pytester.path / "shared.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    pytester.makepyfile(
        f"""
        from pytest_virtio.errors import LaunchError

        def test_two_writers(make_guest):
            disk = dict(name="shared", image={str(image)!r}, bus="virtio-blk")
            make_guest(name="first", disks=[disk])
            make_guest(name="second", disks=[disk])
        """
    )
    # keep=never: the failure must not leave an artifacts directory or section.
    result = pytester.runpytest_subprocess(TCG, "--virtio-keep=never")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    line = _line_with(out, "is in use by another QEMU")
    assert str(image) in line and "readonly=True" in line and "own copy" in line
    assert "pytest-virtio artifacts" not in out
    assert not (pytester.path / ".pytest-virtio").exists()
    assert find_qemus(inner_tmp) == []
    assert os.path.getsize(image) == 16 << 20


MISSING_DISK_TEST = """
import pytest
@pytest.mark.vm(disks=[dict(name="data", image="/nonexistent/disk.img", bus="virtio-blk")])
def test_x(guest):
    pass
"""


def test_setup_error_is_reported_as_its_message_alone(
    pytester: pytest.Pytester, inner_tmp: Path
) -> None:
    """No forty lines of fixture and session frames above the one line that matters."""
    pytester.makepyfile(MISSING_DISK_TEST)
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    section = out.split("ERROR at setup of test_x", 1)[1].split("short test summary", 1)[0]
    body = [ln for ln in section.splitlines()[1:] if ln and not ln.startswith("=")]
    assert len(body) == 1, section
    assert body[0].startswith("pytest_virtio.errors.ConfigError: disk 'data': image")
    assert body[0].endswith("give the path of an existing raw or qcow2 image")
    assert "session.py" not in out and "fixtures.py" not in out
    result.stdout.fnmatch_lines(["ERROR *::test_x - *"])  # the summary keeps its line


def test_fulltrace_restores_the_internal_frames(
    pytester: pytest.Pytester, inner_tmp: Path
) -> None:
    pytester.makepyfile(MISSING_DISK_TEST)
    result = pytester.runpytest(TCG, "--fulltrace")
    result.assert_outcomes(errors=1)
    assert "session.py" in result.stdout.str()


def test_error_in_the_test_body_keeps_only_the_tests_frames(pytester: pytest.Pytester) -> None:
    """A library call that raises deep inside pytest-virtio points at the caller's line."""
    pytester.makepyfile(
        """
        from pytest_virtio.spec import MachineSpec

        def build():
            return MachineSpec(memory="lots")

        def test_x():
            build()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "pytest_virtio/spec/" not in out
    result.stdout.fnmatch_lines([
        ">*build()", "*>*return MachineSpec(memory=\"lots\")",
        "E*ConfigError:*memory must be like*",
    ])


def test_other_exceptions_keep_their_traceback(pytester: pytest.Pytester) -> None:
    """Only errors pytest-virtio raises on purpose are shortened; a bug stays debuggable."""
    pytester.makepyfile(
        """
        from pytest_virtio.spec import MachineSpec, to_argv

        def test_x():
            to_argv(MachineSpec(memory="1G"), None)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    assert "pytest_virtio/spec/argv.py" in result.stdout.str()


def test_every_bad_marker_of_a_file_is_reported(pytester: pytest.Pytester) -> None:
    """Like pytest's own collection errors, each bad test is listed, not only the first;
    the good tests of the file are still collected."""
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(memory="lots")
        def test_a(guest): pass
        @pytest.mark.vm(smp=99)
        def test_b(guest): pass
        def test_ok(): pass
        class TestC:
            @pytest.mark.vm(bogus=1)
            def test_d(self, guest): pass
        """
    )
    result = pytester.runpytest(TCG, "--collect-only")
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    assert "test_a: @pytest.mark.vm: memory must be like" in _line_with(out, "'lots'")
    assert "test_b: @pytest.mark.vm: smp must be" in _line_with(out, "got 99")
    assert "TestC::test_d: @pytest.mark.vm: unknown key 'bogus'" in _line_with(out, "bogus")
    assert "<Function test_ok>" in out


def test_stacked_vm_marks_merge_closest_key_first(pytester: pytest.Pytester) -> None:
    """Module, class and method ``vm`` marks merge per key; the nearest mark wins a key."""
    pytester.makepyfile(
        """
        import pytest
        from pytest_virtio.plugin.fixtures import spec_for

        pytestmark = pytest.mark.vm(machine="q35", smp=4)

        @pytest.mark.vm(memory="1G", disks=["ahci", "lsi"])
        class TestStack:
            @pytest.mark.vm(smp=2, disks=["nvme"])
            def test_merged(self, request):
                spec = spec_for(request.node, None)
                assert (spec.machine, spec.memory_mib, spec.smp) == ("q35", 1024, 2)
                assert [d.bus for d in spec.disks] == ["nvme"]

            def test_class_and_module(self, request):
                spec = spec_for(request.node, None)
                assert (spec.machine, spec.memory_mib, spec.smp) == ("q35", 1024, 4)
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(passed=2)


def test_bad_key_on_a_class_vm_mark_fails_each_method(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(memroy="1G")
        class TestX:
            @pytest.mark.vm(smp=2)
            def test_a(self, guest): pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    line = _line_with(result.stdout.str(), "memroy")
    assert "TestX::test_a: @pytest.mark.vm: unknown key 'memroy'" in line
    assert "'memory'" in line and "'scope'" in line  # every key that works, scope too


def test_bad_recipe_field_is_a_usage_error_naming_it(pytester: pytest.Pytester) -> None:
    """ini virtio_image is relative to the ini file; a misspelt field fails at configure."""
    (pytester.path / "images").mkdir()
    (pytester.path / "images" / "mine.toml").write_text(
        'extends = "bookworm"\nname = "mine"\npakages = ["nvme-cli"]\n')
    pytester.makeini("[pytest]\nvirtio_image = images/mine.toml\n")
    result = pytester.runpytest(TCG)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = _line_with(result.stderr.str(), "unknown field(s) pakages")
    assert f"image recipe {pytester.path / 'images' / 'mine.toml'}:" in line

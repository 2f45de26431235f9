"""The plugin as a user meets it: options, markers, header, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pytest_virtio import spec
from pytest_virtio.guests import measure as workload_run
from pytest_virtio.guests.settings import OPTIONS
from pytest_virtio.images import builder
from pytest_virtio.images.recipe import load_recipe
from pytest_virtio.results import perf

TCG = "--virtio-accel=tcg"


def _marker_line(text: str, name: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"@pytest.mark.{name}:")]
    assert len(lines) == 1, f"@pytest.mark.{name} not in pytest --markers"
    return lines[0]


def test_markers_document_every_key(pytester: pytest.Pytester) -> None:
    """Every key the validators accept is in ``pytest --markers`` (keys from the code's tables)."""
    result = pytester.runpytest("--markers", TCG)
    assert result.ret == 0
    text = result.stdout.str()
    vm = _marker_line(text, "vm")
    for key in spec.SPEC_KEYS:
        assert f"{key}=" in vm, key
    for kind, keys in spec.item_keys().items():
        assert f"{kind}: {', '.join(keys)}" in vm, (kind, keys)
    matrix = _marker_line(text, "virtio_matrix")
    for axis in spec.MATRIX_AXES:
        assert f"{axis}=" in matrix
    assert "absent=" in _marker_line(text, "expect_drivers")
    wl = _marker_line(text, "workload")
    for kind, keys in workload_run.MARKER_KEYS.items():
        assert f"{kind}: {', '.join(k + '=' for k in keys)}" in wl, kind
    pm = _marker_line(text, "perf")
    for key in perf.PERF_KEYS:
        assert f"{key}=" in pm


def test_help_documents_every_option(pytester: pytest.Pytester) -> None:
    """``pytest --help`` works (a bare '%' in a help text once crashed it) and lists all options."""
    result = pytester.runpytest("--help")
    assert result.ret == 0, result.stderr.str()
    text = result.stdout.str()
    flat = "".join(text.split())
    for opt in OPTIONS:
        assert opt.flag in text, opt.flag
        assert f"{opt.ini} (" in text, opt.ini
        assert opt.env in flat, opt.env


def test_header_names_qemu_accel_and_image(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(TCG)
    result.stdout.fnmatch_lines(["virtio: QEMU *, accel tcg*image bookworm-*"])
    result.assert_outcomes(passed=1)


def test_unknown_vm_key_fails_at_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(memroy="1G")
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*vm*memroy*"])
    assert "memory" in result.stdout.str()  # the allowed keys are listed
    assert "Traceback" not in result.stdout.str()


def test_unknown_disk_bus_lists_choices(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(disks=["floppy"])
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "floppy" in out and "virtio-blk" in out and "ahci" in out


def test_bad_expect_drivers_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.expect_drivers("virtio_blk", missing=["x"])
        def test_x(guest):
            pass
        """
    )
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*expect_drivers: unknown key 'missing' (allowed: 'absent')*"])


def test_bad_option_value_is_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--virtio-keep=sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--virtio-keep*sometimes*"])


def test_bad_env_value_is_usage_error(pytester: pytest.Pytester,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_VIRTIO_ACCEL", "hvf")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*PYTEST_VIRTIO_ACCEL*'hvf' is not one of auto, kvm, tcg*"])


def test_missing_qemu_names_the_package(pytester: pytest.Pytester,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x(guest): pass")
    empty = pytester.mkdir("emptybin")
    monkeypatch.setenv("PATH", str(empty))
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "qemu-system-x86_64 not found" in out
    assert "apt-get install qemu-system-x86" in out


def test_corrupt_cached_image_is_a_clear_error(pytester: pytest.Pytester) -> None:
    cache = pytester.mkdir("cache")
    good = builder.ensure_image()
    fake = builder.image_dir(load_recipe(), cache)
    fake.mkdir(parents=True)
    (fake / "vmlinuz").write_bytes(b"not a kernel")
    shutil.copytree(good.modules_dir.parent, fake / "modules")  # type: ignore[union-attr]
    (fake / "rootfs.img").write_bytes(b"\0" * 4096)
    manifest = json.loads((good.cache_dir / builder.MANIFEST).read_text())
    (fake / builder.MANIFEST).write_text(json.dumps(manifest))
    pytester.makepyfile("def test_x(guest): pass")
    result = pytester.runpytest(TCG, f"--virtio-cache={cache}")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "is corrupt" in out
    assert "python -m pytest_virtio.images build --force" in out


def test_guest_test_passes_and_leaves_no_qemu(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(
        """
        def test_x(guest):
            assert guest.run("cat /proc/version").ok
        """
    )
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(passed=1)
    assert find_qemus(inner_tmp) == []
    assert not [p for p in inner_tmp.iterdir() if p.name.startswith("pv-")]


def test_hanging_command_fails_with_console_tail_and_keeps_artifacts(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(
        """
        def test_hang(guest):
            guest.run("echo about-to-hang; sleep 600", timeout=2)
        """
    )
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "GuestTimeout" in out and "console tail" in out
    # The log trail: what the plugin did to QEMU, in pytest's own captured-log section.
    result.stdout.fnmatch_lines(["*Captured log setup*", "*launched QEMU for guest: pid*",
                                 "*QMP guest -> cont*", "*QMP guest <- cont {}*",
                                 "*guest ready: its command shell answered*"])
    result.stdout.fnmatch_lines(["*pytest-virtio artifacts*"])
    kept = list((pytester.path / ".pytest-virtio").rglob("reproduce.sh"))
    assert kept, "no artifacts kept for the failing test"
    channel = kept[0].parent / "command.log"
    assert "PYTEST-VIRTIO-READY" in channel.read_text(errors="replace")
    assert os.access(kept[0], os.X_OK)
    assert find_qemus(inner_tmp) == []


NO_ROOT_TEST = """
import pytest

@pytest.mark.vm(initramfs_modules=["virtio_pci"])  # no virtio_blk: the root disk never appears
def test_no_root(guest):
    pass
"""


def test_boot_failure_keeps_artifacts_and_names_them(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    """A guest that never reaches its shell is the case that most needs its console log."""
    pytester.makepyfile(NO_ROOT_TEST)
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "no root disk labelled 'pvroot'" in out and "lacks virtio_blk" in out
    assert "session.py" not in out
    result.stdout.fnmatch_lines(["pytest-virtio artifacts: *test_no_root-*/guest"])
    kept = next((pytester.path / ".pytest-virtio").glob("*test_no_root-*")) / "guest"
    assert (kept / "reproduce.sh").is_file() and (kept / "qemu.stderr").is_file()
    assert "virtio" in (kept / "console.log").read_text(errors="replace")
    assert json.loads((kept / "qmp-events.json").read_text()) is not None
    assert find_qemus(inner_tmp) == []


def test_keep_never_keeps_nothing_of_a_failed_boot(
    pytester: pytest.Pytester, inner_tmp: Path
) -> None:
    pytester.makepyfile(NO_ROOT_TEST)
    result = pytester.runpytest_subprocess(TCG, "--virtio-keep=never")
    result.assert_outcomes(errors=1)
    assert "pytest-virtio artifacts" not in result.stdout.str()
    assert not (pytester.path / ".pytest-virtio").exists()


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_fixture_and_marker_key(pytester: pytest.Pytester) -> None:
    """Each fixture the plugin registers and each key a marker accepts is in README.md."""
    text = README.read_text()
    listed = pytester.runpytest("--fixtures").stdout.str()
    section = listed.split("fixtures defined from pytest_virtio.plugin.fixtures", 1)[1]
    section = section.split("\n---", 1)[0]
    fixtures = re.findall(r"^(\w+)(?: \[\w+ scope\])? -- ", section, re.MULTILINE)
    assert "guest" in fixtures and "virtio_choice" in fixtures
    keys = [*spec.SPEC_KEYS, *(k for keys in spec.item_keys().values() for k in keys),
            *spec.MATRIX_AXES, *perf.PERF_KEYS,
            *(k for keys in workload_run.MARKER_KEYS.values() for k in keys)]
    missing = sorted({name for name in (*fixtures, *keys) if f"`{name}" not in text})
    assert not missing, f"README.md does not mention: {missing}"


def test_kept_reproduce_sh_boots_after_the_session(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus, run_reproducer, tmp_path: Path
) -> None:
    """The kept reproduce.sh runs as it is once the session (and its run directory) is
    gone: its own sockets and console log, blank disks recreated, the vhost-user-blk
    disk served by qemu-storage-daemon. Proof: that guest reaches its shell."""
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.vm(disks=["vhost-user-blk", "virtio-blk"])
        def test_fails(guest):
            assert guest.check("echo hi").stdout == "nope"
        """
    )
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(failed=1)
    assert not list(inner_tmp.glob("pv-*")), "the inner session's run directory is gone"
    script = next((pytester.path / ".pytest-virtio").glob("*test_fails-*")) / "guest" / \
        "reproduce.sh"
    run_dir = tmp_path / "repro"
    run_reproducer(script, run_dir)
    assert find_qemus(run_dir) == []

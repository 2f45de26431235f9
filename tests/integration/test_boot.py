"""Issue 2's must-show: real guests boot, answer, and show their virtio drivers."""

from __future__ import annotations

import pytest

from pytest_virtio.errors import GuestTimeout

# One guest for the module's default-shape tests (none breaks it; the timed-out
# command's test shows it recovers): four boots fewer per run under TCG.
pytestmark = pytest.mark.vm(scope="module")


def test_proc_version(guest):
    res = guest.run("cat /proc/version")
    assert res.ok
    assert res.stdout.startswith("Linux version ")


def test_lsmod_lists_virtio_and_blk_driver_bound(guest):
    mods = guest.lsmod()
    for name in ("virtio", "virtio_ring", "virtio_pci", "virtio_blk"):
        assert name in mods, f"{name} not in lsmod: {sorted(mods)}"
    assert "virtio_blk" in guest.run("lsmod").stdout
    bound = guest.drivers()
    assert bound["virtio_blk"], bound
    assert bound["virtio_blk"][0].device_id == 2  # virtio 1.2 §5: block device
    res = guest.check("ls /sys/bus/virtio/drivers/virtio_blk/")
    assert "virtio" in res.stdout


def test_framing_survives_markers_kernel_noise_and_stderr(guest):
    # Output that looks like our markers, prompts and kernel messages must come
    # back verbatim, with stdout and stderr kept apart.
    tricky = "READY\\n# $ PYTEST-VIRTIO-READY 1.0\\n[    1.234] virtio_blk virtio0"
    res = guest.run(f"printf '{tricky}'; echo to-stderr >&2; exit 7")
    assert res.rc == 7
    assert res.stdout == "READY\n# $ PYTEST-VIRTIO-READY 1.0\n[    1.234] virtio_blk virtio0"
    assert res.stderr == "to-stderr\n"
    res = guest.run("echo kmsg-test > /dev/kmsg; seq 1 2000 | tail -n 1")
    assert res.stdout == "2000\n"


def test_check_raises_with_output(guest):
    from pytest_virtio.errors import CommandFailed

    with pytest.raises(CommandFailed) as info:
        guest.check("echo visible; false")
    assert "visible" in str(info.value)
    assert "exit 1" in str(info.value)


def test_command_that_never_returns_times_out_and_guest_recovers(guest):
    with pytest.raises(GuestTimeout) as info:
        guest.run("sleep 1000", timeout=3)
    assert "sleep 1000" in str(info.value)
    assert "console tail" in str(info.value)
    assert guest.run("echo alive").stdout == "alive\n"


def test_make_guest_boots_two_guests(make_guest):
    a = make_guest(name="a")
    b = make_guest(name="b", memory="256M")
    assert a.run("hostname").stdout == b.run("hostname").stdout == "pvguest\n"
    assert a.machine.pid != b.machine.pid
    mem = int(b.check("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert 150_000 < mem < 262_144

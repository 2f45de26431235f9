"""The basics: a guest per test, commands, drivers, and a custom machine.

Run with `make demo`, or `pytest examples/test_quickstart.py`.
"""

import pytest


def test_guest_answers(guest):
    """Every test that asks for `guest` gets a freshly booted VM."""
    res = guest.run("cat /proc/version")
    assert res.ok, res.stderr
    assert "Linux" in res.stdout


def test_root_disk_is_virtio(guest):
    """By default the root disk is virtio-blk, so its driver must be bound."""
    assert "virtio_blk" in guest.drivers()
    assert "virtio_blk" in guest.lsmod()


@pytest.mark.vm(memory="384M", smp=2, disks=[{"bus": "virtio-blk", "size": "32M"}])
@pytest.mark.expect_drivers("virtio_blk", "virtio_pci")
def test_custom_machine(guest):
    """`vm` shapes the machine; `expect_drivers` checks drivers right after boot."""
    assert guest.check("nproc").stdout == "2\n"
    dev = guest.disk_path("disk0")
    guest.check(f"dd if=/dev/zero of={dev} bs=1M count=4 oflag=direct")
    size = guest.check(f"blockdev --getsize64 {dev}").stdout
    assert int(size) == 32 * 1024 * 1024


def test_two_guests(make_guest):
    """`make_guest` builds as many guests as a test needs."""
    a, b = make_guest(name="a"), make_guest(name="b", memory="256M")
    assert a.run("echo a").stdout == "a\n"
    assert b.run("echo b").stdout == "b\n"

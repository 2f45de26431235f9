"""Virtio vs emulated devices: the checks a virtualization team runs. Copy freely.

Run with ``pytest examples/test_devices.py`` (add ``-n 2`` for two workers).
Each test says in one line what it proves; the markers are the whole setup.
"""

from __future__ import annotations

import socket
import threading

import pytest

from pytest_virtio import Guest, MakeGuest
from pytest_virtio.errors import GuestError
from pytest_virtio.spec import EXPECTED_DRIVER

VIRTIO_MODULES = (
    "virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net",
    "virtio_console", "virtio_balloon", "virtio_rng",
)  # fmt: skip


# --------------------------------------------------------------------- disks


@pytest.mark.virtio_matrix(disk=["ide", "virtio-blk"])
@pytest.mark.vm(disks=[{"name": "data", "size": "64M"}])
def test_same_workload_on_ide_and_virtio_blk(guest: Guest, virtio_choice: dict[str, str]) -> None:
    """The same dd and fio workload runs on an IDE disk and a virtio-blk disk."""
    bus = virtio_choice["disk"]
    dev = guest.disk_path("data")
    assert EXPECTED_DRIVER[bus] in guest.disk_drivers("data")

    # dd: write 4 MiB of random data past the page cache, then compare it back.
    guest.check("dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null")
    guest.check(f"dd if=/tmp/pattern of={dev} bs=1M oflag=direct 2>/dev/null")
    guest.check(f"cmp -n 4194304 /tmp/pattern {dev}")

    # fio: a short random read/write mix; the numbers land in the report.
    result = guest.fio(dev, rw="randrw", bs="4k", iodepth=8, size="16M",
                       runtime=3, time_based=True)
    assert result.errors == 0
    assert result.read.iops > 0 and result.write.iops > 0


# ---------------------------------------------------------------------- NICs


def _serve_once(server: socket.socket, received: list[bytes]) -> None:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(30)
        received.append(conn.recv(64))


def _wait_for_carrier(guest: Guest, iface: str) -> None:
    """Emulated NICs raise carrier a moment after ``ip link set up``."""
    guest.check(
        f"for i in $(seq 50); do [ \"$(cat /sys/class/net/{iface}/carrier)\" = 1 ] && exit 0; "
        "sleep 0.1; done; exit 1"
    )


@pytest.mark.virtio_matrix(nic=["e1000", "virtio-net"])
def test_nic_link_ping_and_tcp_to_host(guest: Guest, virtio_choice: dict[str, str]) -> None:
    """e1000 and virtio-net both bind their driver, come up, answer ping and carry TCP.

    Traffic goes only to QEMU's user-mode gateway 10.0.2.2, which is the host:
    a socket listening on the host's 127.0.0.1 is reachable there.
    """
    model = virtio_choice["nic"]
    assert guest.nic_drivers("net0")[0] == EXPECTED_DRIVER[model]
    iface = guest.nic_interface("net0")
    guest.check(f"ip link set {iface} up")
    _wait_for_carrier(guest, iface)
    guest.check("busybox ping -c 2 -W 5 10.0.2.2")

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]
        received: list[bytes] = []
        thread = threading.Thread(target=_serve_once, args=(server, received), daemon=True)
        thread.start()
        guest.check(f"echo hello-from-{model} | busybox nc -w 5 10.0.2.2 {port}")
        thread.join(60)
    assert received == [f"hello-from-{model}\n".encode()]


# ------------------------------------------------------------------- modules


@pytest.mark.vm(root_bus="ide")
def test_virtio_modules_load_on_demand(guest: Guest) -> None:
    """On a guest with no virtio device, every virtio module is loadable by modprobe."""
    before = guest.lsmod()
    assert "virtio_blk" not in before, "nothing should have loaded virtio_blk yet"
    for name in VIRTIO_MODULES:
        guest.modprobe(name)
    after = guest.lsmod()
    missing = [name for name in VIRTIO_MODULES if name not in after]
    assert not missing, f"modprobe'd but not in lsmod: {missing}"
    assert "virtio_net" in guest.check("lsmod").stdout


# ---------------------------------------------------------------- root disks


def test_virtio_root_needs_virtio_blk_in_initramfs(make_guest: MakeGuest) -> None:
    """A virtio-blk root with an initramfs lacking virtio_blk fails, saying so; adding it boots."""
    with pytest.raises(GuestError, match="lacks virtio_blk") as info:
        make_guest(name="no-driver", initramfs_modules=["virtio_pci"])
    assert "no root disk" in str(info.value)

    guest = make_guest(name="with-driver", initramfs_modules=["virtio_pci", "virtio_blk"])
    assert "virtio_blk" in guest.drivers()


@pytest.mark.vm(root_bus="ide", disks=[{"name": "extra", "bus": "virtio-blk", "size": "16M"}])
@pytest.mark.expect_drivers("ata_piix", "virtio_blk")
def test_extra_virtio_disk_on_ide_guest_gets_its_driver(guest: Guest) -> None:
    """Booted from IDE, a second (virtio) disk gets virtio_blk bound: the driver-install route."""
    root = guest.check("awk '$2 == \"/\" {print $1}' /proc/mounts").stdout.strip()
    assert root.startswith("/dev/sd"), f"root should be on IDE, is {root}"
    assert guest.disk_drivers("extra")[0] == "virtio_blk"
    guest.check(f"dd if=/dev/zero of={guest.disk_path('extra')} bs=1M count=4 oflag=direct")

"""virtio-serial end to end: named ports in a real guest, bytes both ways, several
ports at once, a multi-MiB transfer byte-identical.

One guest with three ports serves every test here (a boot is the expensive part
under TCG); each test uses its own payloads, so no test depends on another's data.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import pytest

from pytest_virtio.errors import ConfigError, GuestTimeout
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import MachineSpec, SerialPorts

PORTS = ("org.test.0", "org.test.1", "com.example.log")
LARGE = 4 << 20


@pytest.fixture(scope="module")
def serial_guest(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(MachineSpec(devices=(SerialPorts(names=PORTS),)), "serial")


def test_guest_sees_each_named_port(serial_guest: Guest) -> None:
    out = serial_guest.check(
        'for n in /dev/virtio-ports/*; do echo "${n##*/} $(cat /sys/class/virtio-ports/'
        '$(basename "$(readlink "$n")")/name)"; done'
    ).stdout
    pairs = dict(line.split() for line in out.splitlines())
    assert pairs == {p: p for p in PORTS}  # each link leads to the port of that name
    assert "virtio_console" in serial_guest.drivers()


def test_host_to_guest(serial_guest: Guest) -> None:
    port = serial_guest.serial_port("org.test.0")
    port.send(b"hello guest\n")  # waits in the socket until the guest opens the port
    out = serial_guest.check("head -n 1 /dev/virtio-ports/org.test.0").stdout
    assert out.splitlines() == ["hello guest"]


def test_guest_to_host(serial_guest: Guest) -> None:
    port = serial_guest.serial_port("org.test.1")
    serial_guest.check("printf 'from guest\\n' > /dev/virtio-ports/org.test.1")
    assert port.recv_until(b"\n") == b"from guest\n"


def test_ports_at_once_keep_their_own_data(serial_guest: Guest) -> None:
    for name in PORTS:
        serial_guest.serial_port(name).send(f"to {name}\n".encode())
    script = "; ".join(f"head -n 1 /dev/virtio-ports/{n}" for n in PORTS)
    assert serial_guest.check(script).stdout.splitlines() == [f"to {n}" for n in PORTS]
    writes = "; ".join(f"echo from {n} > /dev/virtio-ports/{n}" for n in reversed(PORTS))
    serial_guest.check(writes)
    for name in PORTS:
        assert serial_guest.serial_port(name).recv_until(b"\n") == f"from {name}\n".encode()


def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    box: list[object] = []

    def run() -> None:
        try:
            box.append(fn())  # type: ignore[operator]
        except BaseException as exc:  # re-raised in the test
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _result(thread: threading.Thread, box: list[object]) -> object:
    thread.join(60)
    assert box, "host-side transfer thread did not finish"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def test_large_transfer_host_to_guest_is_byte_identical(serial_guest: Guest) -> None:
    data = os.urandom(LARGE)
    port = serial_guest.serial_port("org.test.0")
    timeout = serial_guest.default_timeout()
    thread, box = _in_thread(lambda: port.send(data, timeout=timeout))
    out = serial_guest.check(f"head -c {LARGE} /dev/virtio-ports/org.test.0 | sha256sum",
                             timeout=timeout).stdout
    _result(thread, box)
    assert out.split()[0] == hashlib.sha256(data).hexdigest()


def test_large_transfer_guest_to_host_is_byte_identical(serial_guest: Guest) -> None:
    port = serial_guest.serial_port("org.test.1")
    timeout = serial_guest.default_timeout()
    digest = serial_guest.check(
        f"head -c {LARGE} /dev/urandom > /tmp/blob && sha256sum /tmp/blob").stdout.split()[0]
    thread, box = _in_thread(lambda: port.recv_exactly(LARGE, timeout=timeout))
    serial_guest.check("cat /tmp/blob > /dev/virtio-ports/org.test.1; rm /tmp/blob",
                       timeout=timeout)
    received = _result(thread, box)
    assert isinstance(received, bytes) and len(received) == LARGE
    assert hashlib.sha256(received).hexdigest() == digest


def test_silent_guest_is_a_timeout_naming_the_port(serial_guest: Guest) -> None:
    port = serial_guest.serial_port("com.example.log")
    with pytest.raises(GuestTimeout, match=r"'com.example.log': 0 of 10 bytes"):
        port.recv_exactly(10, timeout=0.5)


def test_unknown_port_lists_the_guests_ports(serial_guest: Guest) -> None:
    with pytest.raises(ConfigError, match=r"this guest has: org\.test\.0, org\.test\.1"):
        serial_guest.serial_port("org.test.9")

"""Integration tests boot real guests: they need QEMU and the image (built by `make image`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import MissingDevices, VirtioSession
from pytest_virtio.spec import MachineSpec

BootShared = Callable[[MachineSpec, str], Guest]


@pytest.fixture(scope="module")
def boot_shared(virtio_session: VirtioSession) -> Iterator[BootShared]:
    """``boot_shared(spec, name)``: a guest the module's tests share (boots are the
    expensive part under TCG), shut down after the module; a QEMU without the
    spec's device models skips, naming them."""
    made: list[Guest] = []

    def boot(spec: MachineSpec, name: str) -> Guest:
        try:
            guest = virtio_session.boot(spec, name)
        except MissingDevices as exc:
            pytest.skip(f"QEMU lacks device model(s) {', '.join(sorted(exc.missing))}")
        made.append(guest)
        return guest

    yield boot
    for guest in made:
        guest.close()
        virtio_session.guests.remove(guest)
    for guest in made:  # as make_guest does: a backend failure fails the module
        guest.raise_backend_errors()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

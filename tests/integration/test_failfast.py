"""Fail fast: a panicking guest or a dying QEMU fails the test in seconds, not at a timeout.

Two boots: a panic ends the guest (pvpanic makes QEMU power off), so the
killed-QEMU case needs its own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from pytest_virtio.errors import GuestPanic, LaunchError

#: Far below any guest timeout (30 s times the TCG scale): what "fast" means here.
FAST = 10.0


def _until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_kernel_panic_fails_fast_naming_the_panic_line(guest):
    assert "pvpanic_mmio" in guest.lsmod(), "the ISA pvpanic device has no driver bound"
    start = time.monotonic()
    with pytest.raises(GuestPanic) as info:
        guest.run("echo c > /proc/sysrq-trigger", timeout=300)
    assert time.monotonic() - start < FAST
    assert "Kernel panic - not syncing: sysrq triggered crash" in str(info.value)
    assert "console tail" in str(info.value)
    # pvpanic: QEMU reports GUEST_PANICKED and powers off; whatever the test does
    # next is reported as the panic (with the line), not as a mysterious exit 0.
    assert _until(lambda: guest.machine.exitcode() is not None, FAST)
    start = time.monotonic()
    with pytest.raises(GuestPanic) as again:
        guest.run("true", timeout=300)
    assert time.monotonic() - start < FAST
    assert "GUEST_PANICKED" in str(again.value)
    assert "sysrq triggered crash" in str(again.value)
    assert guest.machine.panic_event() is not None


def test_killed_qemu_is_a_launch_error_with_status_not_a_timeout(guest):
    guest.check("true")
    os.kill(guest.machine.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        guest.run("echo still-there", timeout=300)
    assert time.monotonic() - start < FAST
    message = str(info.value)
    assert message.splitlines()[0].startswith("QEMU was killed by signal 9 (SIGKILL)"), message
    assert "--- qemu stderr ---" in message and "--- command ---" in message
    assert "qemu-system-x86_64" in message

"""virtio-balloon in a real guest: inflate, deflate, statistics, device options.

Two guests: a plain balloon (inflate/deflate/stats share it, in that order, each
test leaving it at full size) and one with deflate_on_oom + free_page_reporting,
which proves the options reach the guest driver.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_virtio.errors import ConfigError, GuestTimeout
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import Balloon, MachineSpec

MIB = 1 << 20
FULL = 512 * MIB
#: virtio 1.2 §5.5.3 feature bits.
DEFLATE_ON_OOM_BIT = 2
PAGE_REPORTING_BIT = 5


@pytest.fixture(scope="module")
def plain(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(MachineSpec(memory="512M", devices=(Balloon(),)), "balloon")


@pytest.fixture(scope="module")
def optioned(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    balloon = Balloon(deflate_on_oom=True, free_page_reporting=True)
    return boot_shared(MachineSpec(memory="512M", devices=(balloon,)), "balloon-opts")


def _mem_total_kib(guest: Guest) -> int:
    return int(guest.check("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout)


def _balloon_features(guest: Guest) -> str:
    """The balloon's negotiated feature bits as the guest shows them ('0'/'1' per bit)."""
    return guest.check(
        "for d in /sys/bus/virtio/devices/*; do "
        '[ "$(cat $d/device)" = 0x0005 ] && cat $d/features; done'
    ).stdout.strip()


def test_inflate_shrinks_the_guest_and_deflate_restores_it(plain: Guest) -> None:
    before = _mem_total_kib(plain)
    assert plain.balloon("256M") == 256 * MIB
    shrunk = _mem_total_kib(plain)
    # Without deflate-on-oom Linux takes ballooned pages out of MemTotal.
    assert before - shrunk == 256 * 1024, (before, shrunk)
    assert plain.balloon(FULL) == FULL
    assert _mem_total_kib(plain) == before


def test_target_not_reached_names_the_size_reached(plain: Guest) -> None:
    try:
        with pytest.raises(GuestTimeout, match=r"balloon: guest reached \d+ MiB .* not the "
                                               r"target 128 MiB"):
            plain.balloon("128M", timeout=0)  # no guest inflates 384 MiB in no time
    finally:
        assert plain.balloon(FULL) == FULL


def test_stats_report_guest_memory_and_follow_its_use(plain: Guest) -> None:
    first = plain.balloon_stats()
    assert first.total_memory == _mem_total_kib(plain) * 1024
    assert first.free_memory is not None and 0 < first.free_memory < first.total_memory
    plain.check("head -c 96M /dev/zero > /dev/shm/fill")  # tmpfs: the pages stay used
    try:
        second = plain.balloon_stats()
    finally:
        plain.check("rm -f /dev/shm/fill")
    assert second.last_update > first.last_update
    assert second.free_memory is not None
    assert first.free_memory - second.free_memory >= 80 * MIB, (first, second)


def test_plain_balloon_negotiates_neither_option(plain: Guest) -> None:
    bits = _balloon_features(plain)
    assert bits[DEFLATE_ON_OOM_BIT] == "0" and bits[PAGE_REPORTING_BIT] == "0", bits


def test_options_reach_the_guest_driver(optioned: Guest) -> None:
    bits = _balloon_features(optioned)
    assert bits[DEFLATE_ON_OOM_BIT] == "1" and bits[PAGE_REPORTING_BIT] == "1", bits
    before = _mem_total_kib(optioned)
    try:
        assert optioned.balloon("384M") == 384 * MIB
        # With deflate-on-oom the ballooned pages stay in MemTotal (the guest may
        # take them back under memory pressure), unlike the plain balloon above.
        assert _mem_total_kib(optioned) == before
    finally:
        optioned.balloon(FULL)


def test_balloon_without_device_is_a_config_error(plain: Guest) -> None:
    g = Guest(machine=plain.machine, name="x", accel=plain.accel, timeout_scale=1.0,
              run_dir=plain.run_dir, spec=MachineSpec())
    with pytest.raises(ConfigError, match="no balloon"):
        g.balloon("256M")

"""Guest networking over e1000 and virtio-net: reachability and iperf3 throughput.

Traffic goes only between the guest and the host's loopback (10.0.2.2 in the
guest is 127.0.0.1 on the host); transfers are 2 s each way so the pair of
guests stays near half a minute under TCG.
"""

from __future__ import annotations

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.netcheck import GUEST_GATEWAY, fetch_token, iperf3_both_ways
from pytest_virtio.workloads.iperf import NetResult

SECONDS = 2.0


def _mbit(result: NetResult) -> float:
    return result.bits_per_second / 1e6


@pytest.mark.vm(nics=["virtio-net"])
@pytest.mark.virtio_matrix(nic=["e1000", "virtio-net"])
def test_nic_reaches_host_and_reports_throughput(
    guest: Guest, virtio_choice: dict[str, str],
    record_property: pytest.RecordProperty, capsys: pytest.CaptureFixture[str],
) -> None:
    model = virtio_choice["nic"]
    driver = {"e1000": "e1000", "virtio-net": "virtio_net"}[model]
    assert driver in guest.lsmod(), f"{driver} not loaded for a {model} NIC"
    # The gateway answers, and a service bound to the host's 127.0.0.1 is reachable.
    guest.check(f"busybox ping -c 1 -W 5 {GUEST_GATEWAY}", via="ssh")
    fetch_token(guest)
    # Bulk transfer both ways: guest sends (NIC TX), then host sends (NIC RX).
    tx, rx = iperf3_both_ways(guest, seconds=SECONDS)
    for direction, res in (("tx", tx), ("rx", rx)):
        record_property(f"iperf3_{model}_{direction}_mbit_s", round(_mbit(res), 1))
    with capsys.disabled():
        print(f"\n[{model}] iperf3 guest→host {_mbit(tx):.0f} Mbit/s, "
              f"host→guest {_mbit(rx):.0f} Mbit/s ({guest.accel}, {SECONDS:g} s each)")

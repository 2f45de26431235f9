"""A network transfer on an emulated NIC (e1000) and on virtio-net.

The ``workload("iperf3")`` marker starts a one-shot ``iperf3 -s`` bound to the
host's loopback and runs ``iperf3 -c 10.0.2.2`` in the guest: QEMU user-mode
networking maps 10.0.2.2 to the host's 127.0.0.1, so the traffic never leaves
this machine.  The result (a NetResult) is filed under the NIC model.

Measured under TCG: host→guest virtio-net 82 MiB/s vs e1000 55 MiB/s (1.5x)
alone, but 37 vs 37 and 92.5 vs 92.8 MiB/s with two workers (user-mode
networking's single thread caps both NICs at the same rate).  So the
throughput promise is parity (by=1.0), judged over five rounds alternated with
an e1000 guest: when the rounds' spread straddles parity the verdict is
"inconclusive", not a false failure.  The strong claim is counted, not timed:
per packet e1000 takes ~0.3 register accesses (VM exits under KVM), virtio-net
~0.03 (measured), so virtio-net must trap at least 3 times less;
guest→host the other way round, virtio-net 10 MiB/s vs e1000 16-29 MiB/s (the
guest's TSO super-frames have to be re-segmented by user-mode networking's
TCP stack).  So the receive direction carries the promise; the send direction
is measured and reported, honestly, without one.
"""

from __future__ import annotations

import pytest

from pytest_virtio import Guest
from pytest_virtio.spec import EXPECTED_DRIVER
from pytest_virtio.workloads.iperf import NetResult

NIC = {"model": "virtio-net", "hostfwd_ssh": False}
MATRIX = pytest.mark.virtio_matrix(nic=["e1000", "virtio-net"])


def assert_driver_bound(guest: Guest) -> None:
    model = guest.spec.nics[0].model
    expected = EXPECTED_DRIVER[model]
    assert expected in guest.lsmod(), f"{model}: driver {expected} not loaded"


@pytest.mark.vm(nics=[NIC])
@MATRIX
@pytest.mark.workload("iperf3", nic="net0", seconds=3, reverse=True)
@pytest.mark.perf(min_bw={"tcg": "10M"}, faster_than={"virtio-net": "e1000"}, by=1.0,
                  metric="bw", rounds=5)
@pytest.mark.perf(faster_than={"virtio-net": "e1000"}, metric="traps_per_io", by=3)
def test_tcp_host_to_guest(guest: Guest, workload: NetResult) -> None:
    """Host → guest TCP: the guest's receive path, where virtio-net must win."""
    assert_driver_bound(guest)
    assert workload.bytes > 0


@pytest.mark.vm(nics=[NIC])
@MATRIX
@pytest.mark.workload("iperf3", nic="net0", seconds=3)
@pytest.mark.perf(min_bw={"tcg": "2M"})
def test_tcp_guest_to_host(guest: Guest, workload: NetResult) -> None:
    """Guest → host TCP: measured for the report, no relative promise (see above)."""
    assert_driver_bound(guest)
    assert workload.bytes > 0

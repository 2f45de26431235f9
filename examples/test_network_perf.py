"""A network transfer on an emulated NIC (e1000) and on virtio-net.

The ``workload("iperf3")`` marker starts a one-shot ``iperf3 -s`` bound to the
host's loopback and runs ``iperf3 -c 10.0.2.2`` in the guest: QEMU user-mode
networking maps 10.0.2.2 to the host's 127.0.0.1, so the traffic never leaves
this machine.  The result (a NetResult) is filed under the NIC model, and
virtio-net must out-run e1000 (judged at session end, like the storage suite).
"""

from __future__ import annotations

import pytest

from pytest_virtio.guest import Guest
from pytest_virtio.spec import EXPECTED_DRIVER
from pytest_virtio.workloads.iperf import NetResult

NIC = {"model": "virtio-net", "hostfwd_ssh": False}


@pytest.mark.vm(nics=[NIC])
@pytest.mark.virtio_matrix(nic=["e1000", "virtio-net"])
@pytest.mark.workload("iperf3", nic="net0", seconds=3)
@pytest.mark.perf(min_bw={"tcg": "10M"}, faster_than={"virtio-net": "e1000"}, metric="bw")
def test_tcp_guest_to_host(guest: Guest, workload: NetResult) -> None:
    """Guest → host TCP throughput; the NIC's driver must be the one bound."""
    model = guest.spec.nics[0].model
    expected = EXPECTED_DRIVER[model]
    assert expected in guest.lsmod(), f"{model}: driver {expected} not loaded"
    assert workload.bytes > 0

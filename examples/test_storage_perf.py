"""The suite a storage engineer would write: the same fio jobs on every disk bus.

Each test runs once per bus (``virtio_matrix``).  Before the body, the
``workload`` marker runs fio on the guest's data disk ``disk0`` (found in the
guest by its serial) and hands the result to the ``workload`` fixture; the
body asserts which driver bound.  ``perf`` then checks two kinds of promise:

* absolute floors per accelerator — TCG emulates the CPU, so its floors are
  low; the KVM figures are what a real host should reach;
* relative: each paravirtual bus must beat the emulated bus it replaces
  (``faster_than={paravirtual: emulated}``).  The reference item may run in
  another xdist worker, so relative checks are judged once at session end from
  every worker's results; a miss fails the session (non-zero exit status) and
  is listed under "pytest-virtio results" with the measured ratio.

Runtimes are short (3 s) so ``make demo`` takes a few minutes on two cores.
Measured under TCG on this project's 2-core machine, two workers, 4k randread
at iodepth 16: IDE 2.3k IOPS, AHCI 3.9k, virtio-scsi 3.8k, virtio-blk 3.5k,
vhost-user-blk 2.4k (one guest alone: IDE 3.7k, virtio-blk 5.8k, vhost-user-blk
7.7k; an idle host reaches 14-17k on virtio-blk).  TCG's CPU emulation costs
more than the device model, so the margins are modest, and AHCI (NCQ, one MMIO
write per batch) is as fast as virtio-scsi here: the promises below are the ones
that hold under TCG.  vhost-user-blk is measured but promises nothing: its
backend is Python in the pytest worker, sharing that process's CPU.
"""

from __future__ import annotations

import pytest

from pytest_virtio import Guest
from pytest_virtio.spec import EXPECTED_DRIVER
from pytest_virtio.workloads.fio import FioResult

#: Every disk bus of the demo.  vhost-user-blk is served by pytest-virtio's own
#: in-process backend (Python, in this pytest process).
BUSES = ["ide", "ahci", "virtio-scsi", "virtio-blk", "vhost-user-blk"]
#: Paravirtual bus → the emulated bus it replaces.
#: Only the pair that held in every run on a loaded 2-core TCG host (1.38-1.56x);
#: virtio-scsi vs IDE ranged 0.4-1.6x there, so it is measured, not promised.
COUNTERPART = {"virtio-blk": "ide"}
#: How much faster the paravirtual bus must be (IOPS ratio).
FACTOR = 1.2
#: Throughput is timed, so it moves with the host's load: five rounds, alternated
#: with a guest on the reference bus, and a verdict that says "inconclusive"
#: when the spread of the rounds straddles the factor.
ROUNDS = 5
#: The strong claim is the mechanism, counted by QEMU and independent of load:
#: per 4k read IDE makes 26 register accesses (each a VM exit under KVM) and
#: AHCI ~5.6, a virtio queue at most one notify per batch (0.1-0.7 measured).
PARAVIRTUAL = ("virtio-blk", "virtio-scsi", "vhost-user-blk")
FEWER_TRAPS_THAN_IDE = {bus: "ide" for bus in PARAVIRTUAL}
FEWER_TRAPS_THAN_AHCI = {bus: "ahci" for bus in PARAVIRTUAL}
DISK = {"name": "disk0", "size": "256M"}


def assert_driver_bound(guest: Guest) -> None:
    """The bus's Linux driver must be loaded: otherwise fio measured something else."""
    bus = guest.spec.disks[0].bus
    expected = EXPECTED_DRIVER[bus]
    loaded = guest.lsmod()
    assert expected in loaded, f"{bus}: driver {expected} not loaded ({sorted(loaded)})"


@pytest.mark.vm(disks=[DISK])
@pytest.mark.virtio_matrix(disk=BUSES)
@pytest.mark.workload("fio", disk="disk0", rw="randread", bs="4k", iodepth=16, runtime="3s")
@pytest.mark.perf(min_iops={"kvm": 20_000, "tcg": 1_000}, faster_than=COUNTERPART, by=FACTOR,
                  rounds=ROUNDS)
@pytest.mark.perf(faster_than=FEWER_TRAPS_THAN_IDE, metric="traps_per_io", by=10)
@pytest.mark.perf(faster_than=FEWER_TRAPS_THAN_AHCI, metric="traps_per_io", by=3)
def test_random_read(guest: Guest, workload: FioResult) -> None:
    """4k random reads at queue depth 16: the small-block case databases live on."""
    assert_driver_bound(guest)
    assert workload.errors == 0
    assert workload.read.total_ios > 0


@pytest.mark.vm(disks=[DISK])
@pytest.mark.virtio_matrix(disk=BUSES)
@pytest.mark.workload("fio", disk="disk0", rw="write", bs="1M", iodepth=4, runtime="3s")
@pytest.mark.perf(min_bw={"kvm": "500M", "tcg": "20M"})
def test_sequential_write(guest: Guest, workload: FioResult) -> None:
    """1M sequential writes: streaming, judged by bandwidth (no relative promise:
    with large blocks the emulated buses keep up under TCG)."""
    assert_driver_bound(guest)
    assert workload.write.io_bytes > 0

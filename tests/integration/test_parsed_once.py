"""Values parsed once reach the guest: memory in MiB, a typed fio job, one shared machine.

Boots two small guests (one shared by two tests): run under the QEMU lock.
"""

from __future__ import annotations

import pytest

from pytest_virtio import Guest
from pytest_virtio.workloads.fio import FioResult

DISK = {"name": "disk0", "bus": "virtio-blk", "size": "64M"}
_shared_pids: dict[str, int] = {}


def _mem_total_kib(guest: Guest) -> int:
    return int(guest.check("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)


@pytest.mark.vm(memory="384M", disks=[DISK])
@pytest.mark.workload("fio", disk="disk0", rw="randread", bs="8k", iodepth=4, runtime="1s")
def test_marked_memory_and_fio_job_reach_the_guest(guest: Guest, workload: FioResult) -> None:
    assert guest.spec.memory == 384
    assert 300_000 < _mem_total_kib(guest) <= 384 * 1024
    [job] = workload.jobs
    assert (job.options["rw"], job.options["bs"], job.options["iodepth"]) == ("randread", "8k",
                                                                              "4")
    assert workload.iops > 0


@pytest.mark.vm(scope="module", memory="256M")
def test_shared_machine_spelled_in_mib(guest: Guest) -> None:
    _shared_pids.setdefault("pid", guest.machine.pid or 0)
    assert guest.machine.pid == _shared_pids["pid"]


@pytest.mark.vm(scope="module", memory="0.25G")
def test_shared_machine_spelled_in_gib_is_the_same_guest(guest: Guest) -> None:
    """Equal machines hash equal, so the module's pool hands out the guest booted above."""
    _shared_pids.setdefault("pid", guest.machine.pid or 0)
    assert guest.machine.pid == _shared_pids["pid"]
    assert 200_000 < _mem_total_kib(guest) <= 256 * 1024

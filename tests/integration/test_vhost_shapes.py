"""Device options users set on real vhost-user-blk disks, end to end (issue 16, item 3).

Two guests carry one in-process disk per shape: an smp=4 one the queue shapes
(queue size 128 and 1024, 1/2/4 queues), an smp=2 one logical block size 512
and 4096, EVENT_IDX off and INDIRECT_DESC off (with queue size 128, so a
request of seg_max segments fills the ring with direct descriptors).  Per
shape the test checks that the option reached both ends (what the backend
negotiated, what Linux's virtio_blk shows in sysfs) and that one short fio
verify, with 4 KiB and 256 KiB requests, reads back every block it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import Disk, MachineSpec
from pytest_virtio.vhost_user import VhostUserBlkServer
from pytest_virtio.vhost_user.protocol import TransportFeature

#: guest group -> (smp, {disk name: Disk options})
GUESTS: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {
    "queues": (4, {
        "qs128": {"queue_size": 128},
        "qs1024": {"queue_size": 1024},
        "q1": {"num_queues": 1},
        "q2": {"num_queues": 2},
        "q4": {"num_queues": 4},
    }),
    "features": (2, {
        "lbs512": {"logical_block_size": 512},
        "lbs4096": {"logical_block_size": 4096},
        "noevidx": {"event_idx": False},
        "noindir": {"indirect_desc": False, "queue_size": 128},
    }),
}
SHAPES = [(group, shape) for group, (_, disks) in GUESTS.items() for shape in disks]
MiB = 1 << 20


@pytest.fixture(scope="module")
def guests(boot_shared: Callable[[MachineSpec, str], Guest]) -> dict[str, Guest]:
    """One guest per group, booted on first use (a -k picking one group boots one)."""

    class Lazy(dict[str, Guest]):
        def __missing__(self, group: str) -> Guest:
            smp, disks = GUESTS[group]
            spec = MachineSpec(smp=smp, disks=tuple(
                Disk(name=n, size="16M", **opts) for n, opts in disks.items()))
            guest = self[group] = boot_shared(spec, f"shapes-{group}")
            return guest

    return Lazy()


def _sysfs(g: Guest, dev: str, path: str) -> str:
    return g.check(f"cat /sys/block/{dev.removeprefix('/dev/')}/{path}").stdout.strip()


@pytest.mark.parametrize(("group", "shape"), SHAPES, ids=[s for _, s in SHAPES])
def test_shape_works_end_to_end(guests: dict[str, Guest], group: str, shape: str) -> None:
    smp, disks = GUESTS[group]
    opts = disks[shape]
    g = guests[group]
    server: VhostUserBlkServer = g.backends[shape]
    dev = g.disk_path(shape)
    started = [vq for vq in server.queues if vq.started]
    nq = min(opts.get("num_queues", smp), smp)
    # queues: the device offers num_queues, Linux uses one per CPU at most
    assert len(started) == nq, [vq.index for vq in started]
    assert len(g.check(f"ls /sys/block/{dev.removeprefix('/dev/')}/mq").stdout.split()) == nq
    assert {vq.size for vq in started} == {opts.get("queue_size", 128)}  # QEMU's default: 128
    lbs = opts.get("logical_block_size", 512)
    assert int(_sysfs(g, dev, "queue/logical_block_size")) == lbs
    assert bool(server.features & TransportFeature.EVENT_IDX) == opts.get("event_idx", True)
    assert bool(server.features & TransportFeature.INDIRECT_DESC) == opts.get(
        "indirect_desc", True)

    before = server.stats.snapshot()
    # One job per CPU (so every queue's CPUs submit) writes its own 2 MiB, then
    # verifies it; a 256 KiB request takes up to 64 segments (all direct
    # descriptors when INDIRECT_DESC is off), 4 KiB ones fill the queue.
    res = g.fio(dev, rw="write", bs="4k", iodepth=16, size="2M", numjobs=smp,
                verify="crc32c",
                extra={"bssplit": "4k/50:256k/50", "offset_increment": "2M",
                       "cpus_allowed": f"0-{smp - 1}", "cpus_allowed_policy": "split"})
    assert res.errors == 0 and res.verify_ok is not False, res.to_dict()
    assert res.write.io_bytes == res.read.io_bytes == smp * 2 * MiB, res.to_dict()
    for vq in started:
        served = sum(server.stats.requests[vq.index]) - sum(before.requests[vq.index])
        assert served > 0, f"{shape}: queue {vq.index} carried no request"
    assert not server.broken_queues()
    server.check()

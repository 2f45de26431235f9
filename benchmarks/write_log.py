"""Write-log cost: backend CPU per write request with and without the log, no QEMU.

The mock driver (vhost_user/testing.py, as in benchmarks/vring.py) builds
``--batch`` virtio-blk OUT chains of 4 KiB or 64 KiB (indirect tables, as
Linux sends them), publishes a batch with one avail.idx update and lets the
backend drain it: walk each chain, write the data to a raw image file, status
byte, used element.  With the log (``LoggedStorage``) each write also reserves
log room, spills its data to ``data.bin`` and appends an index record.  Every
``--flush-every`` requests one FLUSH joins the batch (it is logged too).  The
figure is the draining thread's CPU time (``time.thread_time``) per request,
so host load does not move it much; the median of ``--rounds`` alternating
rounds is printed, and the ratio logged/plain.

    .venv/bin/python benchmarks/write_log.py [--dir /dev/shm] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

from pytest_virtio.vhost_user.blk import BlkDevice, FileStorage, Storage
from pytest_virtio.vhost_user.protocol import BlkType
from pytest_virtio.vhost_user.stats import Stats
from pytest_virtio.vhost_user.testing import MockMemory, MockSplitQueue
from pytest_virtio.vhost_user.virtqueue import Virtqueue
from pytest_virtio.vhost_user.writelog import LoggedStorage, WriteLog

U16 = struct.Struct("<H")
DISK = 64 << 20
QSIZE = 256


def _queue(mem: MockMemory, size: int, batch: int, flush_every: int) -> tuple[MockSplitQueue,
                                                                               list[int]]:
    """A ring and ``batch`` chains built once: OUT requests, a FLUSH every ``flush_every``."""
    q = MockSplitQueue(mem, QSIZE)
    payload = os.urandom(size)
    sectors = size // 512
    heads = []
    for i in range(batch):
        if flush_every and i % flush_every == flush_every - 1:
            heads.append(q.blk_request(BlkType.FLUSH, indirect=True).head)
        else:
            sector = (i * sectors) % (DISK // 512 - sectors)
            heads.append(q.blk_request(BlkType.OUT, sector, payload, indirect=True).head)
    return q, heads


def run(storage: Storage, size: int, requests: int, batch: int, flush_every: int) -> float:
    """Backend CPU µs per request for ``requests`` requests of ``size`` bytes."""
    mem = MockMemory(max(32 << 20, 2 * batch * size))
    q, heads = _queue(mem, size, batch, flush_every)
    gm = mem.guest_memory()
    stats = Stats(1)
    dev = BlkDevice(storage, stats=stats)
    vq = Virtqueue(0, QSIZE, stats)
    vq.set_num(QSIZE)
    vq.indirect = vq.event_idx = True
    vq.set_addr(q.vring_addr(), gm)
    vq.started = vq.enabled = True
    call = os.eventfd(0, os.EFD_NONBLOCK)
    vq.call_fd = call
    avail_off = mem.offset(q.avail_gpa)
    avail = memoryview(mem.mm)[avail_off : avail_off + 6 + 2 * QSIZE]
    idx = done = 0
    cpu = 0.0
    try:
        while done < requests:
            for h in heads:
                U16.pack_into(avail, 4 + 2 * (idx % QSIZE), h)
                idx = (idx + 1) & 0xFFFF
            U16.pack_into(avail, 2, idx)
            U16.pack_into(avail, 4 + 2 * QSIZE, (idx - 1) & 0xFFFF)
            t0 = time.thread_time()
            n = vq.drain(dev.handle)
            cpu += time.thread_time() - t0
            if n != len(heads) or vq.broken:
                raise SystemExit(f"drained {n} of {len(heads)} (broken: {vq.broken_reason})")
            done += n
            os.eventfd_read(call)
        if stats.status[0][0] != done:
            raise SystemExit("every request must complete OK")
    finally:
        avail.release()
        vq.detach()
        gm.close()
        os.close(call)
        mem.close()
    return cpu / done * 1e6


def _round(workdir: Path, logged: bool, size: int, requests: int, batch: int,
           flush_every: int) -> tuple[float, int]:
    """One measured round on a fresh image (and a fresh log): (µs/request, spilled bytes)."""
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK)
    storage: Storage = FileStorage(image)
    wlog = None
    if logged:
        wlog = WriteLog(workdir / "log", storage.size)
        storage = LoggedStorage(storage, wlog)
    try:
        us = run(storage, size, requests, batch, flush_every)
    finally:
        storage.close()
        if wlog is not None:
            wlog.close()
    spilled = wlog.spilled if wlog is not None else 0
    shutil.rmtree(workdir / "log", ignore_errors=True)
    image.unlink()
    return us, spilled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the image and the log go (default /dev/shm)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--flush-every", type=int, default=32,
                    help="one FLUSH per this many requests (0: none)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wlbench", dir=args.dir))
    print(f"image and log in {workdir.parent} ({'tmpfs' if 'shm' in str(workdir) else 'disk'}); "
          f"batch {args.batch}, a FLUSH every {args.flush_every}; backend thread CPU per request, "
          f"median of {args.rounds} rounds")
    try:
        for size, requests in ((4096, 16384), (65536, 2048)):
            plain, logged = [], []
            spilled = 0
            for _ in range(args.rounds):
                plain.append(_round(workdir, False, size, requests, args.batch,
                                    args.flush_every)[0])
                us, spilled = _round(workdir, True, size, requests, args.batch,
                                     args.flush_every)
                logged.append(us)
            p, lg = statistics.median(plain), statistics.median(logged)
            print(f"{size >> 10:>3} KiB writes: plain {p:6.2f} us/request, logged {lg:6.2f} "
                  f"us/request (+{lg - p:5.2f} us, x{lg / p:4.2f}); {requests} requests, "
                  f"{spilled >> 20} MiB spilled per round")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

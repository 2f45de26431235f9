#!/usr/bin/env python3
"""Where a boot's time goes: firmware and loader, kernel, initramfs, init.

Each boot of the default shape is timed from fixture request to the shell's
first answer (wall, host clock) and split with the guest's own clocks: the
kernel's printk timestamps (``dmesg``, kept whatever the console loglevel) and
the uptime pvinit prints in its ready line.  The phases:

- before the kernel: wall minus the guest's uptime at ready (QEMU start,
  firmware, loading the kernel, the host's socket handshakes);
- kernel init: printk time 0 to "Freeing unused kernel image" (then /init runs);
- initramfs: to the root's ext4 mount (modules loaded, root found);
- init: from the root mount to pvinit's ready line.

The peer, measured in the same run and interleaved so host load drifts hit
both alike, is the same shape on qboot (``-bios qboot.rom``, the minimal
firmware Debian's qemu-system-data ships) instead of SeaBIOS: the firmware cut
not taken by default (see docs/boot-time.md).  ``--extra`` (QEMU arguments)
and ``--kernel-args`` try other cuts on the measured shape.  Medians of ``-n``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from _to_shell import to_shell

from pytest_virtio import spec
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings

_STAMP = r"\[\s*([0-9.]+)\][^\n]*"


@dataclass(frozen=True)
class Phases:
    wall: float
    ready_uptime: float
    kernel: float
    root_mounted: float

    @property
    def before_kernel(self) -> float:
        return self.wall - self.ready_uptime

    @property
    def initramfs(self) -> float:
        return self.root_mounted - self.kernel

    @property
    def init(self) -> float:
        return self.ready_uptime - self.root_mounted


def _stamp(dmesg: str, what: str) -> float:
    match = re.search(_STAMP + what, dmesg)
    if match is None:
        raise SystemExit(f"no {what!r} in the guest's dmesg")
    return float(match.group(1))


def _phases(guest: Guest, wall: float) -> Phases:
    dmesg = guest.check("dmesg").stdout
    assert guest.boot_uptime is not None
    return Phases(wall, guest.boot_uptime, _stamp(dmesg, "Freeing unused kernel image"),
                  _stamp(dmesg, r"EXT4-fs \(vda\): mounted"))


def one(session: VirtioSession, shape: spec.MachineSpec) -> Phases:
    return to_shell(session, shape, _phases)


def _row(name: str, runs: list[Phases]) -> str:
    def med(of: Callable[[Phases], float]) -> float:
        return statistics.median(of(p) for p in runs)
    return (f"{name:<8} wall {med(lambda p: p.wall):5.2f} s = before kernel "
            f"{med(lambda p: p.before_kernel):4.2f} + kernel {med(lambda p: p.kernel):4.2f}"
            f" + initramfs {med(lambda p: p.initramfs):4.2f} + init {med(lambda p: p.init):4.2f}"
            f"   (n={len(runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7)
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--extra", default="", help="QEMU arguments for the tried shape")
    parser.add_argument("--kernel-args", default="", help="kernel arguments for the tried shape")
    parser.add_argument("--peer-bios", default="/usr/share/qemu/qboot.rom")
    args = parser.parse_args()
    ours = spec.MachineSpec(extra_args=tuple(args.extra.split()),
                            kernel_args=tuple(args.kernel_args.split()))
    with VirtioSession(Settings.from_values({"accel": args.accel})) as session:
        choice = session.accel()
        print(f"accel: {choice.accel} ({choice.note})")
        one(session, ours)  # warm the page cache and the initramfs
        mine, peer = [], []
        for _ in range(args.n):
            mine.append(one(session, ours))
            peer.append(one(session, dataclasses.replace(
                ours, extra_args=(*ours.extra_args, "-bios", args.peer_bios))))
    print(_row("shape", mine))
    print(_row("qboot", peer))
    ratio = statistics.median(p.wall for p in mine) / statistics.median(p.wall for p in peer)
    print(f"ratio SeaBIOS/qboot wall: {ratio:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Boot time: fixture request → shell ready, median of N, under the accel in use.

Measures what a test waits for when it asks for `guest`: QEMU launch, kernel
boot, our initramfs, pvinit, until a first command answers.  The peer is the
same guest under QEMU's slower path (IDE root disk instead of virtio-blk),
measured in the same run, so the ratio shows what the virtio root disk buys.
Target under TCG on the project's machines: <= 3.5 s.
"""

from __future__ import annotations

import argparse
import statistics

from _to_shell import to_shell, wall

from pytest_virtio import spec
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings


def measure(session: VirtioSession, machine: spec.MachineSpec, n: int) -> list[float]:
    return [to_shell(session, machine, wall) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7)
    parser.add_argument("--accel", default="auto")
    args = parser.parse_args()
    with VirtioSession(Settings.from_values({"accel": args.accel})) as session:
        choice = session.accel()
        session.image()
        measure(session, spec.MachineSpec(), 1)  # warm the page cache and initramfs
        virtio = measure(session, spec.MachineSpec(), args.n)
        ide = measure(session, spec.MachineSpec(root_bus="ide"), args.n)
    med_v, med_i = statistics.median(virtio), statistics.median(ide)
    print(f"accel: {choice.accel} ({choice.note})")
    print(f"boot to shell, virtio-blk root: median {med_v:.2f} s "
          f"(min {min(virtio):.2f}, max {max(virtio):.2f}, n={args.n})")
    print(f"boot to shell, IDE root (peer):  median {med_i:.2f} s "
          f"(min {min(ide):.2f}, max {max(ide):.2f}, n={args.n})")
    print(f"ratio virtio/IDE: {med_v / med_i:.2f}")
    target = 3.5 if choice.accel == "tcg" else 1.5
    print(f"target ({choice.accel}): <= {target} s -> {'met' if med_v <= target else 'MISSED'}")


if __name__ == "__main__":
    main()

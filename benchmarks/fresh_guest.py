#!/usr/bin/env python3
"""A fresh guest: boot vs snapshot restore, per guest and for a whole test file.

Part 1, fixture request → shell answering, for one machine shape, median of N
each, boots and restores interleaved so host load drifts hit both alike: a
boot (``--virtio-snapshot=off``) against a restore from that shape's template
(``--virtio-snapshot``).  Besides wall time it prints QEMU's own CPU seconds up
to the first answer, which do not depend on how loaded the host is.

Part 2, a generated test file of ``--tests`` tests (default 40), each asking
for ``guest`` and running a command, run by pytest three ways: a boot per test,
a restore per test, and one guest shared by the module (``vm(scope="module")``).

Targets under TCG on 2 cores: restore <= 0.5 s and >= 6x faster than a boot;
the file >= 4x faster with restores than with boots.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _to_shell import to_shell

from pytest_virtio import spec
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclasses.dataclass
class Sample:
    wall: float
    cpu: float
    rss: float


def _sample(guest: Guest, wall: float) -> Sample:
    pid = guest.machine.pid
    assert pid is not None
    return Sample(wall, _cpu_seconds(pid), _rss_mib(pid))


def one(session: VirtioSession, shape: spec.MachineSpec) -> Sample:
    return to_shell(session, shape, _sample)


def _line(name: str, samples: list[Sample]) -> str:
    walls = [s.wall for s in samples]
    return (f"{name}: median {statistics.median(walls):.2f} s (min {min(walls):.2f}, "
            f"max {max(walls):.2f}, n={len(walls)}); QEMU CPU to shell median "
            f"{statistics.median(s.cpu for s in samples):.2f} s; QEMU RSS median "
            f"{statistics.median(s.rss for s in samples):.0f} MiB")


def per_guest(accel: str, n: int) -> tuple[float, float]:
    shape = spec.MachineSpec()
    boot_s = Settings.from_values({"accel": accel})
    snap_s = dataclasses.replace(boot_s, snapshot=True)
    with VirtioSession(boot_s) as booting, VirtioSession(snap_s, print) as restoring:
        choice = booting.accel()
        print(f"accel: {choice.accel} ({choice.note}); host load {os.getloadavg()[0]:.1f}")
        one(booting, shape)  # warm the page cache and the initramfs
        start = time.monotonic()
        one(restoring, shape)  # makes the template
        first = time.monotonic() - start
        boots, restores = [], []
        for _ in range(n):
            boots.append(one(booting, shape))
            restores.append(one(restoring, shape))
        template = restoring.templates.templates[0]
        print(f"template: first guest of the shape {first:.2f} s (boot "
              f"{template.boot_seconds:.2f} s + save {template.save_seconds:.2f} s; that guest "
              "then runs on for its test); "
              f"state {template.state.stat().st_size / 2**20:.0f} MiB, root overlay "
              f"{template.overlay.stat().st_blocks * 512 / 2**20:.1f} MiB on disk")
    print(_line("boot to shell   ", boots))
    print(_line("restore to shell", restores))
    med_b = statistics.median(s.wall for s in boots)
    med_r = statistics.median(s.wall for s in restores)
    cpu_b = statistics.median(s.cpu for s in boots)
    cpu_r = statistics.median(s.cpu for s in restores)
    print(f"ratio boot/restore: wall {med_b / med_r:.1f}x, QEMU CPU {cpu_b / cpu_r:.1f}x")
    return med_b, med_r


TEST_FILE = """
import pytest
{mark}

@pytest.mark.parametrize("i", range({n}))
def test_guest(guest, i):
    assert guest.check(f"echo {{i}}").stdout == f"{{i}}\\n"
"""


def file_run(n: int, accel: str, mode: str) -> float:
    mark = 'pytestmark = pytest.mark.vm(scope="module")' if mode == "shared" else ""
    with tempfile.TemporaryDirectory(prefix="pvbench") as tmp:
        path = Path(tmp) / "test_forty.py"
        path.write_text(TEST_FILE.format(mark=mark, n=n))
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path),
                f"--virtio-accel={accel}", "-p", "no:randomly",
                f"--virtio-snapshot={'on' if mode == 'restore' else 'off'}"]
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp)
        took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{textwrap.indent(proc.stdout[-3000:], '  ')}")
    print(f"{n}-test file, {mode:>7}: {took:6.1f} s  (load {os.getloadavg()[0]:.1f})")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="guests of each kind (median)")
    parser.add_argument("--tests", type=int, default=40, help="tests in the generated file")
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--skip-file", action="store_true", help="only part 1")
    args = parser.parse_args()
    med_b, med_r = per_guest(args.accel, args.n)
    target = med_r <= 0.5 and med_b / med_r >= 6
    print(f"target per guest (restore <= 0.5 s, >= 6x): {'met' if target else 'MISSED'}")
    if args.skip_file:
        return
    boot = file_run(args.tests, args.accel, "boot")
    restore = file_run(args.tests, args.accel, "restore")
    shared = file_run(args.tests, args.accel, "shared")
    print(f"file ratio boot/restore {boot / restore:.1f}x, boot/shared {boot / shared:.1f}x")
    print(f"target file (>= 4x with restores): {'met' if boot / restore >= 4 else 'MISSED'}")


if __name__ == "__main__":
    main()

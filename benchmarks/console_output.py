#!/usr/bin/env python3
"""Command output through the console channel: throughput by size, and time per ``true``.

One default guest (TCG here).  For each size, a file of that many bytes is made
in the guest (not timed), then ``cat`` of it is timed through the console and,
as the peer in the same run, through SSH (paramiko, the guest's dropbear): the
figure is MB/s of command output reaching the test, and the bytes are checked
(length and SHA-256) so a fast wrong answer cannot pass.  Then the median of
``true`` round trips on each channel.

Target (issue 23): >= 1 MB/s of command output under TCG, linear in size.
A size is skipped once the previous one took longer than ``--cap`` seconds
(the old, quadratic reader needed 114 s for 1 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

from pytest_virtio import spec
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings

SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)


def _output(result: object) -> bytes:
    exact = getattr(result, "stdout_bytes", None)
    if isinstance(exact, bytes):
        return exact
    return str(getattr(result, "stdout", "")).encode()  # the old Result: text only


def _throughput(guest: Guest, via: str, size: int, digest: str) -> float:
    start = time.monotonic()
    result = guest.run("cat /tmp/bench.out", timeout=600, via=via)
    seconds = time.monotonic() - start
    got = _output(result)
    if len(got) != size or hashlib.sha256(got).hexdigest() != digest:
        raise SystemExit(f"{via}: wrong output for {size} bytes: got {len(got)} bytes")
    return seconds


def _make_file(guest: Guest, size: int) -> str:
    # Printable, with newlines, so the old text-only reader can be measured too.
    guest.check(f"yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | "
                f"head -c {size} > /tmp/bench.out", timeout=300)
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
    data = (line * (size // len(line) + 1))[:size]
    return hashlib.sha256(data).hexdigest()


def _round_trips(guest: Guest, via: str, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.monotonic()
        guest.check("true", via=via)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=60.0,
                        help="skip larger sizes once one took longer (s)")
    parser.add_argument("-n", type=int, default=30, help="true round trips (median)")
    parser.add_argument("--no-ssh", action="store_true", help="console only")
    args = parser.parse_args()
    settings = Settings.from_values({"accel": "auto"})
    shape = spec.MachineSpec(nics=() if args.no_ssh else (spec.Nic(),))
    with VirtioSession(settings) as session:
        print(f"accel: {session.accel().accel}; host load {os.getloadavg()[0]:.1f}")
        guest = session.boot(shape)
        try:
            vias = ["console"] if args.no_ssh else ["console", "ssh"]
            print(f"{'bytes':>10} " + " ".join(f"{v + ' s':>10} {v + ' MB/s':>13}" for v in vias))
            skip = {v: False for v in vias}
            for size in SIZES:
                digest = _make_file(guest, size)
                cells = []
                for via in vias:
                    if skip[via]:
                        cells.append(f"{'skipped':>10} {'':>13}")
                        continue
                    seconds = _throughput(guest, via, size, digest)
                    skip[via] = seconds > args.cap
                    cells.append(f"{seconds:10.2f} {size / seconds / 1e6:13.2f}")
                print(f"{size:>10} " + " ".join(cells), flush=True)
            trips = {v: _round_trips(guest, v, args.n) for v in vias}
            print("true: " + ", ".join(f"{v} {t * 1000:.1f} ms" for v, t in trips.items()))
            if "ssh" in trips:
                print(f"console/ssh time per true: {trips['console'] / trips['ssh']:.2f}x")
        finally:
            guest.close()


if __name__ == "__main__":
    main()

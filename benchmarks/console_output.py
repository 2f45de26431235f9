#!/usr/bin/env python3
"""Command output through the console channel: throughput by size, and time per ``true``.

Two default guests (TCG here), one per command-channel transport: ``serial``
(ttyS1, the default) and ``virtio-console`` (hvc0).  For each size, a file of
that many bytes is made in each guest (not timed), then ``cat`` of it is timed
through each console and, as the peer in the same run, through SSH (paramiko,
the first guest's dropbear): the figure is MB/s of command output reaching the
test, and the bytes are checked (length and SHA-256) so a fast wrong answer
cannot pass.  Then the median of ``true`` round trips on each channel.

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

from pytest_virtio import Guest, VirtioSession, spec
from pytest_virtio.guests.settings import Settings

SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)


def _output(result: object) -> bytes:
    exact = getattr(result, "stdout_bytes", None)
    if isinstance(exact, bytes):
        return exact
    return str(getattr(result, "stdout", "")).encode()  # the old Result: text only


#: (column, the guest's command_channel, Guest.run's via)
CHANNELS = (("serial", "serial", "console"), ("virtio-console", "virtio-console", "console"),
            ("ssh", "serial", "ssh"))


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
    columns = [c for c in CHANNELS if not (args.no_ssh and c[2] == "ssh")]
    with VirtioSession(settings) as session:
        print(f"accel: {session.accel().accel}; host load {os.getloadavg()[0]:.1f}")
        guests = {}
        try:
            for transport in dict.fromkeys(c[1] for c in columns):
                nics = () if args.no_ssh or transport != "serial" else (spec.Nic(),)
                guests[transport] = session.boot(
                    spec.MachineSpec(nics=nics, command_channel=transport), transport)
            print(f"{'bytes':>10} " + " ".join(f"{c[0] + ' s':>18} {c[0] + ' MB/s':>20}"
                                                for c in columns))
            skip = {c[0]: False for c in columns}
            for size in SIZES:
                digests = {t: _make_file(g, size) for t, g in guests.items()}
                cells = []
                for name, transport, via in columns:
                    if skip[name]:
                        cells.append(f"{'skipped':>18} {'':>20}")
                        continue
                    seconds = _throughput(guests[transport], via, size, digests[transport])
                    skip[name] = seconds > args.cap
                    cells.append(f"{seconds:18.2f} {size / seconds / 1e6:20.2f}")
                print(f"{size:>10} " + " ".join(cells), flush=True)
            trips = {name: _round_trips(guests[t], via, args.n) for name, t, via in columns}
            print("true: " + ", ".join(f"{n} {t * 1000:.1f} ms" for n, t in trips.items()))
            if "ssh" in trips:
                print("time per true vs ssh: " + ", ".join(
                    f"{n} {trips[n] / trips['ssh']:.2f}x" for n in trips if n != "ssh"))
        finally:
            for guest in guests.values():
                guest.close()

if __name__ == "__main__":
    main()

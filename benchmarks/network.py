#!/usr/bin/env python3
"""Network bandwidth per NIC model and backend: iperf3 both ways, one run.

For e1000, rtl8139 and virtio-net, each over QEMU's user-mode network (slirp),
over passt (``Nic(backend="passt")``) and over a tap in a network namespace of its
own (``Nic(backend="tap")``, root only: left out otherwise, said so): one guest per
pair, iperf3 guest→host (the NIC's transmit path) then host→guest (its receive
path) against the NIC's host-side server (loopback, or in the tap's namespace),
``-r`` rounds each, medians in Mbit/s.  The peer is e1000 on the same backend in the
same run: the virtio-net/e1000 ratio per backend says whether the backend lets the
NIC model show (slirp caps every model at its own speed).

    flock /tmp/pv-qemu.lock .venv/bin/python benchmarks/network.py
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
from collections.abc import Sequence

from pytest_virtio import spec
from pytest_virtio.errors import WorkloadError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.netcheck import guest_iperf3
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings

MODELS = ("e1000", "rtl8139", "virtio-net")
#: (backend, model, guest→host Mbit/s, host→guest Mbit/s); NaN: iperf3 failed.
Row = tuple[str, str, float, float]
FAILED = math.nan
log = logging.getLogger("benchmarks.network")


def median_mbit(guest: Guest, seconds: float, rounds: int, reverse: bool) -> float:
    """Median Mbit/s of ``rounds`` iperf3 runs; NaN (and the reason logged) if one fails."""
    try:
        runs = [guest_iperf3(guest, seconds=seconds, reverse=reverse).bits_per_second / 1e6
                for _ in range(rounds)]
    except WorkloadError as exc:
        log.warning("%s, reverse=%s: %s", guest.name, reverse, exc)
        print(f"  {guest.name} {'host→guest' if reverse else 'guest→host'} failed: {exc}")
        return FAILED
    return statistics.median(runs)


def measure(session: VirtioSession, model: str, backend: str, seconds: float,
            rounds: int) -> Row:
    """Median Mbit/s (guest→host, host→guest) of one guest with one NIC."""
    machine = spec.MachineSpec(nics=(spec.Nic(model=model, backend=backend),))
    with session.boot(machine, f"{backend}-{model}") as guest:
        tx = median_mbit(guest, seconds, rounds, reverse=False)
        rx = median_mbit(guest, seconds, rounds, reverse=True)
    session.guests.remove(guest)
    return backend, model, tx, rx


def table(rows: Sequence[Row]) -> list[str]:
    lines = [f"{'backend':8} {'model':11} {'guest→host':>11} {'host→guest':>11}  (Mbit/s)"]
    lines += [f"{b:8} {m:11} {tx:11.0f} {rx:11.0f}" for b, m, tx, rx in rows]
    for backend in dict.fromkeys(b for b, *_ in rows):
        got = {m: (tx, rx) for b, m, tx, rx in rows if b == backend}
        if "virtio-net" in got and "e1000" in got:
            (vt, vr), (et, er) = got["virtio-net"], got["e1000"]
            lines.append(f"{backend}: virtio-net/e1000 guest→host {vt / et:.2f}x, "
                         f"host→guest {vr / er:.2f}x")
    return lines


def columns(rows: Sequence[Row]) -> list[str]:
    """One line per model, a guest→host/host→guest column per backend (Mbit/s)."""
    backends = list(dict.fromkeys(b for b, *_ in rows))
    got = {(b, m): (tx, rx) for b, m, tx, rx in rows}
    lines = [f"{'model':11} " + " ".join(f"{b + ' tx/rx':<15}" for b in backends)]
    for model in dict.fromkeys(m for _, m, *_ in rows):
        cells = [got.get((b, model), (FAILED, FAILED)) for b in backends]
        lines.append(f"{model:11} " + " ".join(f"{tx:7.0f}/{rx:<7.0f}" for tx, rx in cells))
    return lines


def usable(backends: Sequence[str]) -> list[str]:
    """The backends this host can run: tap needs root (and says so when left out)."""
    if "tap" in backends and os.geteuid() != 0:
        print("tap left out: it needs root (a network namespace and a tap device)")
        return [b for b in backends if b != "tap"]
    return list(backends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--seconds", type=float, default=3.0)
    parser.add_argument("-r", "--rounds", type=int, default=1)
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--backends", default=",".join(spec.NET_BACKENDS))
    args = parser.parse_args()
    rows = []
    with VirtioSession(Settings.from_values({"accel": args.accel})) as session:
        choice = session.accel()
        for backend in usable(args.backends.split(",")):
            for model in MODELS:
                rows.append(measure(session, model, backend, args.seconds, args.rounds))
                print(*table(rows[-1:])[1:], flush=True)
    print(f"accel: {choice.accel} ({choice.note}); iperf3 {args.seconds:g} s, "
          f"median of {args.rounds}")
    print("\n".join(table(rows)))
    print("\n".join(columns(rows)))


if __name__ == "__main__":
    main()

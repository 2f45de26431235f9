"""Guests on a tap in a network namespace of their own (``Nic(backend="tap")``, root):
QEMU in the host's namespace with the tap's fd, SSH made inside the namespace, the
guest's address as on user-mode networking, the token and the iperf3 workload both
ways against peers in the namespace, nothing new listening on any host address but
loopback meanwhile, and the namespace gone with its guest, and with a SIGKILLed
pytest.  One boot per NIC model plus one for the kill (about 20 s each under TCG)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.measure import WorkloadSpec, run_workload
from pytest_virtio.guests.netcheck import fetch_token
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.tap import Netns, Tap, netns_holders
from pytest_virtio.spec import MachineSpec, Nic

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(),
                                reason="a tap needs root and /dev/net/tun")

SECONDS = 2
_LOOPBACK = ("127.", "[::1]", "::1")


def _listeners(enter: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()) -> set[str]:
    """Local addresses of every listening TCP and UDP socket (``ss -ltnuH``)."""
    out = subprocess.run([*enter, "ss", "-ltnuH"], capture_output=True, text=True, check=True,
                         pass_fds=pass_fds).stdout
    return {line.split()[4] for line in out.splitlines() if line.strip()}


def _exposed(addresses: set[str]) -> set[str]:
    return {a for a in addresses if not a.startswith(_LOOPBACK)}


@contextmanager
def _watching(netns: Netns) -> Iterator[tuple[set[str], set[str]]]:
    """Collect, while the block runs, what listened on the host and in the namespace."""
    host: set[str] = set()
    inside: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            host.update(_listeners())
            inside.update(_listeners(netns.enter_argv(), (netns.fd,)))
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield host, inside
    finally:
        stop.set()
        thread.join()


def _iperf3(guest: Guest, reverse: bool) -> float:
    spec = WorkloadSpec.from_marker(("iperf3",), {"nic": "net0", "seconds": SECONDS,
                                                  "reverse": reverse})
    measured = run_workload(guest, spec)
    assert measured.result.bytes > 0, measured
    return float(measured.extra["bits_per_second"]) / 1e6


@pytest.mark.parametrize("model", ["virtio-net", "e1000"])
def test_a_guest_on_tap(virtio_session: VirtioSession, model: str) -> None:
    exposed_before = _exposed(_listeners())
    guest = virtio_session.boot(MachineSpec(nics=(Nic(model=model, backend="tap"),)),
                                f"tap-{model}")
    try:
        tap = guest.nets["net0"]
        assert isinstance(tap, Tap)
        netns, qemu = tap.netns, guest.machine.pid
        assert qemu is not None
        # QEMU holds the tap's fd and stays in the host's namespace.
        assert "type=tap" in guest.machine.hmp("info network")
        assert os.readlink(f"/proc/{qemu}/ns/net") == os.readlink("/proc/self/ns/net")
        assert f"net:[{netns.inode}]" != os.readlink("/proc/self/ns/net")
        # SSH is a connection made inside the namespace: no port forwarded anywhere.
        assert guest.ssh_session().dial is not None
        assert guest.check("echo over-tap", via="ssh").stdout.strip() == "over-tap"
        addr = guest.check("ip -4 -o addr show scope global; ip route", via="ssh").stdout
        assert "inet 10.0.2.15/24" in addr and "default via 10.0.2.2" in addr, addr

        with _watching(netns) as (host, inside):
            fetch_token(guest)
            tx, rx = _iperf3(guest, reverse=False), _iperf3(guest, reverse=True)
        print(f"tap {model}: {tx:.0f} Mbit/s guest→host, {rx:.0f} Mbit/s host→guest")
        assert _exposed(host) - exposed_before == set(), "a peer listened on the host"
        # The peers (token server, iperf3 -s) listened on the gateway in the namespace.
        assert sum(a.startswith("10.0.2.2:") for a in inside) >= 2, inside
    finally:
        guest.close()
        virtio_session.guests.remove(guest)
    assert procs.wait_gone([qemu], 5.0) == []
    assert _wait_no_holders(netns.inode) == [], "the namespace outlived its guest"


def _wait_no_holders(inode: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (held := netns_holders(inode)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


#: A pytest stand-in that boots a tap guest, says what it holds, and waits to be killed.
BOOTED = textwrap.dedent("""
    import time
    from pytest_virtio.guests.session import VirtioSession
    from pytest_virtio.guests.settings import Settings
    from pytest_virtio.spec import MachineSpec, Nic
    session = VirtioSession(Settings.from_values({"accel": "tcg"}))
    guest = session.boot(MachineSpec(nics=(Nic(backend="tap"),)), "killed")
    print(guest.nets["net0"].netns.inode, guest.machine.pid, flush=True)
    time.sleep(600)
""")


def test_the_namespace_and_qemu_die_with_a_killed_pytest() -> None:
    """kill -9 runs no teardown: QEMU goes by its death signal, and the namespace with
    the last descriptor and process that held it."""
    run = tempfile.mkdtemp(prefix="pvtap", dir="/tmp")  # short: socket paths live here
    holder = subprocess.Popen([sys.executable, "-c", BOOTED], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[2],
                              env={**os.environ, "TMPDIR": run})
    assert holder.stdout is not None
    try:
        inode, qemu = (int(word) for word in holder.stdout.readline().split())
        assert [h for h in netns_holders(inode) if h.startswith(f"{holder.pid}/fd/")]
        assert procs.running(qemu)
    finally:
        holder.kill()
        holder.wait()
    try:
        assert procs.wait_gone([qemu], 10.0) == [], "QEMU outlived the killed pytest"
        assert _wait_no_holders(inode) == [], "the namespace outlived the killed pytest"
    finally:
        shutil.rmtree(run, ignore_errors=True)

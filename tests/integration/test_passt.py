"""A guest on passt (``Nic(backend="passt")``): SSH through passt's forward, the
guest's address as on user-mode networking, the host's loopback services (token,
iperf3 both ways) through the gateway, nothing listening beyond 127.0.0.1, and
passt gone with its guest.  One boot under TCG (about 20 s)."""

from __future__ import annotations

from pytest_virtio import procs
from pytest_virtio.guests.netcheck import fetch_token, iperf3_both_ways
from pytest_virtio.guests.passt import Passt, listeners
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.spec import MachineSpec, Nic

SECONDS = 2.0


def test_a_guest_on_passt(virtio_session: VirtioSession) -> None:
    spec = MachineSpec(nics=(Nic(model="virtio-net", backend="passt"),))
    guest = virtio_session.boot(spec, "passt")
    try:
        passt = guest.nets["net0"]
        assert isinstance(passt, Passt)
        assert procs.running(passt.proc.pid)
        # QEMU's netdev is the stream to passt: no slirp, no listener of QEMU's own.
        assert "stream" in guest.machine.hmp("info network")
        assert guest.machine.pid is not None and listeners(guest.machine.pid) == []
        # passt listens on its SSH port on loopback and on nothing else.
        assert listeners(passt.proc.pid) == [("tcp", "127.0.0.1", passt.ssh_port)]
        assert guest.ssh_session().port == passt.ssh_port
        assert guest.check("echo over-passt", via="ssh").stdout.strip() == "over-passt"

        addr = guest.check("ip -4 -o addr show scope global; ip route", via="ssh").stdout
        assert "inet 10.0.2.15/24" in addr and "default via 10.0.2.2" in addr, addr

        # 10.0.2.2 in the guest is the host's 127.0.0.1.  The guest closes its side
        # only after the server's close has arrived: this passt (Debian 2023-03-09)
        # can lose the host's FIN when the guest's crosses it, leaving nc in FIN_WAIT2.
        fetch_token(guest, hold=2)
        tx, rx = iperf3_both_ways(guest, seconds=SECONDS)
        print(f"passt virtio-net: {tx.bits_per_second / 1e6:.0f} Mbit/s guest→host, "
              f"{rx.bits_per_second / 1e6:.0f} Mbit/s host→guest")
    finally:
        guest.close()
        virtio_session.guests.remove(guest)
    assert procs.wait_gone([passt.proc.pid], 5.0) == [], "passt outlived its guest"
    assert not passt.socket.exists()
    assert passt.log.exists() and "10.0.2.15" in passt.log.read_text()

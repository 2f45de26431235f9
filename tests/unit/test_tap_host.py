"""The tap network backend's host side, with real namespaces, taps, ip, nsenter and
iperf3 (no QEMU): the tap in a namespace of its own addressed as the guest's
gateway, the peers (iperf3, token, SSH's connection) inside it and nowhere on the
host, the namespace gone with the NIC and with a SIGKILLed pytest, the errors
without root or /dev/net/tun, all-or-none starts, and reproduce.sh remaking it."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.errors import ConfigError, MissingToolError
from pytest_virtio.guests import nethost, reproduce, snapshot
from pytest_virtio.guests import tap as tap_mod
from pytest_virtio.guests.netcheck import token_server
from pytest_virtio.guests.tap import Tap, netns_holders, start_tap
from pytest_virtio.interrupts import descendants
from pytest_virtio.spec import LaunchContext, MachineSpec, Nic, to_argv
from pytest_virtio.workloads.iperf import parse_iperf3_json
from pytest_virtio.workloads.iperf_server import host_iperf3_server, listening

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(),
                                reason="a tap needs root and /dev/net/tun")
_TUNGETIFF = 0x800454D2


def _ctx(run_dir: str = "/run/pv/g0", qemu: str = "qemu-system-x86_64") -> LaunchContext:
    return LaunchContext(qemu_binary=qemu, accel="tcg", kernel="/i/vmlinuz", initrd="/i/initrd",
                         root_image="/i/root.img", qmp_socket=f"{run_dir}/qmp.sock",
                         console_socket=f"{run_dir}/con.sock",
                         console_log=f"{run_dir}/console.log", net_fds={"net0": 10})


@pytest.fixture
def tap(tmp_path: Path) -> Iterator[Tap]:
    made = start_tap(Nic(backend="tap"), tmp_path)
    yield made
    made.close()


def _in_ns(tap: Tap, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tap.netns.enter_argv(), *argv], pass_fds=(tap.netns.fd,),
                          capture_output=True, text=True, timeout=60, check=True)


@needs_root
def test_the_tap_is_in_a_namespace_of_its_own_as_the_guests_gateway(tap: Tap) -> None:
    assert tap.netns.inode != os.stat("/proc/self/ns/net").st_ino
    addr = _in_ns(tap, "ip", "-o", "-4", "addr", "show").stdout.splitlines()
    assert [line.split()[1:4] for line in addr] == [["lo", "inet", "127.0.0.1/8"],
                                                    ["pvtap0", "inet", "10.0.2.2/24"]], addr
    links = _in_ns(tap, "ip", "-o", "link", "show", "pvtap0").stdout
    assert ",UP" in links and "LOWER_UP" in links, links  # our fd is its carrier
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "pvtap0" not in host_links
    # QEMU probes the fd for virtio-net headers (offloads for virtio-net).
    ifr = fcntl.ioctl(tap.fd, _TUNGETIFF, bytes(struct.calcsize("16sH")))
    name, flags = struct.unpack("16sH", ifr[:struct.calcsize("16sH")])
    assert name.rstrip(b"\0") == b"pvtap0" and flags & 0x4000 and flags & 0x0002
    assert tap.net_fd == tap.fd and tap.net_socket is None


@needs_root
def test_iperf3_and_token_servers_listen_in_the_namespace_only(tap: Tap) -> None:
    place = tap.server_place()
    assert place.address == "10.0.2.2"
    with host_iperf3_server(place) as port:
        assert not listening("10.0.2.2", port)  # not in the host's table
        assert not listening("127.0.0.1", port)
        out = _in_ns(tap, "iperf3", "-c", "10.0.2.2", "-p", str(port), "-t", "1", "-J").stdout
    assert parse_iperf3_json(out).bytes > 0

    with token_server(tap.listener()) as server:
        assert not listening("10.0.2.2", server.port)
        conn = tap.netns.run(lambda: socket.create_connection(("10.0.2.2", server.port), 5))
        with conn:
            assert conn.recv(64).decode().strip() == server.token


@needs_root
def test_ssh_connections_are_made_inside_the_namespace(tap: Tap) -> None:
    """A stand-in for the guest's SSH server at 10.0.2.15:22 inside the namespace:
    the endpoint's dial reaches it; from the host nothing listens there."""
    _in_ns(tap, "ip", "addr", "add", "10.0.2.15/32", "dev", "lo")
    def serve() -> socket.socket:
        s = socket.create_server(("10.0.2.15", 22))
        return s
    server = tap.netns.run(serve)
    with server:
        endpoint = tap.ssh_endpoint(None, Nic(backend="tap"))  # type: ignore[arg-type]
        assert endpoint.port == 22 and endpoint.dial is not None
        assert "namespace" in (endpoint.where or "")
        with endpoint.dial(5.0) as conn:
            peer, _ = server.accept()
            with peer:
                assert peer.getpeername()[0] == "10.0.2.15"
                assert conn.getpeername() == ("10.0.2.15", 22)


@needs_root
def test_the_namespace_goes_with_the_nic_once_its_processes_are_gone(tmp_path: Path) -> None:
    tap = start_tap(Nic(backend="tap"), tmp_path)
    inode = tap.netns.inode
    assert netns_holders(inode) == [f"{os.getpid()}/fd/{tap.netns.fd}"]
    with host_iperf3_server(tap.server_place()):
        members = [p for p in netns_holders(inode) if p.isdigit()]
        assert len(members) == 1 and _comm(int(members[0])) == "iperf3"
    tap.close()
    tap.close()  # idempotent
    assert netns_holders(inode) == []


#: pytest holding a tap with an iperf3 server in its namespace, then killed.
HOLDING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pytest_virtio.guests.tap import start_tap
    from pytest_virtio.spec import Nic
    from pytest_virtio.workloads.iperf_server import host_iperf3_server
    tap = start_tap(Nic(backend="tap"), Path("."))
    with host_iperf3_server(tap.server_place()) as port:
        print(tap.netns.inode, flush=True)
        time.sleep(600)
""")


@needs_root
def test_the_namespace_and_its_server_die_with_a_killed_pytest() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDING], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[2])
    assert holder.stdout is not None
    try:
        inode = int(holder.stdout.readline())
        inside = [p for p in netns_holders(inode) if p.isdigit()]
        assert len(inside) == 1 and int(inside[0]) in descendants(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert procs.wait_gone([int(inside[0])], 5.0) == [], "iperf3 outlived the killed pytest"
    assert netns_holders(inode) == []


def _as_nobody(fn: object) -> str:
    """The ConfigError message ``fn()`` raises in a forked child without root."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        message = "no error"
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            fn()  # type: ignore[operator]
        except ConfigError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root in a child: needs root to start")
def test_without_root_the_error_names_root_tun_and_passt(tmp_path: Path) -> None:
    said = _as_nobody(lambda: start_tap(Nic(backend="tap"), tmp_path))
    assert said.startswith("nic 'net0' has backend='tap', which needs root"), said
    assert "/dev/net/tun" in said and "backend='passt'" in said


def test_without_tun_the_error_names_the_module(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(tap_mod, "TUN", Path("/nonexistent/tun"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ConfigError, match=r"needs /nonexistent/tun.*modprobe tun"):
        start_tap(Nic(backend="tap"), tmp_path)


@needs_root
def test_nets_start_all_or_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tap, then a passt that cannot start: the tap's namespace is gone again."""
    made: list[Tap] = []
    real = tap_mod.start_tap

    def recording(nic: Nic, run_dir: Path) -> Tap:
        made.append(real(nic, run_dir))
        return made[-1]

    monkeypatch.setattr(nethost, "_STARTS", {**nethost._STARTS, "tap": recording})
    monkeypatch.setenv("PATH", "/nonexistent")
    spec = MachineSpec(nics=(Nic(backend="tap"), Nic(name="b", backend="passt"),
                             Nic(name="c")))
    with pytest.raises(MissingToolError, match="passt"):
        nethost.start_nets(spec, tmp_path)
    assert len(made) == 1 and made[0].fd == -1 and netns_holders(made[0].netns.inode) == []


@needs_root
def test_nets_give_each_nic_its_host_side_and_qemu_its_links(tmp_path: Path) -> None:
    spec = MachineSpec(nics=(Nic(backend="tap"), Nic(name="b", model="e1000")))
    nets = nethost.start_nets(spec, tmp_path)
    try:
        assert isinstance(nets["net0"], Tap) and isinstance(nets["b"], nethost.UserNet)
        ctx = nethost.net_links(_ctx(), nets)
        assert dict(ctx.net_fds) == {"net0": nets["net0"].net_fd} and not ctx.net_sockets
        assert nethost.host_of(nets, spec) is nets["net0"]  # the first NIC's
        assert nethost.host_of({}, spec, "b").server_place().address == "127.0.0.1"
        with pytest.raises(ConfigError, match="no NIC 'x'"):
            nethost.host_of(nets, spec, "x")
    finally:
        nethost.stop_nets(nets)


def test_a_tap_guest_is_booted_not_restored() -> None:
    why = snapshot.unsupported(MachineSpec(nics=(Nic(backend="tap"),)))
    assert why is not None and "backend='tap'" in why and "namespace" in why


#: Stands in for QEMU in reproduce.sh: says where it runs and with which netdevs.
FAKE_QEMU = textwrap.dedent("""\
    #!/bin/sh
    ip -o -4 addr show
    echo "uid $(id -u)"
    for a; do echo "arg $a"; done
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="remaking the tap needs root")
def test_reproduce_remakes_the_tap_as_root_and_says_so_otherwise() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pvtap", dir="/tmp"))
    try:
        folder.chmod(0o755)
        qemu = folder / "qemu"
        qemu.write_text(FAKE_QEMU)
        qemu.chmod(0o755)
        spec = MachineSpec(nics=(Nic(backend="tap"), Nic(name="b", model="e1000")))
        ctx = _ctx(run_dir=str(folder / "run"), qemu=str(qemu))
        script = folder / "reproduce.sh"
        script.write_text(reproduce.script(to_argv(spec, ctx), folder / "run", spec, ctx))
        script.chmod(0o755)
        env = {**os.environ, "PV_RUN": str(folder / "r")}
        root = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env,
                              timeout=60)
        assert root.returncode == 0, root.stderr
        assert any(line.split()[1:4] == ["pvtap0", "inet", "10.0.2.2/24"]
                   for line in root.stdout.splitlines()), root.stdout
        assert "arg tap,id=net0,ifname=pvtap0,script=no,downscript=no" in root.stdout
        assert "arg user,id=b,hostfwd=tcp:127.0.0.1:0-:22" in root.stdout
        assert not any("fd=" in line for line in root.stdout.splitlines())
        (folder / "n").mkdir()
        os.chown(folder / "n", 65534, 65534)
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "sh", str(script)], capture_output=True, text=True,
                                env={**env, "PV_RUN": str(folder / "n"), "TMPDIR": "/tmp"},
                                timeout=60)
        assert nobody.returncode == 0, nobody.stderr
        assert "not root: NIC(s) net0 on user-mode networking" in nobody.stderr
        assert "arg user,id=net0" in nobody.stdout and "pvtap0" not in nobody.stdout
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_reproduce_of_a_guest_without_tap_is_unchanged() -> None:
    spec = MachineSpec(nics=(Nic(),))
    ctx = _ctx()
    text = reproduce.script(to_argv(spec, ctx), Path("/run/pv/g0"), spec, ctx)
    assert "unshare" not in text and "PV_TAP" not in text


@needs_root
def test_a_program_entered_into_the_namespace_is_the_helper_itself(tap: Tap) -> None:
    """nsenter execs the program (no fork for a network namespace), so the helper's
    PID is the program's: its death signal and procs.stop reach the program."""
    proc = procs.start([*tap.netns.enter_argv(), "sleep", "60"], pass_fds=(tap.netns.fd,))
    try:
        deadline = time.monotonic() + 5
        while _comm(proc.pid) != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _comm(proc.pid) == "sleep" and descendants(proc.pid) == []
        assert os.readlink(f"/proc/{proc.pid}/ns/net") == f"net:[{tap.netns.inode}]"
    finally:
        procs.stop(proc, grace=0)
    assert not procs.running(proc.pid)


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()

"""ssh.py without QEMU: key files, QMP/console parsing, fw_cfg argv, error wrapping."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import paramiko
import pytest

from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import GuestError
from pytest_virtio.spec import LaunchContext, MachineSpec, Nic, to_argv

# Recorded from QEMU 7.2 (`info usernet`) with one and with two user netdevs.
USERNET_ONE = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  12       127.0.0.1 44165       10.0.2.15    22     0     0
"""
USERNET_TWO = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[ESTABLISHED]   25       10.0.2.15 50122        10.0.2.2  5201     0     0
  TCP[HOST_FORWARD]  12       127.0.0.1 40001       10.0.2.15    22     0     0
Hub -1 (net1):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  14       127.0.0.1 40002       10.0.2.15    22     0     0
"""


def test_hostfwd_port_is_read_from_info_usernet() -> None:
    assert ssh_mod.parse_hostfwd_port(USERNET_ONE) == 44165
    assert ssh_mod.parse_hostfwd_port(USERNET_TWO) == 40001
    assert ssh_mod.parse_hostfwd_port(USERNET_TWO, netdev="net1") == 40002


def test_missing_forward_names_what_qemu_said() -> None:
    with pytest.raises(GuestError, match="no host forward to guest port 22 on netdev 'net7'"):
        ssh_mod.parse_hostfwd_port(USERNET_TWO, netdev="net7")
    with pytest.raises(GuestError, match="Hub -1"):
        ssh_mod.parse_hostfwd_port(USERNET_ONE, guest_port=80)


def test_host_key_is_the_last_console_announcement() -> None:
    log = (
        "noise\r\nPYTEST-VIRTIO-HOSTKEY ssh-ed25519 AAAAold\r\n"
        "PYTEST-VIRTIO-READY 2.5\r\nPYTEST-VIRTIO-HOSTKEY ssh-ed25519 AAAAnew\r\n"
    )
    assert ssh_mod.parse_host_key(log) == ("ssh-ed25519", "AAAAnew")
    assert ssh_mod.parse_host_key("PYTEST-VIRTIO-READY 2.5\n") is None


def test_generated_key_is_private_and_loads_in_paramiko(tmp_path: Path) -> None:
    pair = ssh_mod.generate_keypair(tmp_path / "k", comment="unit")
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    pkey = pair.pkey()
    assert isinstance(pkey, paramiko.Ed25519Key)
    assert pair.public_line == f"ssh-ed25519 {pkey.get_base64()} unit"
    assert pair.public_path.read_text() == pair.public_line + "\n"
    other = ssh_mod.generate_keypair(tmp_path / "other")
    assert other.public_line != pair.public_line


def test_host_key_object_round_trip_and_garbage(tmp_path: Path) -> None:
    line = ssh_mod.generate_keypair(tmp_path).public_line.split()
    key = ssh_mod.host_key_object(line[0], line[1])
    assert key.get_base64() == line[1]
    with pytest.raises(GuestError, match="unusable host key"):
        ssh_mod.host_key_object("ssh-ed25519", "bm90IGEga2V5")


def _ctx(**changes: object) -> LaunchContext:
    base: dict[str, object] = dict(
        qemu_binary="qemu-system-x86_64", accel="tcg", kernel="/k", initrd="/i",
        root_image="/r", qmp_socket="/run/q.sock", console_socket="/run/c.sock",
        console_log="/run/c.log",
    )
    base.update(changes)
    return LaunchContext(**base)  # type: ignore[arg-type]


def test_fw_cfg_blob_reaches_the_argv_and_nic_forwards_port_zero() -> None:
    spec = MachineSpec(nics=(Nic(model="virtio-net"),))
    argv = to_argv(spec, _ctx(fw_cfg={ssh_mod.AUTHORIZED_KEYS_FW_CFG: "/run/k,1.pub"}))
    i = argv.index("-fw_cfg")
    assert argv[i + 1] == "name=opt/pytest-virtio/authorized_keys,file=/run/k,,1.pub"
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22" in argv
    assert "-fw_cfg" not in to_argv(spec, _ctx())


def test_session_without_announced_key_refuses_to_connect(tmp_path: Path) -> None:
    pair = ssh_mod.generate_keypair(tmp_path)
    session = ssh_mod.SshSession(1, pair, lambda: None, connect_timeout=1.0,
                                 console_tail=lambda: "PYTEST-VIRTIO-READY 1.0")
    with pytest.raises(GuestError, match="never printed its SSH host key") as info:
        session.reconnect()
    assert info.value.console_tail == "PYTEST-VIRTIO-READY 1.0"


def test_nothing_listening_is_a_guest_error_after_the_deadline(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    pair = ssh_mod.generate_keypair(tmp_path)
    kind, blob = pair.public_line.split()[:2]
    session = ssh_mod.SshSession(port, pair, lambda: (kind, blob), connect_timeout=0.5,
                                 console_tail=lambda: "tail")
    with pytest.raises(GuestError, match="is dropbear running"):
        session.reconnect()


@pytest.mark.parametrize("message", [
    "Unable to open channel.", "Channel is not open", "Channel closed."])
def test_each_way_paramiko_reports_an_unstarted_channel_is_retried(message: str) -> None:
    """The three spellings of "dropbear closed the channel before it ran anything"
    (the third, "Channel is not open", failed a CI run before it was listed)."""
    assert ssh_mod._refused_start(paramiko.SSHException(message))


@pytest.mark.parametrize("exc", [
    paramiko.SSHException("Timeout opening channel."), OSError("Channel closed."),
    paramiko.SSHException("Channel closed. extra")])
def test_other_failures_are_not_retried(exc: BaseException) -> None:
    assert not ssh_mod._refused_start(exc)


def test_watchdog_fires_past_the_deadline_and_not_after_cancel() -> None:
    import threading
    import time

    from pytest_virtio.starvation import Deadline

    fired = threading.Event()
    ssh_mod._Watchdog(Deadline(0.1, None), fired.set)
    assert not fired.wait(0.05 + ssh_mod.WATCHDOG_GRACE - 0.5)
    assert fired.wait(2.0)
    quiet = threading.Event()
    dog = ssh_mod._Watchdog(Deadline(0.1, None), quiet.set)
    dog.cancel()
    time.sleep(0.1 + ssh_mod.WATCHDOG_GRACE + 0.3)
    assert not quiet.is_set()


@pytest.mark.parametrize("port", [22, 2222])
def test_the_pinned_key_is_filed_under_paramikos_name_for_the_server(
        port: int, tmp_path: Path) -> None:
    """paramiko looks a server up as ``host`` on port 22 and ``[host]:port`` elsewhere;
    a tap NIC's SSH is port 22 through a dialled socket (a key filed under
    ``[127.0.0.1]:22`` was never found, and every connect refused as unpinned)."""
    pair = ssh_mod.generate_keypair(tmp_path)
    kind, blob = pair.public_line.split()[:2]

    def refused(timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", 1), timeout)

    session = ssh_mod.SshSession(port, pair, lambda: (kind, blob), connect_timeout=0.5,
                                 dial=refused, where="somewhere else")
    name = "127.0.0.1" if port == 22 else f"[127.0.0.1]:{port}"
    assert session._pinned_client().get_host_keys().lookup(name) is not None
    with pytest.raises(GuestError, match="guest at somewhere else failed"):
        session.reconnect()  # the dial's refusal, retried until the deadline

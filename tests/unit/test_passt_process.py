"""The passt network backend's host side, with the real ``passt`` (no QEMU): what it
listens on, the SSH port race retried, a missing passt naming its package, and
passt gone with its guest and with a SIGKILLed pytest."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.errors import LaunchError, MissingToolError
from pytest_virtio.guests import passt as passt_mod
from pytest_virtio.guests import snapshot
from pytest_virtio.guests.passt import accepting, listeners, passt_argv, start_passt
from pytest_virtio.spec import MachineSpec, Nic

needs_passt = pytest.mark.skipif(shutil.which("passt") is None,
                                 reason="needs Debian's passt (scripts/setup.sh installs it)")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short directory: a unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pvpasst", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_argv_keeps_the_guest_address_and_forwards_loopback_only() -> None:
    argv = passt_argv("/usr/bin/passt", "/r/passt-net0.sock", 40000)
    joined = " ".join(argv)
    assert "--foreground" in argv and "--ipv4-only" in argv
    assert f"--runas {os.geteuid()}:{os.getegid()}" in joined  # see the module doc
    assert "--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2" in joined
    assert "--tcp-ports 127.0.0.1/40000:22 --udp-ports none" in joined
    assert argv[-2:] == ["--socket", "/r/passt-net0.sock"]
    assert "--tcp-ports none" in " ".join(passt_argv("passt", "/s", None))


def test_accepting_reads_listening_unix_sockets(tmp_path: Path) -> None:
    table = tmp_path / "unix"
    table.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000: 00000002 00000000 00010000 0001 01 111 /r/listening.sock\n"
        "0000: 00000002 00000000 00000000 0001 03 112 /r/connected.sock\n")
    assert accepting(Path("/r/listening.sock"), table)
    assert not accepting(Path("/r/connected.sock"), table)
    assert not accepting(Path("/r/absent.sock"), table)


def test_accepting_a_socket_whose_path_has_spaces(run_dir: Path) -> None:
    """/proc/net/unix prints the path raw: a run directory with a space is still found."""
    sock = run_dir / "run dir" / "passt-net0.sock"
    sock.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen()
        assert accepting(sock)


def test_a_missing_passt_names_the_package_and_the_nic(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(run_dir))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(MissingToolError, match="apt-get install passt") as info:
        start_passt(Nic(name="wan", backend="passt"), run_dir)
    assert "nic 'wan' has backend='passt'" in str(info.value)


def test_a_passt_guest_is_booted_not_restored() -> None:
    why = snapshot.unsupported(MachineSpec(nics=(Nic(backend="passt"),)))
    assert why is not None and "backend='passt'" in why
    assert snapshot.unsupported(MachineSpec(nics=(Nic(),))) is None


@needs_passt
def test_passt_listens_on_its_socket_and_loopback_ssh_only(run_dir: Path) -> None:
    passt = start_passt(Nic(backend="passt"), run_dir)
    try:
        assert passt.socket == run_dir / "passt-net0.sock" and accepting(passt.socket)
        assert listeners(passt.proc.pid) == [("tcp", "127.0.0.1", passt.ssh_port)]
        assert "10.0.2.15" in passt.log.read_text()
    finally:
        passt.close()
    assert not procs.running(passt.proc.pid)
    assert not passt.socket.exists()


@needs_passt
def test_no_ssh_forward_means_no_inet_listener(run_dir: Path) -> None:
    passt = start_passt(Nic(backend="passt", hostfwd_ssh=False), run_dir)
    try:
        assert passt.ssh_port is None
        assert listeners(passt.proc.pid) == []
    finally:
        passt.close()


@needs_passt
def test_a_port_taken_before_passt_binds_it_is_retried(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The race made certain: the first port offered is held by another socket."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        offers = iter([taken])
        free = passt_mod._free_loopback_port
        monkeypatch.setattr(passt_mod, "_free_loopback_port", lambda: next(offers, None) or free())
        caplog.set_level("INFO", logger=passt_mod.__name__)
        passt = start_passt(Nic(backend="passt"), run_dir)
        try:
            assert passt.ssh_port not in (None, taken)
            assert f"port {taken} was taken" in caplog.text
        finally:
            passt.close()


@needs_passt
def test_a_port_never_free_is_a_clear_launch_error(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setattr(passt_mod, "_free_loopback_port", lambda: holder.getsockname()[1])
        with pytest.raises(LaunchError, match=r"passt did not start: exit 1: .*Failed to bind"):
            start_passt(Nic(backend="passt"), run_dir, attempts=2)


class Interrupted(Exception):
    """What the test's alarm raises in the middle of the wait (a ^C, as far as passt.py sees)."""


def test_a_passt_interrupted_while_starting_is_stopped(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """^C while a passt is starting (not listening yet): that passt does not outlive it."""
    fake = run_dir / "passt"
    fake.write_text(f"#!/bin/sh\necho $$ > {run_dir}/pid\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{run_dir}:{os.environ['PATH']}")

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(Interrupted):
            start_passt(Nic(backend="passt"), run_dir, timeout=30.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not procs.running(int((run_dir / "pid").read_text()))


#: A stand-in for pytest: starts a passt for one NIC, says its pid, waits to be killed.
PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pytest_virtio.guests.passt import start_passt
    from pytest_virtio.spec import Nic
    passt = start_passt(Nic(backend="passt"), Path(sys.argv[1]))
    print(passt.proc.pid, flush=True)
    time.sleep(600)
""")


@needs_passt
def test_passt_dies_with_a_sigkilled_pytest(run_dir: Path) -> None:
    """passt started as root would switch to nobody, and the kernel forgets the death
    signal on that change; ``--runas`` our own user keeps it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        assert procs.running(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert procs.wait_gone([pid], 5.0) == [], "passt outlived the pytest that started it"
    finally:
        parent.kill()
        parent.wait()
        if procs.running(pid):
            os.kill(pid, signal.SIGKILL)

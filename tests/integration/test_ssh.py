"""SSH into real guests: same Result as the console, SFTP, trust, failures, xdist.

Each test boots one guest (~5 s under TCG), so each covers one theme fully.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import paramiko
import pytest

from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import GuestError, GuestTimeout
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession

# One guest for the module; the failure-mode test (it kills dropbear) comes last.
pytestmark = pytest.mark.vm(nics=["virtio-net"], scope="module")


def test_run_via_ssh_gives_the_console_result(guest: Guest) -> None:
    res = guest.run("id -u", via="ssh")
    assert res.stdout == "0\n"
    assert (res.rc, res.stderr, res.via) == (0, "", "ssh")
    cmd = "echo out; echo err >&2; exit 7"
    over_ssh, over_console = guest.run(cmd, via="ssh"), guest.run(cmd)
    assert (over_ssh.rc, over_ssh.stdout, over_ssh.stderr) == (7, "out\n", "err\n")
    assert (over_console.rc, over_console.stdout, over_console.stderr) == (7, "out\n", "err\n")
    # A command killed by a signal reports 128+N on both paths.
    killed = "sh -c 'kill -9 $$'"
    assert guest.run(killed, via="ssh").rc == guest.run(killed).rc == 137
    # The key came from fw_cfg at boot; no password login is configured.
    key = guest.ssh_session().key
    assert guest.check("cat /root/.ssh/authorized_keys").stdout.strip() == key.public_line
    assert guest.check("ps -o args= -C dropbear").stdout.split()[1:3] == ["-s", "-g"]
    assert isinstance(guest.ssh, paramiko.SSHClient)
    assert guest.host_key is not None and guest.host_key.startswith("ssh-ed25519 ")
    server_key = guest.ssh.get_transport().get_remote_server_key()  # type: ignore[union-attr]
    assert f"{server_key.get_name()} {server_key.get_base64()}" == guest.host_key


def test_put_get_round_trip_1mib(guest: Guest, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    guest.put(tmp_path / "up.bin", "/root/up.bin")
    assert guest.run("wc -c < /root/up.bin", via="ssh").stdout.strip() == str(len(data))
    guest.get("/root/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == data
    with pytest.raises(GuestError, match="SFTP get /no/such/file"):
        guest.get("/no/such/file", tmp_path / "nothing")


def test_back_to_back_sftp_sessions(guest: Guest, tmp_path: Path) -> None:
    """Each put/get is its own SFTP channel.  A channel opened while dropbear was
    still tearing down the previous one used to be closed unstarted (38 in 400
    under a CPU hog); waiting for the server's close (``_retire``) removed it,
    so the retry that remains as defence must not have fired.  Exec channels
    are interleaved as tests do.  12 rounds (the hunt used 400; this suite ran
    40, 70 s of a loaded run): the race showed about once in 10 rounds."""
    for i in range(12):
        (tmp_path / "up").write_text(f"round {i}\n")
        guest.put(tmp_path / "up", "/root/round")
        guest.get("/root/round", tmp_path / "down")
        assert (tmp_path / "down").read_text() == f"round {i}\n"
        if i % 4 == 3:
            assert guest.run("cat /root/round", via="ssh").stdout == f"round {i}\n"
    assert guest.ssh_session().refused_starts == 0


def _session_with(guest: Guest, key: ssh_mod.KeyPair,
                  host_key: tuple[str, str] | None) -> ssh_mod.SshSession:
    real = guest.ssh_session()
    return ssh_mod.SshSession(real.port, key, lambda: host_key, connect_timeout=10.0)


def test_failure_modes_are_clear_errors_not_hangs(guest: Guest, tmp_path: Path) -> None:
    real = guest.ssh_session()
    pinned = real.host_key_source()
    # Wrong client key: refused, wrapped, and no password fallback is attempted.
    stranger = ssh_mod.generate_keypair(tmp_path / "stranger")
    with pytest.raises(GuestError, match="refused the session key") as info:
        _session_with(guest, stranger, pinned).reconnect()
    assert isinstance(info.value.__cause__, paramiko.AuthenticationException)
    # A host key other than the one on the console is rejected.
    impostor = ssh_mod.generate_keypair(tmp_path / "impostor").public_line.split()[:2]
    with pytest.raises(GuestError, match="not the one the guest announced"):
        _session_with(guest, real.key, (impostor[0], impostor[1])).reconnect()
    # A command that overruns its timeout raises GuestTimeout; the link stays usable.
    start = time.monotonic()
    with pytest.raises(GuestTimeout):
        guest.run("sleep 60", timeout=2, via="ssh")
    assert time.monotonic() - start < 10
    # A frozen guest cannot hang a command either.  Frozen by SIGSTOP of QEMU, not
    # QMP stop: a guest paused over QMP fails a command at once (test_api_gaps.py),
    # before SSH's own watchdog, which is what this checks, has anything to do.
    os.kill(guest.machine.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(GuestTimeout):
            guest.run("true", timeout=3, via="ssh")
    finally:
        os.kill(guest.machine.pid, signal.SIGCONT)
    assert time.monotonic() - start < 10
    # The connection dropping mid-command is an error (EOF), then SSH reconnects.
    start = time.monotonic()
    with pytest.raises(GuestError, match="dropped") as dropped:
        guest.run("echo started; kill -9 $PPID; sleep 60", timeout=60, via="ssh")
    assert time.monotonic() - start < 15
    assert "started" in str(dropped.value)
    assert guest.run("id -u", via="ssh").stdout == "0\n"
    # sshd gone: a GuestError that says so and carries the console tail.
    guest.check("pkill -x dropbear")
    real.connect_timeout = 3.0
    with pytest.raises(GuestError, match="is dropbear running") as down:
        guest.reconnect_ssh()
    assert "--- console tail ---" in str(down.value)
    assert down.value.console_tail


XDIST_TEST = '''
import json, os, time
from pathlib import Path
import pytest

OUT = Path(os.environ["PV_XDIST_OUT"])

def _barrier(n):
    """Hold this guest's SSH session until all four are up: they overlap by design."""
    (OUT / f"ready-{n}").touch()
    deadline = time.time() + 240
    while len(list(OUT.glob("ready-*"))) < 4:
        assert time.time() < deadline, "the other workers never got their guests up"
        time.sleep(0.1)

@pytest.mark.vm(nics=["virtio-net"])
@pytest.mark.parametrize("n", range(4))
def test_ssh_in_parallel(guest, n):
    assert guest.run("id -u", via="ssh").stdout == "0\\n"
    guest.run(f"echo {n} > /root/n", via="ssh")
    start = time.time()
    _barrier(n)
    assert guest.run("cat /root/n", via="ssh").stdout == f"{n}\\n"
    (OUT / f"{n}.json").write_text(json.dumps({
        "port": guest.ssh_session().port, "start": start, "end": time.time(),
        "worker": os.environ.get("PYTEST_XDIST_WORKER")}))
'''


def test_four_guests_under_xdist_get_distinct_ports(
    pytester: pytest.Pytester, virtio_session: VirtioSession,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """Four workers, four guests, four SSH sessions open at once, four ports.

    The inner run shares this run's image cache (pytester moves $HOME, which
    would otherwise mean a fresh image build) and accelerator verdict.
    """
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PV_XDIST_OUT", str(out))
    monkeypatch.setenv("PYTEST_VIRTIO_CACHE", str(virtio_session.settings.cache_dir))
    pytester.makepyfile(test_par=XDIST_TEST)
    accel = virtio_session.accel().accel
    result = pytester.runpytest_subprocess(
        "-n", "4", "-p", "no:cacheprovider", f"--virtio-accel={accel}", "-q", timeout=400,
    )
    result.assert_outcomes(passed=4)
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len({r["port"] for r in runs}) == 4, runs
    assert len({r["worker"] for r in runs}) == 4, runs
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs), runs

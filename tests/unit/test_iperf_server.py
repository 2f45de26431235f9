"""The one host iperf3 server, against a real iperf3 client on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.errors import MissingToolError, WorkloadError
from pytest_virtio.interrupts import child_pids
from pytest_virtio.workloads import iperf_server
from pytest_virtio.workloads.iperf import parse_iperf3_json

pytestmark = pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3 (apt)")


def test_server_serves_one_client_and_is_gone_after() -> None:
    with iperf_server.host_iperf3_server() as port:
        assert iperf_server.listening("127.0.0.1", port)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"],
                             capture_output=True, text=True, timeout=60).stdout
    result = parse_iperf3_json(out)
    assert result.bytes > 0 and json.loads(out)["start"]["connected"]
    assert not iperf_server.listening("127.0.0.1", port)


def test_server_that_cannot_listen_is_retried_then_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each attempt's port is taken by a listener first (the race it retries):
    every attempt fails, and the error carries iperf3's own words."""
    import socket

    held: list[socket.socket] = []

    def taken_port() -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        held.append(s)
        return int(s.getsockname()[1])

    monkeypatch.setattr(iperf_server, "listening", lambda *where: False)
    place = iperf_server.ServerPlace(free_port=taken_port)
    try:
        with pytest.raises(WorkloadError, match=r"would not start on 127\.0\.0\.1: .*in use"), \
                iperf_server.host_iperf3_server(place, start_timeout=5, attempts=2):
            pass
        assert len(held) == 2
    finally:
        for s in held:
            s.close()


def test_missing_iperf3_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match="apt-get install iperf3"), \
            iperf_server.host_iperf3_server():
        pass


#: pytest with the server up: prints its port, then waits to be killed.
SERVING = """
import time
from pytest_virtio.workloads.iperf_server import host_iperf3_server
with host_iperf3_server() as port:
    print(port, flush=True)
    time.sleep(600)
"""


def test_server_dies_with_a_killed_pytest() -> None:
    """kill -9 runs no teardown: the server must still go (it used to wait for a
    client for ever, holding its port)."""
    pytest_proc = subprocess.Popen([sys.executable, "-c", SERVING], stdout=subprocess.PIPE,
                                   text=True)
    assert pytest_proc.stdout is not None
    port = int(pytest_proc.stdout.readline())
    servers = [pid for pid in child_pids(pytest_proc.pid)
               if Path(f"/proc/{pid}/comm").read_text().strip() == "iperf3"]
    try:
        assert len(servers) == 1 and iperf_server.listening("127.0.0.1", port)
        pytest_proc.kill()
        pytest_proc.wait()
        assert procs.wait_gone(servers, 5.0) == [], "iperf3 outlived the killed pytest"
        assert not iperf_server.listening("127.0.0.1", port)
    finally:
        pytest_proc.kill()
        pytest_proc.wait()
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

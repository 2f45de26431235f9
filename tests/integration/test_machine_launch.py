"""How QEMU is started: from any thread, and dying with the process that started it.

No guest image: ``-machine none`` QEMU with only its QMP and console sockets,
which is all :class:`Machine` needs to launch and talk to it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_virtio.errors import LaunchError
from pytest_virtio.qemu.machine import Machine, RunState

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86")


@pytest.fixture
def run_dir(short_tmp: Path) -> Path:
    return short_tmp


def bare_machine(run_dir: Path, qemu: str | None = QEMU) -> Machine:
    assert qemu is not None
    qmp, con, cmd = run_dir / "qmp.sock", run_dir / "con.sock", run_dir / "cmd.sock"
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "none",
            "-chardev", f"socket,id=con0,path={con},server=on,wait=off",
            "-chardev", f"socket,id=cmd0,path={cmd},server=on,wait=off",
            "-chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control"]
    return Machine(argv, run_dir, qmp_socket=str(qmp), console_socket=str(con),
                   console_log=run_dir / "console.log")


def _alive_for(machine: Machine, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if machine.exitcode() is not None:
            return False
        time.sleep(0.05)
    return True


def test_machine_launched_from_a_thread_outlives_the_thread(run_dir: Path) -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: a guest booted from a
    worker thread (a pool booting guests in parallel) was SIGKILLed when it ended."""
    machine = bare_machine(run_dir)
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            machine.launch()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=boot)
    thread.start()
    thread.join(60)
    try:
        assert not errors, errors
        assert _alive_for(machine, 1.0), f"QEMU died with its thread: {machine.exitcode()}"
        assert machine.qmp("query-status")["status"] == "running"
    finally:
        machine.shutdown()
    assert machine.state is RunState.STOPPED


DIES_WITH_PARENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_machine_launch import bare_machine
m = bare_machine(Path({run_dir!r}))
m.launch()
print(m.pid, flush=True)
time.sleep(600)
"""


def test_machine_dies_with_its_sigkilled_parent(run_dir: Path) -> None:
    """The death signal survives the exec into QEMU and the PID is QEMU's own."""
    source = DIES_WITH_PARENT.format(tests=str(Path(__file__).parent), run_dir=str(run_dir))
    parent = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        qemu_pid = int(parent.stdout.readline())
        exe = Path(f"/proc/{qemu_pid}/exe").resolve()
        assert exe.name.startswith("qemu-system"), exe
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
            stat = Path(f"/proc/{qemu_pid}/stat").read_text(errors="replace")
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                break  # killed, waiting for init to reap it
            time.sleep(0.05)
        else:
            assert not Path(f"/proc/{qemu_pid}").exists(), "QEMU outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_missing_qemu_names_the_package(run_dir: Path) -> None:
    machine = bare_machine(run_dir, qemu=str(run_dir / "no-such-qemu"))
    with pytest.raises(LaunchError, match="apt-get install qemu-system-x86"):
        machine.launch()
    assert machine.state is RunState.FAILED


def test_a_refused_qmp_command_is_a_qmp_error_carrying_both_sides(run_dir: Path) -> None:
    """Callers decide on QEMU's error class and words, not on a message's text."""
    from pytest_virtio.errors import QmpError

    machine = bare_machine(run_dir)
    machine.launch()
    try:
        with pytest.raises(QmpError) as info:
            machine.qmp("qom-get", path="/no/such/object", property="type")
        err = info.value
        assert isinstance(err, LaunchError)
        assert err.command == "qom-get"
        assert err.arguments == {"path": "/no/such/object", "property": "type"}
        assert err.error_class in ("GenericError", "DeviceNotFound")
        assert "/no/such/object" in err.desc and err.desc in str(err)
        assert machine.qmp("query-status")["status"] == "running"  # still usable
    finally:
        machine.shutdown()


def test_a_qemu_that_never_answers_fails_the_command_not_the_session(run_dir: Path) -> None:
    """QEMU stopped by a signal (its main loop as blocked as one waiting on a dead
    vhost-user back-end): the QMP command fails after qmp_timeout, naming itself."""
    import os

    from pytest_virtio.errors import QmpTimeout

    machine = bare_machine(run_dir)
    machine.launch()
    machine.qmp_timeout = 1.0
    assert machine.pid is not None
    os.kill(machine.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(QmpTimeout, match="did not answer QMP query-status within 1s"):
            machine.qmp("query-status")
        assert time.monotonic() - start < 5
    finally:
        os.kill(machine.pid, signal.SIGCONT)
        machine.shutdown()

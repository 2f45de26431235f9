"""Real QEMU accepts every golden argv (and the hot-plug QMP arguments).

Why: a golden file only proves the argv did not change; this proves it is QEMU
syntax with properties QEMU really has. Each case runs the generated argv
minus -kernel/-initrd/-append plus ``-S`` (nothing executes: ~0.1 s each), lists
/machine/peripheral over QMP to check every id we promised exists, and quits.
vhost-user-blk disks are served by qemu-storage-daemon, the project's reference
peer, so the device really connects and negotiates; passt NICs by a real passt, tap
NICs by a real tap in its own network namespace (root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pytest_virtio.guests.nethost import net_links, start_nets, stop_nets
from pytest_virtio.qemu.machine import connect_qmp
from pytest_virtio.spec import (
    Balloon,
    CdRom,
    Disk,
    MachineSpec,
    Rng,
    SerialPorts,
    hotplug_commands,
    to_argv,
)

QEMU = shutil.which("qemu-system-x86_64")
QSD = shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(QEMU is None or QSD is None, reason="needs qemu-system-x86")


def _load_cases() -> ModuleType:
    path = Path(__file__).parent.parent / "unit" / "golden" / "cases.py"
    spec = importlib.util.spec_from_file_location("pv_golden_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _load_cases()
STRIP = {"-kernel", "-initrd", "-append"}
STARTED: list[int] = []  # every pid this module spawned, checked at the end


@pytest.fixture
def run_dir(short_tmp: Path) -> str:
    return str(short_tmp)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _sparse(path: str, size: int = 64 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def _process(argv: list[str], pass_fds: Iterable[int] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv in its own process group; always killed and reaped on exit."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    STARTED.append(proc.pid)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def _qmp(path: str, qemu: subprocess.Popen[bytes]) -> QEMUMonitorProtocol:
    """qemu.qmp's client, connected the way Machine connects (a refusal between
    QEMU's bind() and listen() is retried; this helper once connected only once)."""
    qmp = connect_qmp(path, 30, lambda: qemu.poll() is not None)
    qmp.settimeout(20)
    return qmp


def _vhost_disks(spec: MachineSpec) -> list[tuple[str, Disk | None]]:
    found: list[tuple[str, Disk | None]] = [
        (d.name, d) for d in spec.disks if d.bus == "vhost-user-blk"
    ]
    if spec.root_bus == "vhost-user-blk":
        found.append(("root", None))
    return found


def _storage_daemon_argv(spec: MachineSpec, ctx: Any, run_dir: str) -> list[str]:
    assert QSD is not None
    argv = [QSD]
    for name, disk in _vhost_disks(spec):
        path = _sparse(f"{run_dir}/vu-{name}.img")
        queues = (disk.num_queues if disk else None) or spec.smp
        writable = "off" if disk is not None and disk.readonly else "on"
        argv += ["--blockdev", f"driver=file,node-name=f-{name},filename={path}"]
        argv += [
            "--export",
            f"type=vhost-user-blk,id=e-{name},node-name=f-{name},addr.type=unix,"
            f"addr.path={ctx.vhost_sockets[name]},writable={writable},num-queues={queues}",
        ]
    return argv


def _materialize(spec: MachineSpec, run_dir: str) -> tuple[MachineSpec, Any]:
    """The case with real files: disks, qcow2 images, ISOs, root image."""
    iso = _sparse(f"{run_dir}/cd.iso", 4 << 20)
    devices = tuple(
        dataclasses.replace(d, iso=iso) if isinstance(d, CdRom) else d for d in spec.devices
    )
    spec = spec.replace(devices=devices)
    ctx = cases.context_for(spec, run_dir=run_dir, qemu=QEMU)
    for disk in spec.disks:
        path = ctx.disk_files[disk.name]
        if disk.format == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
        elif disk.bus != "vhost-user-blk":
            _sparse(path)
    ctx = dataclasses.replace(ctx, root_image=_sparse(f"{run_dir}/root.img", 16 << 20))
    return spec, ctx


def _qemu_argv(spec: MachineSpec, ctx: Any) -> list[str]:
    argv = to_argv(spec, ctx)
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in STRIP:
            skip = True
        else:
            kept.append(arg)
    return [*kept, "-S"]


def _expected_ids(spec: MachineSpec) -> set[str]:
    ids = {"root", *(d.name for d in spec.disks), *(f"{n.name}-dev" for n in spec.nics)}
    for dev in spec.devices:
        if isinstance(dev, Rng):
            ids.add(f"{dev.name}-dev")
        elif isinstance(dev, SerialPorts):
            ids |= {dev.name, *(f"{dev.name}-port{i}" for i in range(len(dev.names)))}
        elif isinstance(dev, Balloon | CdRom):
            ids.add(dev.name)
    return ids


def _quit(qmp: QEMUMonitorProtocol) -> None:
    with contextlib.suppress(EOFError):  # QEMU may hang up before its reply is read
        qmp.cmd("quit")


@contextlib.contextmanager
def _booted(spec: MachineSpec, run_dir: str) -> Iterator[tuple[QEMUMonitorProtocol, Any]]:
    """QEMU paused (-S) with the spec's argv, QMP connected; torn down on exit."""
    spec, ctx = _materialize(spec, run_dir)
    with contextlib.ExitStack() as stack:
        if _vhost_disks(spec):
            qsd = stack.enter_context(_process(_storage_daemon_argv(spec, ctx, run_dir)))
            for name, _ in _vhost_disks(spec):
                sock = ctx.vhost_sockets[name]
                _wait_for(lambda s=sock: os.path.exists(s) or qsd.poll() is not None, 20, sock)
            assert qsd.poll() is None, qsd.stderr.read().decode() if qsd.stderr else ""
        nets = start_nets(spec, Path(run_dir))
        stack.callback(stop_nets, nets)
        linked = net_links(ctx, nets)
        assert dict(linked.net_sockets) == dict(ctx.net_sockets)  # passt's, as the golden's
        ctx = linked
        qemu = stack.enter_context(_process(_qemu_argv(spec, ctx), ctx.net_fds.values()))
        ready = lambda: os.path.exists(ctx.qmp_socket) or qemu.poll() is not None  # noqa: E731
        _wait_for(ready, 30, "the QMP socket")
        if qemu.poll() is not None:
            err = qemu.stderr.read().decode() if qemu.stderr else ""
            pytest.fail(f"QEMU rejected the argv:\n{err}\nargv: {_qemu_argv(spec, ctx)}")
        qmp = _qmp(ctx.qmp_socket, qemu)
        try:
            yield qmp, ctx
            _quit(qmp)
            qemu.wait(timeout=10)
        finally:
            with contextlib.suppress(EOFError):  # the hang-up after quit
                qmp.close()


@pytest.mark.parametrize("case", sorted(cases.CASES))
def test_qemu_accepts_golden_argv(case: str, run_dir: str) -> None:
    spec = cases.CASES[case]
    with _booted(spec, run_dir) as (qmp, _ctx):
        listed = {p["name"] for p in qmp.cmd("qom-list", path="/machine/peripheral")}
        assert _expected_ids(spec) <= listed
        assert qmp.cmd("query-status")["status"] == "prelaunch"


HOTPLUG = {
    "virtio-blk": Disk(
        name="hot", bus="virtio-blk", num_queues=2, transport="modern", cache="writethrough"
    ),
    "virtio-blk-qcow2": Disk(
        name="hot",
        bus="virtio-blk",
        image="x",
        format="qcow2",
        readonly=True,
        discard=True,
        transport="legacy",
    ),
    "vhost-user-blk": Disk(name="hot", bus="vhost-user-blk", queue_size=64),
    "virtio-scsi": Disk(name="hot", bus="virtio-scsi", serial="HOT1"),
}


@pytest.mark.parametrize("kind", sorted(HOTPLUG))
def test_hotplug_commands_accepted(kind: str, run_dir: str) -> None:
    """hotplug_commands() are valid QMP: the disk appears, then unplugs by id."""
    disk = HOTPLUG[kind]
    base = MachineSpec(root_bus="virtio-scsi" if disk.bus == "virtio-scsi" else "virtio-blk")
    # The hot disk rides in the spec only so the helpers create its file/socket.
    with_disk = base.replace(disks=(disk,))
    spec, ctx = _materialize(with_disk, run_dir)
    with contextlib.ExitStack() as stack:
        if disk.bus == "vhost-user-blk":
            qsd = stack.enter_context(_process(_storage_daemon_argv(spec, ctx, run_dir)))
            sock = ctx.vhost_sockets["hot"]
            _wait_for(lambda: os.path.exists(sock) or qsd.poll() is not None, 20, sock)
        qemu = stack.enter_context(_process(_qemu_argv(base, ctx)))
        _wait_for(lambda: os.path.exists(ctx.qmp_socket) or qemu.poll() is not None, 30, "QMP")
        qmp = _qmp(ctx.qmp_socket, qemu)
        try:
            for command, args in hotplug_commands(disk, ctx):
                qmp.cmd(command, **args)
            listed = {p["name"] for p in qmp.cmd("qom-list", path="/machine/peripheral")}
            assert "hot" in listed
            _quit(qmp)
            qemu.wait(timeout=10)
        finally:
            with contextlib.suppress(EOFError):  # the hang-up after quit
                qmp.close()


def test_no_process_left_behind() -> None:
    """Every QEMU/storage daemon this module started is gone (runs last here)."""
    assert STARTED, "the tests above should have started processes"
    alive = [pid for pid in STARTED if Path(f"/proc/{pid}").exists()]
    assert alive == []

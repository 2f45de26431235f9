"""Real QEMU against the in-process vhost-user-blk backend.

The realize handshake (GET_FEATURES .. GET_CONFIG) runs at device creation, so
a paused (-S) QEMU that stays up with the device in its PCI tree proves the
backend speaks QEMU 7.2's dialect.  The boot test goes further: the host's
Debian kernel + initramfs under TCG, busybox ``dd`` on /dev/vda, which drives
IN and OUT requests through our rings.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio.vhost_user import FileStorage, MemoryStorage, VhostUserBlkServer

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _qemu(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    assert QEMU is not None
    return subprocess.Popen([QEMU, *argv], start_new_session=True, **kw)  # type: ignore[call-overload]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _base_argv(sock: Path, mem: str = "256M") -> list[str]:
    return [
        "-M", "pc,accel=tcg", "-nodefaults", "-display", "none", "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=vu0,path={sock},reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1,id=vblk0",
    ]


def test_realize_handshake_with_real_qemu(rundir: Path) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, qmp_path = rundir / "vu.sock", rundir / "qmp.sock"
    with VhostUserBlkServer(str(sock), MemoryStorage(64 << 20)) as server:
        proc = _qemu([*_base_argv(sock), "-S", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                     stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not qmp_path.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect()
            try:
                props = qmp.cmd("qom-list", path="/machine/peripheral/vblk0")
                assert any(p["name"] == "chardev" for p in props)
                pci = qmp.cmd("query-pci")
                devices = [d for bus in pci for d in bus["devices"]]
                # virtio-blk modern/transitional PCI ids: 1af4:1001 or 1af4:1042
                assert any(d["id"]["vendor"] == 0x1AF4 and d["id"]["device"] in (0x1001, 0x1042)
                           for d in devices), devices
            finally:
                qmp.close()
            assert server.connected
            assert server.messages_seen["GET_CONFIG"] >= 1
            assert server.messages_seen["GET_PROTOCOL_FEATURES"] == 1
            server.check()
            assert proc.poll() is None
        finally:
            _kill(proc)
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode != 0


def _host_kernel() -> tuple[str, str] | None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    for k in reversed(kernels):
        initrd = k.replace("vmlinuz", "initrd.img")
        if os.access(k, os.R_OK) and os.access(initrd, os.R_OK):
            return k, initrd
    return None


class _Console:
    """Minimal serial console over QEMU's stdio: write a line, read until a marker."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.buf = b""
        os.set_blocking(proc.stdout.fileno(), False)

    def expect(self, marker: bytes, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {marker!r} on console; tail:\n"
                                     + self.buf[-3000:].decode(errors="replace"))
            chunk = self.proc.stdout.read(65536)
            if chunk:
                self.buf += chunk
            else:
                time.sleep(0.05)
        head, _, self.buf = self.buf.partition(marker)
        return head

    def run(self, cmd: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None
        tag = f"DONE{time.monotonic_ns()}"
        # The tag is assembled by the shell so the echoed command line cannot match it.
        self.proc.stdin.write(f"{cmd}; echo {tag[:4]}''{tag[4:]}:$?\n".encode())
        self.proc.stdin.flush()
        out = self.expect(tag.encode() + b":", timeout)
        rc = self.expect(b"\n", 10)
        return out.decode(errors="replace") + "rc=" + rc.decode().strip()


@pytest.mark.skipif(_host_kernel() is None, reason="no readable /boot kernel+initrd")
def test_guest_reads_and_writes_through_backend(rundir: Path) -> None:
    kernel_initrd = _host_kernel()
    assert kernel_initrd is not None
    kernel, initrd = kernel_initrd
    sock, image = rundir / "vu.sock", rundir / "disk.raw"
    pattern = bytes(range(256)) * 16  # 4 KiB
    with open(image, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(pattern)
    storage = FileStorage(image)
    server = VhostUserBlkServer(str(sock), storage, serial="pv-disk-0")
    server.start()
    proc = _qemu(
        [*_base_argv(sock, "768M"), "-kernel", kernel, "-initrd", initrd,
         "-append", "console=ttyS0 break=top quiet loglevel=0",
         "-serial", "stdio", "-no-reboot"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        con = _Console(proc)
        con.expect(b"(initramfs)", 180)
        con.run("modprobe virtio_pci; modprobe virtio_blk; sleep 1", 60)
        out = con.run("dd if=/dev/vda bs=4096 skip=256 count=1 2>/dev/null | md5sum", 60)
        import hashlib

        assert hashlib.md5(pattern).hexdigest() in out, out
        out = con.run("printf 'written-by-guest' | dd of=/dev/vda bs=512 seek=4 conv=fsync "
                      "2>/dev/null", 60)
        assert out.endswith("rc=0"), out
        out = con.run("cat /sys/block/vda/serial; cat /sys/block/vda/size", 30)
        assert "pv-disk-0" in out and "16384" in out, out
        server.check()
        stats = server.stats.to_dict()
        assert stats["requests"].get("IN", 0) >= 1
        assert stats["requests"].get("OUT", 0) >= 1
    finally:
        _kill(proc)
        server.stop()
        storage.close()
    with open(image, "rb") as f:
        f.seek(4 * 512)
        assert f.read(16) == b"written-by-guest"

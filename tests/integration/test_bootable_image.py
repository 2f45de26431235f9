"""The shipped bootable disk (recipe bookworm-cloud), booted the way a cloud boots an
instance: QEMU is given the disk and a firmware, nothing else (no -kernel, no -initrd,
no -append). SeaBIOS on ``pc`` runs the MBR's GRUB, OVMF on ``q35`` runs
EFI/BOOT/BOOTX64.EFI from the ESP; each GRUB finds the root by UUID, loads Debian's
kernel and initramfs, which finds the root on virtio-blk; systemd reaches its
multi-user target and cloud-init finishes with no datasource (none is attached). Every
stage is read off the serial console (SeaBIOS's hand-over off its debug port) and timed.

One boot per firmware through a per-test qcow2 overlay: the cached disk is never
written. The OVMF boot goes all the way to cloud-init's final message (about 2 min under
TCG); the SeaBIOS boot stops once systemd has started (about 40 s): past GRUB, the
kernel and the initramfs the two boots are the same, and make test's time is shared.
The image is built on first use (root, a few minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.guests.launch import create_overlay
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.images import BootableDisk, ensure_disk_image, load_recipe

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Seconds for a whole boot to cloud-init's final message under TCG (measured 123-130 s
#: on a 2-core host, -smp 2; each test prints its stage times): room for a loaded host.
BOOT_BUDGET = 900.0


@dataclass(frozen=True)
class Stage:
    name: str
    pattern: re.Pattern[str]
    #: Where it shows: the serial console, or the firmware's debug port (SeaBIOS
    #: writes nothing to the serial port).
    source: str = "console"


#: The firmware handing over to the disk's bootloader: SeaBIOS on its debug port,
#: OVMF on the console (its boot manager, starting the removable-media path).
FIRMWARE_STAGES = {
    "pc": Stage("firmware", re.compile(r"Booting from Hard Disk\.\.\."), "firmware"),
    "efi": Stage("firmware", re.compile(r'BdsDxe: starting Boot\d+ "UEFI Misc Device"')),
}


def _stages(disk: BootableDisk, platform: str, until: str) -> tuple[Stage, ...]:
    """What the console shows, in order, when each part of the boot has done its work,
    up to stage ``until``."""
    stages = (
        FIRMWARE_STAGES[platform],
        Stage("grub", re.compile(rf"pytest-virtio: GRUB \({platform}\) loading /vmlinuz")),
        Stage("kernel", re.compile(r"Linux version \d+\.\d+\S* .*\n.*Command line: "
                                   rf"BOOT_IMAGE=/vmlinuz root=UUID={disk.root_uuid} ")),
        Stage("root", re.compile(rf"EXT4-fs \(vda{disk.root_partition}\): mounted filesystem")),
        Stage("systemd", re.compile(r"Welcome to .*Debian GNU/Linux 12 \(bookworm\)")),
        Stage("network", re.compile(r"ci-info: \|\s+\S+\s+\|\s+True\s+\|\s+10\.0\.2\.15\s+\|")),
        Stage("target", re.compile(r"Reached target .*Multi-User System")),
        Stage("cloud-init", re.compile(r"Cloud-init v\. \S+ finished at .* "
                                       r"Datasource DataSourceNone\.")),
    )
    names = [stage.name for stage in stages]
    return stages[:names.index(until) + 1]


#: Lines that end a boot early, by where they show: the firmware found nothing to
#: boot (SeaBIOS; OVMF falling back to its shell), GRUB did not find the root (its
#: prompt), the kernel panicked or the initramfs gave up on the root. Each was seen
#: on a broken copy of the disk (MBR zeroed, BOOTX64.EFI deleted, root superblock
#: zeroed), so a broken boot fails in seconds, not after BOOT_BUDGET.
FATAL = {
    "console": re.compile(r"BdsDxe: failed to load|UEFI Interactive Shell|error: no such device"
                          r"|^grub> |grub rescue> |Kernel panic|ALERT! .* does not exist"
                          r"|Gave up waiting for root", re.MULTILINE),
    "firmware": re.compile(r"Boot failed|No bootable device"),
}


@dataclass(frozen=True)
class Firmware:
    id: str
    machine: str
    platform: str  # GRUB's ${grub_platform}
    #: The last stage this boot waits for.
    until: str = "cloud-init"

    def argv(self, run_dir: Path) -> list[str]:
        debug = ["-chardev", f"file,id=fw,path={run_dir / 'firmware.log'}",
                 "-device", "isa-debugcon,iobase=0x402,chardev=fw"]
        if self.platform == "pc":
            return debug  # QEMU's default firmware: SeaBIOS
        for path in (OVMF_CODE, OVMF_VARS):
            assert path.is_file(), f"{path} is missing: apt-get install ovmf"
        own_vars = run_dir / "OVMF_VARS.fd"  # each guest writes its own copy
        shutil.copyfile(OVMF_VARS, own_vars)
        return [*debug, "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={own_vars}"]


FIRMWARES = [Firmware("seabios-pc", "pc", "pc", until="systemd"),
             Firmware("ovmf-q35", "q35", "efi")]


@pytest.fixture(scope="module")
def cloud_disk(virtio_session: VirtioSession) -> BootableDisk:
    start = time.monotonic()
    disk = ensure_disk_image(load_recipe("bookworm-cloud"), virtio_session.settings.cache_dir,
                             virtio_session.progress)
    print(f"\nbookworm-cloud disk ready in {time.monotonic() - start:.0f}s: {disk.path} "
          f"({disk.path.stat().st_size / 2**20:.0f} MiB qcow2)")
    return disk


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r", "") if path.exists() else ""


def _wait_stages(run_dir: Path, stages: tuple[Stage, ...], qemu: subprocess.Popen[bytes],
                 start: float) -> dict[str, float]:
    """Seconds from QEMU's start to each stage's first line; fails at once on a fatal
    line or QEMU's exit, and after BOOT_BUDGET with the stages seen and the tail."""
    seen: dict[str, float] = {}
    while len(seen) < len(stages):
        logs = {"console": _read(run_dir / "console.log"),
                "firmware": _read(run_dir / "firmware.log")}
        text = logs["console"]
        for stage in stages:
            if stage.name not in seen and stage.pattern.search(logs[stage.source]):
                seen[stage.name] = time.monotonic() - start
        tail = "\n".join(text.splitlines()[-40:])
        for source, fatal in FATAL.items():
            died = fatal.search(logs[source])
            assert died is None, (f"the boot died: {died and died[0]!r} in {source}.log "
                                  f"(stages seen: {seen}); console tail:\n{tail}")
        assert qemu.poll() is None, f"QEMU exited {qemu.returncode} (stages {seen}):\n{tail}"
        assert time.monotonic() - start < BOOT_BUDGET, (
            f"no {[s.name for s in stages if s.name not in seen]} within {BOOT_BUDGET:.0f}s "
            f"(stages seen: {seen}); console tail:\n{tail}")
        time.sleep(0.5)
    return seen


@pytest.mark.parametrize("firmware", FIRMWARES, ids=[f.id for f in FIRMWARES])
def test_the_disk_boots_through_firmware_and_its_own_grub(
        cloud_disk: BootableDisk, virtio_session: VirtioSession, tmp_path: Path,
        firmware: Firmware, record_property: Callable[[str, object], None]) -> None:
    run_dir = tmp_path  # the logs stay there: console.log, firmware.log, qemu.stderr
    before = os.stat(cloud_disk.path)
    overlay = run_dir / "root.qcow2"
    create_overlay(overlay, cloud_disk.path, cloud_disk.format)
    console = run_dir / "console.log"
    argv = [virtio_session.qemu, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"{firmware.machine},accel=tcg", "-cpu", "max", "-smp", "2",
            "-m", "1024", *firmware.argv(run_dir),
            "-serial", f"file:{console}",
            "-drive", f"if=none,id=root,file={overlay},format=qcow2",
            "-device", "virtio-blk-pci,drive=root,bootindex=0",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            "-no-reboot"]
    with (run_dir / "qemu.stderr").open("wb") as stderr:
        start = time.monotonic()
        qemu = procs.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=stderr)
        try:
            seen = _wait_stages(run_dir, _stages(cloud_disk, firmware.platform, firmware.until),
                               qemu, start)
        finally:
            procs.stop(qemu)
    text = console.read_bytes().decode(errors="replace")
    times = ", ".join(f"{name} {at:.0f}s" for name, at in seen.items())
    print(f"\n{firmware.id}: {times} (wall, from QEMU's start)")
    if firmware.until == "cloud-init":
        uptime = re.search(r"Datasource DataSourceNone\.\s+Up ([\d.]+) seconds", text)
        assert uptime is not None, text[-2000:]
        print(f"cloud-init done at guest uptime {float(uptime[1]):.0f}s")
    for name, at in seen.items():
        record_property(f"{firmware.id}-{name}-s", round(at, 1))
    # each stage came after the one before it: GRUB, then Linux, root, systemd, ...
    assert sorted(seen.values()) == list(seen.values())
    assert "Failed to start" not in text  # no unit of the image failed on its way
    after = os.stat(cloud_disk.path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

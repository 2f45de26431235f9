"""qemu/capabilities.py: parsing (canned text) and the real installed QEMU 7.2.

The real-binary tests spawn ``qemu-system-x86_64 --version`` / ``-device help``
only (no guest), so they stay unit-fast; they skip when QEMU is not installed.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError, MissingToolError
from pytest_virtio.qemu import capabilities as caps
from pytest_virtio.spec import CdRom, Disk, MachineSpec, Nic, SerialPorts

REAL = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(REAL is None, reason="qemu-system-x86_64 not installed")

DEVICE_HELP = """\
Controller/Bridge/Hub devices:
name "pci-bridge", bus PCI, desc "Standard PCI Bridge"

Storage devices:
name "ich9-ahci", bus PCI, alias "ahci"
name "ide-hd", bus IDE, desc "virtual IDE disk"
name "virtio-blk-pci", bus PCI, alias "virtio-blk"
name "nvme", bus PCI, desc "Non-Volatile Memory Express"

Network devices:
name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
"""


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    """Fake binaries reuse names across tests; cached answers must not leak."""
    caps.qemu_version.cache_clear()
    caps.device_models.cache_clear()


def fake_qemu(tmp_path: Path, script: str) -> str:
    path = tmp_path / "qemu-fake"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n", (7, 2, 22)),
        ("QEMU emulator version 8.1.0\nCopyright (c) 2003-2023\n", (8, 1, 0)),
        ("QEMU emulator version 9.0 (v9.0-dirty)", (9, 0, 0)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert caps.parse_version(text) == expected


def test_parse_version_garbage() -> None:
    with pytest.raises(ConfigError, match="cannot read a QEMU version"):
        caps.parse_version("hello")


def test_parse_device_help_names_and_aliases() -> None:
    assert caps.parse_device_help(DEVICE_HELP) == {
        "pci-bridge", "ich9-ahci", "ahci", "ide-hd", "virtio-blk-pci", "virtio-blk", "nvme",
        "e1000", "e1000-82540em",
    }  # fmt: skip


def test_parse_device_help_ignores_headers() -> None:
    assert caps.parse_device_help("Storage devices:\n\n") == frozenset()


# --------------------------------------------------------------------------- fakes


def test_fake_binary_version_and_models(tmp_path: Path) -> None:
    binary = fake_qemu(
        tmp_path,
        'if [ "$1" = --version ]; then echo "QEMU emulator version 6.2.0"; exit 0; fi\n'
        f"cat <<'EOF'\n{DEVICE_HELP}EOF\n",
    )
    assert caps.qemu_version(binary) == (6, 2, 0)
    assert "ahci" in caps.device_models(binary)
    spec = MachineSpec(root_bus="ahci", disks=(Disk(bus="lsi"),), nics=(Nic(model="e1000"),))
    assert caps.missing_devices(spec, binary) == {"pvpanic", "lsi53c895a", "scsi-hd"}


def test_models_are_cached(tmp_path: Path) -> None:
    counter = tmp_path / "calls"
    binary = fake_qemu(tmp_path, f"echo x >> {counter}\ncat <<'EOF'\n{DEVICE_HELP}EOF\n")
    caps.device_models(binary)
    caps.device_models(binary)
    assert counter.read_text().count("x") == 1


def test_failing_binary_is_a_config_error(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path, "echo boom >&2; exit 3\n")
    with pytest.raises(ConfigError, match="exited 3: boom"):
        caps.device_models(binary)


def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(MissingToolError) as info:
        caps.qemu_version(str(tmp_path / "nope"))
    assert (info.value.tool, info.value.package) == ("qemu-system-x86_64", "qemu-system-x86")
    assert "apt-get install qemu-system-x86" in str(info.value)


# --------------------------------------------------------------------------- find_qemu


def test_find_qemu_explicit_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_qemu(tmp_path, "exit 0\n")
    monkeypatch.setenv(caps.ENV_VAR, "/definitely/not/here")
    assert caps.find_qemu(binary) == binary


def test_find_qemu_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_qemu(tmp_path, "exit 0\n")
    monkeypatch.setenv(caps.ENV_VAR, binary)
    assert caps.find_qemu(None) == binary


def test_find_qemu_bad_explicit_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="explicit qemu binary '/no/qemu'"):
        caps.find_qemu("/no/qemu")
    monkeypatch.setenv(caps.ENV_VAR, "/no/qemu")
    with pytest.raises(ConfigError, match="PYTEST_VIRTIO_QEMU '/no/qemu'"):
        caps.find_qemu()


def test_find_qemu_path_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(caps.ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="apt-get install qemu-system-x86"):
        caps.find_qemu()


# --------------------------------------------------------------------------- real QEMU


@needs_qemu
def test_real_qemu_found_and_versioned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(caps.ENV_VAR, raising=False)
    binary = caps.find_qemu()
    assert os.access(binary, os.X_OK)
    assert caps.qemu_version(binary) >= (7, 2, 0)


@needs_qemu
def test_real_qemu_has_every_catalogue_device() -> None:
    models = caps.device_models("qemu-system-x86_64")
    expected = {
        "virtio-blk-pci", "vhost-user-blk-pci", "virtio-scsi-pci", "scsi-hd", "scsi-cd",
        "ahci", "ich9-ahci", "ide-hd", "ide-cd", "lsi53c895a", "nvme", "virtio-net-pci",
        "e1000", "e1000e", "rtl8139", "virtio-balloon-pci", "virtio-rng-pci",
        "virtio-serial-pci", "virtserialport", "pvpanic",
    }  # fmt: skip
    assert expected <= models


@needs_qemu
def test_real_qemu_misses_nothing_for_a_full_spec() -> None:
    spec = MachineSpec(
        root_bus="ahci",
        disks=tuple(Disk(name=f"d{i}", bus=b) for i, b in enumerate(
            ("virtio-blk", "vhost-user-blk", "virtio-scsi", "ide", "lsi", "nvme"))),
        nics=tuple(Nic(model=m, name=f"n{i}") for i, m in enumerate(
            ("virtio-net", "e1000", "e1000e", "rtl8139"))),
        devices=(SerialPorts(), CdRom(iso="/x", bus="scsi")),
    )  # fmt: skip
    assert caps.missing_devices(spec) == frozenset()

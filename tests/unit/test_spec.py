"""pytest_virtio.spec: golden argv per device kind, validation messages, marker input, matrix.

Goldens live in tests/unit/golden/<case>.argv (one argument per line). To accept
an intended change: PYTEST_VIRTIO_UPDATE_GOLDENS=1 pytest tests/unit/test_spec.py,
then review the diff. tests/integration/test_argv_accepted.py proves QEMU takes
the same argv.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pytest_virtio import spec as S
from pytest_virtio.errors import ConfigError
from pytest_virtio.spec import (
    Balloon,
    CdRom,
    Disk,
    LaunchContext,
    MachineSpec,
    Nic,
    Pvpanic,
    Rng,
    SerialPorts,
    apply_matrix,
    device_argv,
    hotplug_commands,
    hotplug_props,
    matrix_params,
    required_qemu_devices,
    spec_from_kwargs,
    to_argv,
)
from pytest_virtio.spec.argv import qemu_name

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PYTEST_VIRTIO_UPDATE_GOLDENS") == "1"


def _load_cases() -> ModuleType:
    loader_spec = importlib.util.spec_from_file_location("pv_golden_cases", GOLDEN / "cases.py")
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


cases = _load_cases()


def ctx_for(spec: MachineSpec, **changes: Any) -> LaunchContext:
    base: LaunchContext = cases.context_for(spec)
    return dataclasses.replace(base, **changes)


def argv(spec: MachineSpec, **changes: Any) -> list[str]:
    return to_argv(spec, ctx_for(spec, **changes))


def device_args(spec: MachineSpec) -> list[str]:
    """The values of every -device in the argv."""
    full = argv(spec)
    return [full[i + 1] for i, a in enumerate(full) if a == "-device"]


# --------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("case", sorted(cases.CASES))
def test_golden_argv(case: str) -> None:
    spec = cases.CASES[case]
    text = "\n".join(to_argv(spec, cases.context_for(spec))) + "\n"
    path = GOLDEN / f"{case}.argv"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden {path.name}: run with PYTEST_VIRTIO_UPDATE_GOLDENS=1"
    assert text == path.read_text()


def test_no_stale_goldens() -> None:
    """A golden without a case is dead weight that reviewers would still read."""
    on_disk = {p.stem for p in GOLDEN.glob("*.argv")}
    assert on_disk == set(cases.CASES)


def test_goldens_cover_every_kind() -> None:
    specs = list(cases.CASES.values())
    assert {s.root_bus for s in specs} == set(S.ROOT_BUSES)
    assert {d.bus for s in specs for d in s.disks} == set(S.DISK_BUSES)
    assert {n.model for s in specs for n in s.nics} == set(S.NIC_MODELS)
    assert {type(d) for s in specs for d in s.devices} == {
        Balloon,
        Rng,
        SerialPorts,
        CdRom,
        Pvpanic,
    }
    assert {c.bus for s in specs for c in s.devices if isinstance(c, CdRom)} == set(S.CDROM_BUSES)
    transports = {
        d.transport
        for s in specs
        for d in (*s.disks, *s.nics, *s.devices)
        if hasattr(d, "transport")
    }
    assert transports == set(S.TRANSPORTS)
    assert {n.backend for s in specs for n in s.nics} == set(S.NET_BACKENDS)


# --------------------------------------------------------------------------- argv details


def test_base_argv_shape() -> None:
    spec = MachineSpec(memory="1G", smp=2)
    full = argv(spec, accel="kvm")
    assert full[0] == "qemu-system-x86_64"
    assert full[full.index("-cpu") + 1] == "host"
    assert full[full.index("-m") + 1] == "1024M"
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in full
    assert full[full.index("-machine") + 1] == "pc,accel=kvm,memory-backend=mem"
    assert full[full.index("-append") + 1] == "console=ttyS0 root=/dev/vda rw"
    assert argv(spec)[argv(spec).index("-cpu") + 1] == "max"


def test_argv_is_deterministic_and_pure() -> None:
    spec = cases.CASES["disks-mixed"]
    assert argv(spec) == argv(spec)


def test_commas_in_paths_are_escaped() -> None:
    spec = MachineSpec(disks=(Disk(bus="virtio-blk"),))
    full = argv(spec, disk_files={"disk0": "/a,b/d.img"}, root_image="/r,1.img")
    assert "if=none,id=drv-disk0,file=/a,,b/d.img,format=raw,cache=none,readonly=off" in full
    assert any("file=/r,,1.img," in a for a in full)


def test_extra_args_come_last() -> None:
    spec = MachineSpec(extra_args=("-rtc", "base=utc"), nics=(Nic(),))
    assert argv(spec)[-2:] == ["-rtc", "base=utc"]


def test_ids_follow_names() -> None:
    spec = MachineSpec(disks=(Disk(name="data", bus="virtio-blk"),), nics=(Nic(name="lan"),))
    devices = device_args(spec)
    assert "virtio-blk-pci,drive=drv-data,id=data,serial=data" in devices
    assert any(d.startswith("virtio-net-pci,netdev=lan,id=lan-dev,") for d in devices)


def test_vhost_user_blk_has_no_drive_and_no_serial() -> None:
    spec = MachineSpec(disks=(Disk(bus="vhost-user-blk", serial="S1", num_queues=2),))
    full = argv(spec)
    assert not any("drv-disk0" in a for a in full)
    assert "vhost-user-blk-pci,chardev=vu-disk0,id=disk0,num-queues=2" in full
    assert f"socket,id=vu-disk0,path={cases.FAKE_DIR}/vu-disk0.sock" in full


def test_controllers_emitted_once() -> None:
    spec = MachineSpec(
        root_bus="ahci",
        disks=(
            Disk(name="a", bus="ahci"),
            Disk(name="s1", bus="virtio-scsi"),
            Disk(name="s2", bus="virtio-scsi"),
            Disk(name="l", bus="lsi"),
        ),
    )
    devices = device_args(spec)
    assert devices.count("ahci,id=ahci0") == 1
    assert devices.count("lsi53c895a,id=lsi0") == 1
    assert sum(d.startswith("virtio-scsi-pci") for d in devices) == 1
    assert "ide-hd,bus=ahci0.0,drive=drv-root,id=root" in devices
    assert "ide-hd,bus=ahci0.1,drive=drv-a,id=a,serial=a" in devices


def test_ide_slots_in_order() -> None:
    spec = cases.CASES["disks-ide-full"]
    devices = device_args(spec)
    assert "ide-hd,bus=ide.0,unit=0,drive=drv-root,id=root" in devices
    assert "ide-hd,bus=ide.0,unit=1,drive=drv-d1,id=d1,serial=d1" in devices
    assert "ide-hd,bus=ide.1,unit=0,drive=drv-d2,id=d2,serial=d2" in devices
    assert "ide-cd,bus=ide.1,unit=1,drive=drv-cd0,id=cd0" in devices


def test_virtio_scsi_controller_options_from_disks() -> None:
    spec = MachineSpec(
        disks=(
            Disk(name="a", bus="virtio-scsi", num_queues=2, queue_size=64, transport="modern"),
            Disk(name="b", bus="virtio-scsi"),
        )
    )
    devices = device_args(spec)
    assert (
        "virtio-scsi-pci,id=scsi0,num_queues=2,virtqueue_size=64,"
        "disable-legacy=on,disable-modern=off"
    ) in devices


def test_virtio_scsi_conflicting_controller_options() -> None:
    with pytest.raises(ConfigError, match="share one controller"):
        MachineSpec(
            disks=(
                Disk(name="a", bus="virtio-scsi", num_queues=2),
                Disk(name="b", bus="virtio-scsi", num_queues=4),
            )
        )


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("modern", "disable-legacy=on,disable-modern=off"),
        ("legacy", "disable-modern=on,disable-legacy=off"),
    ],
)
def test_transport_props(transport: str, expected: str) -> None:
    spec = MachineSpec(
        disks=(Disk(bus="virtio-blk", transport=transport),),
        nics=(Nic(transport=transport),),
        devices=(Rng(transport=transport),),
    )
    devices = device_args(spec)
    assert sum(d.endswith(expected) for d in devices) == 3


def test_nvme_gets_a_serial() -> None:
    assert "nvme,drive=drv-root,id=root,serial=root" in device_args(MachineSpec(root_bus="nvme"))
    spec = MachineSpec(disks=(Disk(bus="nvme", num_queues=4),))
    assert "nvme,drive=drv-disk0,id=disk0,serial=disk0,max_ioqpairs=4" in device_args(spec)


def test_nic_macs_unique_and_hostfwd() -> None:
    spec = MachineSpec(nics=(Nic(name="a"), Nic(name="b", hostfwd_ssh=False)))
    full = argv(spec)
    assert "user,id=a,hostfwd=tcp:127.0.0.1:0-:22" in full
    assert "user,id=b" in full
    macs = [a.split("mac=")[1][:17] for a in full if "mac=" in a]
    assert macs == ["52:54:00:12:34:56", "52:54:00:12:34:57"]


def test_passt_nic_streams_to_its_socket_and_forwards_nothing_itself() -> None:
    """A passt NIC's netdev is a stream client of the NIC's socket: the SSH forward
    is passt's (no hostfwd), and a user NIC beside it keeps its own."""
    spec = MachineSpec(nics=(Nic(backend="passt"), Nic(name="b", model="e1000")))
    full = argv(spec, net_sockets={"net0": "/r/p,0.sock"})
    assert "stream,id=net0,server=off,addr.type=unix,addr.path=/r/p,,0.sock" in full
    assert "user,id=b,hostfwd=tcp:127.0.0.1:0-:22" in full
    assert not any("hostfwd" in a and "net0" in a for a in full)
    assert device_argv(spec.nics[0], ctx_for(spec, net_sockets={"net0": "/s"}), spec)[1] == (
        "stream,id=net0,server=off,addr.type=unix,addr.path=/s")


def test_tap_nic_is_its_inherited_fd_and_forwards_nothing_itself() -> None:
    """A tap NIC's netdev is the tap descriptor the host opened (QEMU inherits it):
    no hostfwd, no ifname or script; a missing descriptor names the NIC and the field."""
    spec = MachineSpec(nics=(Nic(backend="tap"), Nic(name="b", model="e1000")))
    full = argv(spec, net_fds={"net0": 7})
    assert "tap,id=net0,fd=7" in full
    assert "user,id=b,hostfwd=tcp:127.0.0.1:0-:22" in full
    with pytest.raises(ConfigError, match="net_fds has no entry for 'net0'"):
        argv(spec, net_fds={})
    _raises(lambda: Nic(backend="tap", queues=2), "None, 1", "tap")


def test_nic_backend_is_validated_naming_the_key() -> None:
    message = _raises(lambda: Nic(backend="vde"), "user", "passt", "tap")
    assert "nic 'net0': backend 'vde'" in message
    assert Nic().backend == "user"  # the default stays QEMU's user-mode network
    _raises(lambda: Nic(backend="passt", queues=2), "None, 1", "passt")
    spec = spec_from_kwargs({"nics": [{"model": "e1000", "backend": "passt"}]})
    assert spec.nics[0].backend == "passt"
    with pytest.raises(ConfigError, match="backend 'slirp' is not valid"):
        spec_from_kwargs({"nics": [{"backend": "slirp"}]})


def test_pvpanic_device_is_not_duplicated() -> None:
    assert argv(MachineSpec(devices=(Pvpanic(),))).count("pvpanic") == 1


def test_readonly_and_cache_on_drive() -> None:
    spec = MachineSpec(disks=(Disk(bus="virtio-scsi", readonly=True, cache="unsafe"),))
    assert any(a.endswith("format=raw,cache=unsafe,readonly=on") for a in argv(spec))


def test_user_image_used_when_context_has_no_file() -> None:
    disk = Disk(bus="virtio-blk", image="/img/u.qcow2", format="qcow2")
    spec = MachineSpec(disks=(disk,))
    full = argv(spec, disk_files={})
    assert "if=none,id=drv-disk0,file=/img/u.qcow2,format=qcow2,cache=none,readonly=off" in full


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (MachineSpec(disks=(Disk(bus="virtio-blk"),)), "disk_files"),
        (MachineSpec(disks=(Disk(),)), "vhost_sockets"),
        (MachineSpec(root_bus="vhost-user-blk"), "vhost_sockets"),
        (MachineSpec(devices=(SerialPorts(),)), "serial_sockets"),
        (MachineSpec(nics=(Nic(backend="passt"),)), "net_sockets"),
    ],
)
def test_missing_context_entry_is_clear(spec: MachineSpec, field: str) -> None:
    with pytest.raises(ConfigError, match=f"LaunchContext.{field} has no entry"):
        argv(spec, **{field: {}})


def test_device_argv_matches_to_argv_fragment() -> None:
    spec = cases.CASES["disks-mixed"]
    ctx = cases.context_for(spec)
    full = " ".join(to_argv(spec, ctx))
    for item in (*spec.disks, *spec.nics, *spec.devices):
        assert " ".join(device_argv(item, ctx, spec)) in full
    lone = device_argv(Disk(bus="ide"), cases.context_for(MachineSpec(disks=(Disk(bus="ide"),))))
    assert lone[-1] == "ide-hd,bus=ide.0,unit=0,drive=drv-disk0,id=disk0,serial=disk0"
    assert device_argv(Pvpanic(), ctx) == ["-device", "pvpanic"]


# --------------------------------------------------------------------------- catalogue


def test_root_modules_cover_every_root_bus() -> None:
    assert set(S.ROOT_MODULES) == set(S.ROOT_BUSES)
    assert S.ROOT_MODULES["vhost-user-blk"] == S.ROOT_MODULES["virtio-blk"]
    assert S.ROOT_MODULES["ide"] == ("ata_piix", "sd_mod")


def test_expected_driver_covers_every_bus_and_model() -> None:
    assert set(S.DISK_BUSES) | set(S.NIC_MODELS) <= set(S.EXPECTED_DRIVER)
    assert S.EXPECTED_DRIVER["rtl8139"] == "8139cp"
    assert S.EXPECTED_DRIVER["virtio-serial"] == "virtio_console"


def test_required_qemu_devices() -> None:
    spec = MachineSpec(
        root_bus="ahci",
        disks=(Disk(bus="lsi"),),
        nics=(Nic(model="e1000e"),),
        devices=(CdRom(iso="/x", bus="scsi"), SerialPorts(), Balloon(), Rng()),
    )
    assert required_qemu_devices(spec) == {
        "pvpanic",
        "ahci",
        "ide-hd",
        "lsi53c895a",
        "scsi-hd",
        "e1000e",
        "virtio-scsi-pci",
        "scsi-cd",
        "virtio-serial-pci",
        "virtserialport",
        "virtio-balloon-pci",
        "virtio-rng-pci",
    }
    assert required_qemu_devices(MachineSpec()) == {"pvpanic", "virtio-blk-pci"}


def test_every_argv_model_is_required() -> None:
    """Whatever -device model to_argv emits appears in required_qemu_devices."""
    for spec in cases.CASES.values():
        models = {d.split(",")[0] for d in device_args(spec)}
        assert models <= required_qemu_devices(spec)


# --------------------------------------------------------------------------- validation


def _raises(fn: Any, *choices: str) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    for choice in choices:
        assert repr(choice) in message or choice in message, message
    return message


def test_bad_bus_lists_buses() -> None:
    _raises(lambda: Disk(bus="floppy"), *S.DISK_BUSES)


def test_bad_cache_format_transport_list_choices() -> None:
    _raises(lambda: Disk(cache="fast"), *S.CACHE_MODES)
    _raises(lambda: Disk(bus="virtio-blk", format="vmdk"), *S.DISK_FORMATS)
    _raises(lambda: Disk(transport="pci"), *S.TRANSPORTS)


def test_bad_nic_model_lists_models() -> None:
    _raises(lambda: Nic(model="ne2k"), *S.NIC_MODELS)


def test_bad_machine_and_root_bus() -> None:
    _raises(lambda: MachineSpec(machine="microvm"), *S.MACHINES)
    _raises(lambda: MachineSpec(root_bus="floppy"), *S.ROOT_BUSES)


def test_cdrom_bus_and_iso() -> None:
    _raises(lambda: CdRom(iso="/x", bus="usb"), *S.CDROM_BUSES)
    _raises(lambda: CdRom(), "iso=")


@pytest.mark.parametrize("bus", ["ide", "ahci", "lsi", "nvme"])
def test_transport_on_non_virtio_bus(bus: str) -> None:
    _raises(
        lambda: Disk(bus=bus, transport="modern"), "virtio-blk", "vhost-user-blk", "virtio-scsi"
    )


@pytest.mark.parametrize("bus", ["ide", "ahci", "lsi"])
def test_queue_options_on_emulated_bus(bus: str) -> None:
    _raises(lambda: Disk(bus=bus, num_queues=2), "virtio-blk", "nvme")
    _raises(lambda: Disk(bus=bus, queue_size=128), "virtio-blk", "virtio-scsi")


def test_queue_size_on_nvme_and_bad_values() -> None:
    _raises(lambda: Disk(bus="nvme", queue_size=128), "virtio-blk")
    _raises(lambda: Disk(bus="virtio-blk", queue_size=100), "power of two")
    _raises(lambda: Disk(bus="virtio-blk", num_queues=0), "1..64")
    _raises(lambda: Disk(bus="virtio-blk", num_queues=True), "1..64")


@pytest.mark.parametrize("bus", ["virtio-blk", "vhost-user-blk"])
def test_ring_features_can_be_switched_off(bus: str) -> None:
    disk = Disk(name="d1", bus=bus, event_idx=False, indirect_desc=False)
    (dev,) = [d for d in device_args(MachineSpec(disks=(disk,))) if "id=d1" in d]
    assert ",event_idx=off,indirect_desc=off" in dev
    _, device = hotplug_props(disk, cases.context_for(MachineSpec(disks=(disk,))))
    assert device["event_idx"] is False and device["indirect_desc"] is False
    on = Disk(name="d1", bus=bus)
    assert not any("event_idx" in d for d in device_args(MachineSpec(disks=(on,))))


@pytest.mark.parametrize("bus", ["virtio-scsi", "ide", "nvme"])
def test_ring_features_only_on_virtio_blk_devices(bus: str) -> None:
    _raises(lambda: Disk(bus=bus, event_idx=False), "event_idx", "virtio-blk", "vhost-user-blk")
    _raises(lambda: Disk(bus=bus, indirect_desc=False), "indirect_desc")
    _raises(lambda: Disk(bus="virtio-blk", event_idx="off"), "True or False")  # type: ignore[arg-type]


def test_logical_block_size_validation() -> None:
    assert Disk(logical_block_size=4096).logical_block_size == 4096
    _raises(lambda: Disk(logical_block_size=8192), "logical_block_size", "512", "4096")
    _raises(lambda: Disk(logical_block_size=True), "logical_block_size")  # type: ignore[arg-type]
    _raises(lambda: Disk(bus="ide", logical_block_size=4096), "logical_block_size", "512")
    _raises(lambda: Disk(external_socket="/x.sock", logical_block_size=4096), "in-process")


def test_vhost_user_blk_restrictions() -> None:
    _raises(lambda: Disk(image="/x.qcow2", format="qcow2"), "'raw'")
    _raises(lambda: Disk(cache="writeback"), "'none'")
    _raises(lambda: Disk(discard=True), "virtio-blk")
    _raises(lambda: Disk(bus="virtio-blk", reconnect=1), "vhost-user-blk")
    assert Disk(readonly=True).readonly  # fine: the backend enforces it


def test_qcow2_needs_an_image() -> None:
    _raises(lambda: Disk(bus="virtio-blk", format="qcow2"), "image=")


def test_readonly_ide_refused() -> None:
    _raises(lambda: Disk(bus="ide", readonly=True), "virtio-blk", "CdRom")


def test_too_many_ide_units() -> None:
    disks = tuple(Disk(name=f"d{i}", bus="ide") for i in range(3))
    MachineSpec(root_bus="ide", disks=disks)
    _raises(lambda: MachineSpec(root_bus="ide", disks=disks, devices=(CdRom(iso="/x"),)), "4")


def test_too_many_ahci_and_lsi_units() -> None:
    _raises(lambda: MachineSpec(disks=tuple(Disk(name=f"d{i}", bus="ahci") for i in range(7))), "6")
    _raises(lambda: MachineSpec(disks=tuple(Disk(name=f"d{i}", bus="lsi") for i in range(8))), "7")


def test_ide_needs_pc_machine() -> None:
    _raises(lambda: MachineSpec(machine="q35", root_bus="ide"), "ahci")
    _raises(lambda: MachineSpec(machine="q35", devices=(CdRom(iso="/x"),)), "ahci")


def test_duplicate_names() -> None:
    _raises(lambda: MachineSpec(disks=(Disk(), Disk())), "duplicate", "disk0")
    _raises(lambda: MachineSpec(disks=(Disk(name="x"),), nics=(Nic(name="x"),)), "duplicate")
    _raises(lambda: MachineSpec(devices=(Balloon(), Balloon(name="b2"))), "one balloon")
    _raises(lambda: Balloon(deflate_on_oom="yes"), "deflate_on_oom", "True or False")  # type: ignore[arg-type]
    _raises(lambda: spec_from_kwargs({"devices": [{"kind": "balloon", "free_page_reporting": 1}]}),
            "@pytest.mark.vm", "free_page_reporting")
    _raises(lambda: MachineSpec(devices=(SerialPorts(), SerialPorts(name="v2"))), "port names")


def test_bad_names() -> None:
    _raises(lambda: Disk(name="root"), "reserved")
    _raises(lambda: Disk(name="a b"), "letter")
    _raises(lambda: Disk(name="a" * 21), "20 characters")
    _raises(lambda: Disk(serial="has,comma"), "serial")
    _raises(lambda: SerialPorts(names=()), "1..30")
    _raises(lambda: SerialPorts(names=("a b",)), "port name")


def test_memory_and_smp() -> None:
    assert MachineSpec(memory=256 << 20).memory == 256
    _raises(lambda: MachineSpec(memory="lots"), "64M")
    _raises(lambda: MachineSpec(memory="32M"), "64M..64G")
    _raises(lambda: MachineSpec(memory="1000K"), "MiB")
    # One size grammar (units.parse_size): a fraction QEMU's -m takes is taken when
    # it comes out in whole MiB, as memory needs; one that does not is refused.
    assert MachineSpec(memory="1.5G").memory == 1536
    assert MachineSpec(memory="2GiB").memory == 2048
    _raises(lambda: MachineSpec(memory="64.3M"), "whole number of MiB", "64.3M")
    _raises(lambda: MachineSpec(memory="0"), "memory must be positive")
    _raises(lambda: MachineSpec(memory=True), "memory must be like", "True")  # type: ignore[arg-type]


def test_memory_is_parsed_once_into_mib() -> None:
    """Equal machines are equal and hash equal however their memory was spelled, so a
    shared-guest pool or a snapshot template keyed on the spec boots one guest, not two."""
    spellings = ("1G", "1024M", "1GiB", 1 << 30, 1024)
    specs = [MachineSpec(memory=m) for m in spellings]  # type: ignore[arg-type]
    assert {s.memory for s in specs} == {1024}
    assert all(s == specs[0] for s in specs)
    assert len({hash(s) for s in specs}) == 1
    assert len({specs[0]: "template", specs[1]: "template"}) == 1
    assert MachineSpec().memory == 512 == MachineSpec(memory="512M").memory
    # Read again by replace/merge (re-validation), the MiB count stays what it was.
    assert specs[0].replace(smp=2).memory == 1024
    assert specs[0].merge(nics=(Nic(),)) == MachineSpec(memory="1G", nics=(Nic(),))
    # A bare number is MiB up to 64G (as QEMU's -m reads it), else bytes: never both.
    assert MachineSpec(memory=64).memory == 64 and MachineSpec(memory=64 << 20).memory == 64
    _raises(lambda: MachineSpec(memory=63), "64M..64G", "63")
    _raises(lambda: MachineSpec(memory=(64 << 10) + 1), "whole number of MiB", "65537")
    _raises(lambda: MachineSpec(memory=0), "memory must be positive")


def test_disk_size_uses_the_one_size_grammar() -> None:
    assert Disk(size="1.5G").size_bytes == 3 << 29
    assert Disk(size="512KiB").size_bytes == 512 << 10
    _raises(lambda: Disk(size="0"), "disk 'disk0': size must be positive")
    _raises(lambda: Disk(size="-1M"), "disk 'disk0': size must be like", "-1M")
    _raises(lambda: MachineSpec(smp=0), "1..8")
    _raises(lambda: MachineSpec(smp=9), "1..8")


def test_nic_options() -> None:
    _raises(lambda: Nic(model="e1000", transport="modern"), "virtio-net")
    _raises(lambda: Nic(queues=2), "None, 1", "user-mode")
    _raises(lambda: Nic(model="rtl8139", queues=1), "virtio-net")
    _raises(lambda: Nic(mac="nope"), "52:54:00")


def test_wrong_types_in_spec() -> None:
    _raises(lambda: MachineSpec(disks=("ide",)), "Disk")  # type: ignore[arg-type]
    _raises(lambda: MachineSpec(nics=("e1000",)), "Nic")  # type: ignore[arg-type]
    _raises(lambda: MachineSpec(devices=("rng",)), *S.DEVICE_KINDS)  # type: ignore[arg-type]
    _raises(lambda: MachineSpec(kernel_args=(1,)), "strings")  # type: ignore[arg-type]


def test_context_validation() -> None:
    good = cases.context_for(MachineSpec())
    _raises(lambda: dataclasses.replace(good, accel="hvf"), "kvm", "tcg")
    _raises(lambda: dataclasses.replace(good, root_format="vmdk"), "raw", "qcow2")


def test_specs_are_frozen_and_hashable() -> None:
    spec: MachineSpec = cases.CASES["disks-mixed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.smp = 2  # type: ignore[misc]
    assert hash(spec) == hash(dataclasses.replace(spec))


def test_replace_and_merge() -> None:
    spec = MachineSpec(nics=(Nic(),))
    assert spec.replace(smp=2).smp == 2
    merged = spec.merge(disks=(Disk(),), nics=(Nic(name="net1"),), memory="1G")
    assert [n.name for n in merged.nics] == ["net0", "net1"]
    assert merged.disks == (Disk(),) and merged.memory == 1024
    _raises(lambda: spec.replace(smp=99), "1..8")


# --------------------------------------------------------------------------- marker input


def test_spec_from_kwargs_plain_data() -> None:
    spec = spec_from_kwargs(
        {
            "disks": [{"bus": "ide", "size": "32M"}, "virtio-blk", Disk(name="mine")],
            "nics": ["e1000"],
            "devices": [
                "balloon",
                "rng",
                {"kind": "serial", "names": ["a.b"]},
                {"kind": "cdrom", "iso": "/x.iso"},
                "pvpanic",
            ],
            "memory": "1G",
            "smp": 2,
            "machine": "pc",
            "root_bus": "virtio-scsi",
            "kernel_args": ["quiet"],
            "extra_args": ["-rtc", "base=utc"],
        }
    )
    assert [(d.name, d.bus) for d in spec.disks] == [
        ("disk0", "ide"),
        ("disk1", "virtio-blk"),
        ("mine", "vhost-user-blk"),
    ]
    assert spec.disks[0].size == "32M"
    assert spec.nics == (Nic(model="e1000", name="net0"),)
    assert spec.devices == (
        Balloon(),
        Rng(),
        SerialPorts(names=("a.b",)),
        CdRom(iso="/x.iso"),
        Pvpanic(),
    )
    assert spec.kernel_args == ("quiet",) and spec.extra_args == ("-rtc", "base=utc")


def test_spec_from_kwargs_single_items_and_empty() -> None:
    assert spec_from_kwargs({}) == MachineSpec()
    assert spec_from_kwargs({"disks": "ide", "nics": "rtl8139"}).disks[0].bus == "ide"


def test_spec_from_kwargs_unknown_key_names_marker_and_allowed() -> None:
    message = _raises(
        lambda: spec_from_kwargs({"disk": ["ide"]}, where="virtio"),
        "@pytest.mark.virtio",
        "'disk'",
        "'disks'",
        "'nics'",
        "'devices'",
    )
    assert "'memory'" in message


def test_spec_from_kwargs_bad_values() -> None:
    _raises(lambda: spec_from_kwargs({"disks": ["floppy"]}), "disks[0]", *S.DISK_BUSES)
    _raises(lambda: spec_from_kwargs({"nics": ["ne2k"]}), "nics[0]", *S.NIC_MODELS)
    _raises(lambda: spec_from_kwargs({"devices": ["gpu"]}), "devices[0]", *S.DEVICE_KINDS)
    _raises(lambda: spec_from_kwargs({"devices": [{"names": []}]}), "'kind'")
    _raises(
        lambda: spec_from_kwargs({"disks": [{"bus": "ide", "sise": "1G"}]}),
        "'sise'",
        "'size'",
        "'bus'",
    )
    _raises(lambda: spec_from_kwargs({"devices": [{"kind": "rng", "file": "/x"}]}), "'file'")
    _raises(lambda: spec_from_kwargs({"disks": [3]}), "disks[0]")
    message = _raises(lambda: spec_from_kwargs({"smp": 0}, where="vm"), "@pytest.mark.vm")
    assert "1..8" in message


# --------------------------------------------------------------------------- matrix


def test_matrix_ids_and_product() -> None:
    params = matrix_params({"disk": ["ahci", "ide"], "nic": ["e1000", "virtio-net"]})
    assert [pid for pid, _ in params] == [
        "disk=ahci-nic=e1000",
        "disk=ahci-nic=virtio-net",
        "disk=ide-nic=e1000",
        "disk=ide-nic=virtio-net",
    ]
    assert params[0][1] == {"disk": "ahci", "nic": "e1000"}
    assert matrix_params({"root_bus": ["nvme"]}) == [("root_bus=nvme", {"root_bus": "nvme"})]


def test_matrix_validation() -> None:
    _raises(lambda: matrix_params({"gpu": ["x"]}), *S.MATRIX_AXES)
    _raises(lambda: matrix_params({"disk": ["floppy"]}), *S.DISK_BUSES)
    _raises(lambda: matrix_params({"nic": ["ne2k"]}), *S.NIC_MODELS)
    _raises(lambda: matrix_params({"disk": []}), "at least one value")
    _raises(lambda: matrix_params({"disk": ["ide", "ide"]}), "repeats")
    _raises(lambda: matrix_params({}), *S.MATRIX_AXES)


def test_apply_matrix_adds_or_replaces() -> None:
    empty = MachineSpec()
    applied = apply_matrix(empty, {"disk": "ahci", "nic": "e1000", "root_bus": "nvme"})
    assert applied.disks == (Disk(name="disk0", bus="ahci"),)
    assert applied.nics == (Nic(model="e1000", name="net0"),)
    assert applied.root_bus == "nvme"
    spec = MachineSpec(
        disks=(Disk(name="a", bus="virtio-blk", num_queues=4, transport="modern"), Disk(name="b")),
        nics=(Nic(transport="legacy"), Nic(name="n2")),
    )
    changed = apply_matrix(spec, {"disk": "ide", "nic": "rtl8139"})
    assert changed.disks[0] == Disk(name="a", bus="ide")  # virtio-only options dropped
    assert changed.disks[1] == Disk(name="b")
    assert changed.nics[0] == Nic(model="rtl8139") and changed.nics[1].name == "n2"
    kept = apply_matrix(spec, {"disk": "vhost-user-blk"}).disks[0]
    assert (kept.num_queues, kept.transport) == (4, "modern")


def test_apply_matrix_cannot_express() -> None:
    spec = MachineSpec(disks=(Disk(bus="virtio-blk", image="/x.qcow2", format="qcow2"),))
    _raises(lambda: apply_matrix(spec, {"disk": "vhost-user-blk"}), "'raw'")
    _raises(lambda: apply_matrix(MachineSpec(), {"gpu": "x"}), *S.MATRIX_AXES)


# --------------------------------------------------------------------------- hotplug


def test_hotplug_virtio_blk() -> None:
    disk = Disk(
        name="hot",
        bus="virtio-blk",
        cache="writethrough",
        num_queues=2,
        transport="legacy",
        discard=True,
    )
    ctx = cases.context_for(MachineSpec(disks=(disk,)))
    backend, device = hotplug_props(disk, ctx)
    assert backend == {
        "node-name": "drv-hot",
        "driver": "raw",
        "read-only": False,
        "cache": {"direct": False, "no-flush": False},
        "discard": "unmap",
        "file": {"driver": "file", "filename": f"{cases.FAKE_DIR}/disk-hot.img"},
    }
    assert device == {
        "driver": "virtio-blk-pci",
        "id": "hot",
        "drive": "drv-hot",
        "write-cache": "off",
        "serial": "hot",
        "num-queues": 2,
        "disable-legacy": "off",
        "disable-modern": True,
    }


def test_hotplug_scsi_and_vhost_user() -> None:
    scsi = Disk(name="hs", bus="virtio-scsi", cache="unsafe")
    vhost = Disk(name="hv", reconnect=2)
    ctx = cases.context_for(MachineSpec(disks=(scsi, vhost)))
    backend, device = hotplug_props(scsi, ctx)
    assert backend["cache"] == {"direct": False, "no-flush": True}
    assert device == {
        "driver": "scsi-hd",
        "id": "hs",
        "drive": "drv-hs",
        "bus": "scsi0.0",
        "serial": "hs",
    }
    commands = hotplug_commands(vhost, ctx)
    assert [c for c, _ in commands] == ["chardev-add", "device_add"]
    chardev = commands[0][1]
    assert chardev["id"] == "vu-hv"
    assert chardev["backend"]["data"]["reconnect"] == 2
    assert chardev["backend"]["data"]["addr"]["data"]["path"] == f"{cases.FAKE_DIR}/vu-hv.sock"
    assert commands[1][1] == {"driver": "vhost-user-blk-pci", "id": "hv", "chardev": "vu-hv"}


@pytest.mark.parametrize("bus", ["ide", "ahci", "lsi", "nvme"])
def test_hotplug_refused_on_emulated_buses(bus: str) -> None:
    disk = Disk(bus=bus)
    ctx = cases.context_for(MachineSpec(disks=(disk,)))
    _raises(lambda: hotplug_props(disk, ctx), "virtio-blk", "vhost-user-blk", "virtio-scsi")


# --------------------------------------------------------------------------- modules


def test_initramfs_modules_default_and_explicit() -> None:
    assert MachineSpec().root_modules == S.ROOT_MODULES["virtio-blk"]
    assert MachineSpec(root_bus="nvme").root_modules == ("nvme",)
    lacking = S.spec_from_kwargs({"initramfs_modules": ["virtio_pci"]})
    assert lacking.initramfs_modules == ("virtio_pci",)
    assert lacking.root_modules == ("virtio_pci",)
    assert MachineSpec(initramfs_modules=[]).root_modules == ()  # type: ignore[arg-type]


def test_initramfs_modules_do_not_change_argv() -> None:
    """The initramfs is a LaunchContext path: choosing its modules is not an argv change."""
    ctx = LaunchContext(qemu_binary="qemu", accel="tcg", kernel="k", initrd="i",
                        root_image="r", qmp_socket="q", console_socket="c", console_log="l")
    plain = MachineSpec()
    assert to_argv(plain, ctx) == to_argv(plain.replace(initramfs_modules=("virtio_pci",)), ctx)


@pytest.mark.parametrize("bad", [["virtio blk"], [3], ["x;reboot"]])
def test_initramfs_modules_rejects_non_names(bad: Any) -> None:
    with pytest.raises(ConfigError, match="initramfs_modules"):
        MachineSpec(initramfs_modules=bad)


def test_guest_modules_cover_data_disks_and_devices() -> None:
    spec = MachineSpec(
        disks=(Disk(name="a", bus="ahci"), Disk(name="l", bus="lsi"), Disk(name="v")),
        devices=(Rng(), CdRom(iso="/x.iso", bus="ide")),
    )
    mods = S.guest_modules(spec)
    for name in ("ahci", "sd_mod", "sym53c8xx", "virtio_blk", "virtio_rng", "sr_mod"):
        assert name in mods
    assert len(mods) == len(set(mods))
    assert S.guest_modules(MachineSpec()) == ()


def test_qemu_name_is_never_parsed_as_options() -> None:
    """A guest name with ',' or '=' broke QEMU's -name (it parses the value as options)."""
    assert qemu_name("db,debug-threads=on") == "db_debug-threads_on"
    assert qemu_name("ok-name_1.2") == "ok-name_1.2"
    assert qemu_name("") == "guest"

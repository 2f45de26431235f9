"""The golden argv cases: one MachineSpec per device kind, bus and transport option.

Shared by tests/unit/test_spec.py (argv == the checked-in ``<case>.argv`` file) and
tests/integration/test_argv_accepted.py (real QEMU accepts the same argv), so a
golden can never drift from syntax QEMU really takes.  Loaded by path, not as a
package, because tests/ directories have no ``__init__.py``.
"""

from __future__ import annotations

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
)

FAKE_DIR = "/run/pv/g0"
FAKE_ISO = "/images/test.iso"
FAKE_QCOW2 = "/images/data.qcow2"


def _cases() -> dict[str, MachineSpec]:
    cases: dict[str, MachineSpec] = {
        "base": MachineSpec(),
        "base-q35-smp4-1G": MachineSpec(machine="q35", smp=4, memory="1G"),
        "extra-args": MachineSpec(extra_args=("-rtc", "base=utc")),
        "command-channel-virtio-console": MachineSpec(command_channel="virtio-console"),
    }
    for bus in ("virtio-blk", "vhost-user-blk", "virtio-scsi", "ide", "ahci", "lsi", "nvme"):
        cases[f"root-{bus}"] = MachineSpec(root_bus=bus)
        cases[f"disk-{bus}"] = MachineSpec(disks=(Disk(name="disk0", bus=bus),))
    for bus in ("virtio-blk", "vhost-user-blk", "virtio-scsi"):
        for transport in ("modern", "legacy"):
            disk = Disk(name="disk0", bus=bus, transport=transport)
            cases[f"disk-{bus}-{transport}"] = MachineSpec(disks=(disk,))
        disk = Disk(name="disk0", bus=bus, num_queues=2, queue_size=128)
        cases[f"disk-{bus}-queues"] = MachineSpec(smp=2, disks=(disk,))
    cases.update(_disk_option_cases())
    cases.update(_nic_cases())
    cases.update(_device_cases())
    return cases


def _disk_option_cases() -> dict[str, MachineSpec]:
    return {
        "disk-virtio-blk-options": MachineSpec(
            disks=(
                Disk(name="fast", bus="virtio-blk", cache="writeback", serial="SN-1", discard=True),
                Disk(name="ro", bus="virtio-blk", readonly=True, cache="directsync"),
                Disk(name="img", bus="virtio-blk", image=FAKE_QCOW2, format="qcow2"),
            )
        ),
        "disk-vhost-user-blk-reconnect": MachineSpec(
            disks=(Disk(name="disk0", bus="vhost-user-blk", reconnect=1, readonly=True),)
        ),
        "disk-nvme-queues": MachineSpec(disks=(Disk(name="disk0", bus="nvme", num_queues=4),)),
        "disks-ide-full": MachineSpec(
            root_bus="ide",
            disks=(Disk(name="d1", bus="ide"), Disk(name="d2", bus="ide")),
            devices=(CdRom(iso=FAKE_ISO, bus="ide"),),
        ),
        "disks-mixed": MachineSpec(
            root_bus="virtio-scsi",
            disks=(
                Disk(name="a", bus="ahci"),
                Disk(name="b", bus="ahci"),
                Disk(name="s", bus="virtio-scsi"),
                Disk(name="l1", bus="lsi"),
                Disk(name="l2", bus="lsi"),
                Disk(name="n", bus="nvme", serial="NVME01"),
                Disk(name="v", bus="vhost-user-blk"),
            ),
        ),
        "disks-q35-ahci": MachineSpec(machine="q35", root_bus="ahci", disks=(Disk(bus="ahci"),)),
        **_block_size_cases(),
    }


#: The longest serial a scsi-hd shows the guest (VPD page 0x80).
SCSI_SERIAL = "SCSI-SERIAL-0123456789abcdefghijklmn"


def _block_size_cases() -> dict[str, MachineSpec]:
    """logical/physical_block_size on every bus whose QEMU device takes them (a
    physical size left out follows the logical one), and a 36-character scsi serial."""
    return {
        "disk-virtio-blk-block-size": MachineSpec(
            disks=(
                Disk(name="l4k", bus="virtio-blk", logical_block_size=4096),
                Disk(name="p4k", bus="virtio-blk", physical_block_size=4096),
            )
        ),
        "disk-virtio-scsi-block-size": MachineSpec(
            disks=(
                Disk(name="s4k", bus="virtio-scsi", logical_block_size=4096,
                     physical_block_size=4096),
                Disk(name="long", bus="virtio-scsi", serial=SCSI_SERIAL),
            )
        ),
        "disk-emulated-block-size": MachineSpec(
            disks=(
                Disk(name="i", bus="ide", physical_block_size=4096),
                Disk(name="a", bus="ahci", logical_block_size=512, physical_block_size=4096),
                Disk(name="l", bus="lsi", logical_block_size=1024, physical_block_size=65536),
                Disk(name="n", bus="nvme", logical_block_size=4096),
            )
        ),
    }


def _nic_cases() -> dict[str, MachineSpec]:
    cases = {
        f"nic-{model}": MachineSpec(nics=(Nic(model=model),))
        for model in ("virtio-net", "e1000", "e1000e", "rtl8139")
    }
    for transport in ("modern", "legacy"):
        nic = Nic(model="virtio-net", transport=transport)
        cases[f"nic-virtio-net-{transport}"] = MachineSpec(nics=(nic,))
    cases["nic-virtio-net-passt"] = MachineSpec(nics=(Nic(backend="passt"),))
    cases["nic-e1000-tap"] = MachineSpec(nics=(Nic(model="e1000", backend="tap"),))
    cases["nics-passt-and-user"] = MachineSpec(
        nics=(Nic(model="e1000", backend="passt"), Nic(name="lan", hostfwd_ssh=False))
    )
    cases["nics-two-no-ssh"] = MachineSpec(
        nics=(
            Nic(model="e1000", name="lan"),
            Nic(name="wan", hostfwd_ssh=False, mac="52:54:00:aa:bb:cc"),
        )
    )
    return cases


def _device_cases() -> dict[str, MachineSpec]:
    cases = {
        "dev-balloon": MachineSpec(devices=(Balloon(),)),
        "dev-balloon-options": MachineSpec(
            devices=(Balloon(deflate_on_oom=True, free_page_reporting=True),)
        ),
        "dev-rng": MachineSpec(devices=(Rng(),)),
        "dev-serial": MachineSpec(devices=(SerialPorts(names=("org.test.0", "org.test.1")),)),
        "dev-pvpanic": MachineSpec(devices=(Pvpanic(),)),
    }
    for transport in ("modern", "legacy"):
        cases[f"dev-virtio-{transport}"] = MachineSpec(
            devices=(
                Balloon(transport=transport),
                Rng(transport=transport),
                SerialPorts(transport=transport),
            )
        )
    for bus in ("ide", "ahci", "scsi"):
        cases[f"dev-cdrom-{bus}"] = MachineSpec(devices=(CdRom(iso=FAKE_ISO, bus=bus),))
    return cases


CASES: dict[str, MachineSpec] = _cases()


def context_for(
    spec: MachineSpec, run_dir: str = FAKE_DIR, qemu: str = "qemu-system-x86_64", accel: str = "tcg"
) -> LaunchContext:
    """A LaunchContext with every path the spec needs, all under ``run_dir``."""
    vhost = {d.name: f"{run_dir}/vu-{d.name}.sock" for d in spec.disks if d.bus == "vhost-user-blk"}
    if spec.root_bus == "vhost-user-blk":
        vhost["root"] = f"{run_dir}/vu-root.sock"
    ports = [p for dev in spec.devices if isinstance(dev, SerialPorts) for p in dev.names]
    return LaunchContext(
        qemu_binary=qemu,
        accel=accel,
        kernel="/images/vmlinuz",
        initrd="/images/initrd.img",
        root_image="/images/root.ext4",
        append="console=ttyS0 root=/dev/vda rw",
        qmp_socket=f"{run_dir}/qmp.sock",
        console_socket=f"{run_dir}/con.sock",
        console_log=f"{run_dir}/console.log",
        disk_files={d.name: f"{run_dir}/disk-{d.name}.img" for d in spec.disks},
        vhost_sockets=vhost,
        serial_sockets={p: f"{run_dir}/ser{i}.sock" for i, p in enumerate(ports)},
        net_sockets={n.name: f"{run_dir}/passt-{n.name}.sock" for n in spec.nics
                     if n.backend == "passt"},
        net_fds={n.name: 10 + i for i, n in enumerate(spec.nics) if n.backend == "tap"},
        name="golden",
    )

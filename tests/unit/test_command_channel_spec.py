"""The command channel's transport as data: names it reserves, where its device goes,
and what a guest without its terminal is told."""

from __future__ import annotations

import pytest

from pytest_virtio import ids
from pytest_virtio.channels.console import no_channel_diagnosis
from pytest_virtio.errors import ConfigError
from pytest_virtio.spec import Disk, LaunchContext, MachineSpec, SerialPorts, to_argv


def _argv(spec: MachineSpec) -> list[str]:
    ctx = LaunchContext(qemu_binary="qemu", accel="tcg", kernel="k", initrd="i",
                        root_image="r", append="", qmp_socket="/r/q", console_socket="/r/c",
                        console_log="/r/l", disk_files={d.name: f"/r/{d.name}" for d in spec.disks})
    return to_argv(spec, ctx)


def test_the_channels_controller_and_port_names_are_reserved() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        MachineSpec(devices=(SerialPorts(name=ids.COMMAND_SERIAL_BUS),))
    with pytest.raises(ConfigError, match="command channel"):
        MachineSpec(devices=(SerialPorts(names=(ids.COMMAND_PORT,)),))


def test_the_virtio_port_comes_after_the_users_devices() -> None:
    """The user's devices keep their PCI slots whichever transport carries commands."""
    spec = MachineSpec(disks=(Disk(name="d0", bus="virtio-blk", size="1M"),),
                       command_channel="virtio-console")
    argv = _argv(spec)
    assert argv.index(f"virtio-serial-pci,id={ids.COMMAND_SERIAL_BUS}") > max(
        i for i, a in enumerate(argv) if "drv-d0" in a)
    assert "chardev:cmd0" not in argv
    assert "chardev:cmd0" in _argv(MachineSpec())
    with pytest.raises(ConfigError, match="command_channel"):
        MachineSpec(command_channel="vsock")


def test_a_missing_terminal_names_what_the_kernel_lacks() -> None:
    assert "CONFIG_VIRTIO_CONSOLE" in no_channel_diagnosis("/dev/hvc0")
    assert "8250" in no_channel_diagnosis("/dev/ttyS1")

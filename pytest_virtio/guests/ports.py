"""The guest's virtio-serial ports: their host ends by name, the guest-side links
(``/dev/virtio-ports/<name>``, which no udev makes), and the guest agent on its port."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pytest_virtio.channels.agent import GuestAgent, agent_start_script
from pytest_virtio.channels.serial import SerialPort, guest_link_script
from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.shell import Shell
from pytest_virtio.qemu.machine import Machine

__all__ = ["link", "serial_port", "start_agent"]

log = logging.getLogger(__name__)


def serial_port(ports: Mapping[str, SerialPort], name: str) -> SerialPort:
    """The host end of port ``name``; ConfigError naming the ports there are."""
    if name not in ports:
        have = ", ".join(ports) or "none (add devices=['serial'] to the vm)"
        raise ConfigError(f"guest.serial_port({name!r}): no such virtio-serial port; "
                          f"this guest has: {have}")
    return ports[name]


def link(shell: Shell, ports: Mapping[str, SerialPort]) -> None:
    """Make ``/dev/virtio-ports/<name>`` for every port (the guest has no udev)."""
    shell.check(guest_link_script(tuple(ports)))


def start_agent(shell: Shell, port: SerialPort, machine: Machine, timeout: float
                ) -> GuestAgent:
    """Start qemu-ga on its port (our init has no udev/systemd to) and sync with it."""
    shell.check(agent_start_script())
    agent = GuestAgent(port, qemu_pid=machine.pid, console_tail=shell.console_tail,
                       alive=machine.check_alive)
    agent.sync(timeout)
    log.info("%s: guest agent answers", machine.name)
    return agent

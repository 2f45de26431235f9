"""Provisioning: the one place a Guest is built from a launched Machine, and the
strategies — the ways of reaching a ready guest of a spec.

A strategy prepares what its QEMU needs (disk files, backends, argv: a
:class:`Launch`) and hands it to :func:`start`, which builds the :class:`Guest`,
launches QEMU, connects the virtio-serial host ends, runs the strategy's own
bring-up (wait for the shell of a boot, adopt the shell of a restore), attaches
SSH and registers the guest with the session. The strategies today:

- :class:`pytest_virtio.guests.boot.Boot`: launch the spec's image and wait for its shell;
- :class:`pytest_virtio.guests.snapshot.Templates`: restore the shape's snapshot
  template (None for a shape that cannot be saved: the next strategy boots it);
- :class:`pytest_virtio.guests.sharing.Shared`: the live guest a class, module or
  session shares, else one the inner strategy reaches, kept in the pool.

:meth:`pytest_virtio.guests.session.VirtioSession.strategy` chooses among them in one
place; a new route to a guest (a firmware boot, a crash-state guest) is a new
strategy, not a new copy of this assembly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pytest_virtio import spec as spec_mod
from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import BackendError, LaunchError, VirtioError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.launch import connect_serial_ports
from pytest_virtio.guests.nethost import NicHost, host_of, stop_nets
from pytest_virtio.guests.settings import Settings
from pytest_virtio.guests.teardown import stop_backends
from pytest_virtio.images import GuestImage
from pytest_virtio.qemu.accel import AccelChoice
from pytest_virtio.qemu.machine import Machine

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

__all__ = ["Fallback", "Host", "Launch", "Strategy", "closed_on_failure", "reach",
           "start", "stop_after_failure"]

log = logging.getLogger(__name__)

#: How long (before accelerator scaling) SSH keeps retrying to reach dropbear.
SSH_CONNECT_TIMEOUT = 5.0

Progress = Callable[[str], None]
#: A strategy's own step between QEMU running and the guest being ready.
BringUp = Callable[[Guest], None]


class Host(Protocol):
    """What the strategies need from the session (:class:`.session.VirtioSession`)."""

    settings: Settings
    progress: Progress
    #: Every guest of the session, closed when it ends: :func:`start` registers here.
    guests: list[Guest]

    @property
    def qemu(self) -> str: ...

    @property
    def timeout_scale(self) -> float: ...

    def accel(self) -> AccelChoice: ...

    def image_for(self, spec: spec_mod.MachineSpec) -> GuestImage: ...

    def new_run_dir(self, prefix: str = "g") -> Path: ...

    def ssh_key(self) -> ssh_mod.KeyPair: ...


class Strategy(Protocol):
    """One way of reaching a ready guest."""

    def provide(self, spec: spec_mod.MachineSpec, name: str) -> Guest | None:
        """A ready, registered guest for ``spec``, or None when this way cannot give
        one (the next strategy is tried)."""
        ...


@dataclass(frozen=True, slots=True)
class Fallback:
    """Strategy: ``first``'s guest, or ``then``'s when ``first`` cannot give one."""

    first: Strategy
    then: Strategy

    def provide(self, spec: spec_mod.MachineSpec, name: str) -> Guest | None:
        guest = self.first.provide(spec, name)
        return guest if guest is not None else self.then.provide(spec, name)


def reach(strategy: Strategy, spec: spec_mod.MachineSpec, name: str) -> Guest:
    """The guest ``strategy`` provides; one that gives none is a LaunchError."""
    guest = strategy.provide(spec, name)
    if guest is None:
        raise LaunchError(f"guest {name!r}: {type(strategy).__name__} gave no guest and has "
                          "no strategy to fall back to; end the chain with a Boot")
    return guest


@dataclass(frozen=True, slots=True)
class Launch:
    """A QEMU about to start for one guest: the Machine and what was made for it."""

    spec: spec_mod.MachineSpec
    name: str
    machine: Machine
    ctx: spec_mod.LaunchContext
    run_dir: Path
    accel: str
    #: The accelerator's timeout factor.
    scale: float
    #: In-process vhost-user-blk servers, by disk name (started before QEMU).
    backends: dict[str, VhostUserBlkServer] = field(default_factory=dict)
    #: Each NIC's host side (passt, tap namespace), by NIC name (started before QEMU).
    nets: dict[str, NicHost] = field(default_factory=dict)
    #: The guest's uptime when its shell answered (a restore's is its template's).
    boot_uptime: float | None = None


def start(host: Host, launch: Launch, bring_up: BringUp, *, register: bool = True,
          incoming_timeout: float | None = None) -> Guest:
    """Build ``launch``'s Guest, start its QEMU and make it ready; the one place a
    Guest is made.

    A failed launch stops the backends and names the guest on the error (for its
    artifacts); a failed bring-up or SSH attach closes the guest first.
    ``register=False`` leaves the guest out of the session's (a probe closes its own).
    """
    spec = launch.spec
    guest = Guest(machine=launch.machine, name=launch.name, accel=launch.accel,
                  timeout_scale=launch.scale, run_dir=launch.run_dir, spec=spec,
                  backends=launch.backends, nets=launch.nets,
                  disk_serials={d.name: d.serial or d.name for d in spec.disks},
                  boot_uptime=launch.boot_uptime, ctx=launch.ctx,
                  image=host.image_for(spec))
    try:
        launch.machine.launch(incoming_timeout)
        guest.serial_ports = connect_serial_ports(launch.ctx, guest.default_timeout())
    except BaseException as exc:
        stop_nets(launch.nets)
        stop_after_failure(launch.backends, launch.name, exc)
        if isinstance(exc, VirtioError):
            exc.failed_guest = guest
        raise
    with closed_on_failure(guest):
        bring_up(guest)
        ssh_nic = next((n for n in spec.nics if n.hostfwd_ssh), None)
        if ssh_nic is not None:
            attach_ssh(guest, host.ssh_key(), ssh_nic, launch.scale)
    if register:
        host.guests.append(guest)
    log.info("guest %s ready (%s)", guest.name,
             "booted" if incoming_timeout is None else "restored")
    return guest


def attach_ssh(guest: Guest, key: ssh_mod.KeyPair, nic: spec_mod.Nic, scale: float) -> None:
    """Give the guest its (lazily connecting) SSH session and pinned host key."""
    endpoint = host_of(guest.nets, guest.spec, nic.name).ssh_endpoint(guest.machine, nic)
    session = _ssh_session_for(guest.machine, key, endpoint, SSH_CONNECT_TIMEOUT * scale)
    guest._ssh = session
    guest.host_key = session.host_key_line()


def stop_after_failure(backends: Mapping[str, VhostUserBlkServer], guest: str,
                       exc: BaseException) -> None:
    """Stop the backends of a launch that failed; one that will not stop is noted on
    the launch's own error (the cause the user must see first)."""
    try:
        stop_backends(backends, f"guest {guest!r}")
    except BackendError as stuck:
        exc.add_note(str(stuck))


@contextlib.contextmanager
def closed_on_failure(guest: Guest) -> Iterator[None]:
    """Shut ``guest`` down if the block fails; the error names it (for its artifacts)."""
    try:
        yield
    except BaseException as exc:
        guest.close()
        if isinstance(exc, VirtioError):
            exc.failed_guest = guest
        raise


def _ssh_session_for(machine: Machine, key: ssh_mod.KeyPair, endpoint: ssh_mod.SshEndpoint,
                     connect_timeout: float) -> ssh_mod.SshSession:
    """The SSH session of a guest that just announced readiness.

    The host key is read once, now: init prints it before the readiness line,
    so a later console line cannot replace it; a reboot the test asked for
    (:meth:`Guest.reboot`) pins the new boot's key the same way.
    """
    announced = ssh_mod.announced_key(machine.console_log)
    return ssh_mod.SshSession(endpoint.port, key, lambda: announced,
                              connect_timeout=connect_timeout,
                              console_tail=machine.console.tail,
                              alive=machine.check_alive, qemu_pid=machine.pid,
                              dial=endpoint.dial, where=endpoint.where)

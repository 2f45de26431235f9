"""The guest's run state from the host: pause (QMP ``stop``), resume (``cont``), and
the question every command asks first.

Why a command asks: a paused guest's vCPUs do not run, so a command sent to it
could only wait out its whole timeout and then blame the guest. Whoever paused
it (``guest.pause()``, a test's own ``machine.qmp("stop")``, an I/O error
policy), QEMU sent a STOP event, and ``query-status`` says so.
"""

from __future__ import annotations

import logging
from typing import Any

from pytest_virtio.errors import GuestError
from pytest_virtio.qemu.machine import Machine, RunState

__all__ = ["check_running", "pause", "resume", "status"]

log = logging.getLogger(__name__)


def status(machine: Machine) -> dict[str, Any]:
    """QMP ``query-status``: ``running`` (bool) and ``status`` (``running``,
    ``paused``, ``io-error``, ``inmigrate``...)."""
    reply = machine.qmp("query-status")
    return dict(reply or {})


def pause(machine: Machine, name: str) -> None:
    """Stop the guest's vCPUs (QMP ``stop``) and check QEMU says it is paused."""
    machine.qmp("stop")
    state = status(machine)
    if state.get("running", True):
        raise GuestError(f"guest {name!r}: QMP stop was answered but QEMU still reports "
                         f"run state {state.get('status')!r}")
    log.info("guest %s paused", name)


def resume(machine: Machine, name: str) -> None:
    """Let the guest's vCPUs run again (QMP ``cont``) and check QEMU says it runs."""
    machine.qmp("cont")
    state = status(machine)
    if not state.get("running", False):
        raise GuestError(f"guest {name!r}: QMP cont was answered but QEMU reports run state "
                         f"{state.get('status')!r}, not running")
    log.info("guest %s resumed", name)


def check_running(machine: Machine, name: str, what: str) -> None:
    """Raise a GuestError naming ``what`` when the guest is paused.

    QEMU announces every stop and start (QMP events STOP, RESUME), whoever asked;
    the events already read are looked at first, so a running guest costs no QMP
    command, and a last STOP is confirmed with ``query-status`` (a RESUME may not
    be read yet). A machine not running (closed, failed) is left to the command's
    runner to report.
    """
    if machine.state is not RunState.RUNNING:
        return
    machine.poll_events()
    if _last_transition(machine.events) != "STOP":
        return
    state = status(machine)
    if not state.get("running", True):
        raise GuestError(f"guest {name!r} is paused (QEMU run state "
                         f"{state.get('status')!r}): {what} cannot run until guest.resume()")


def _last_transition(events: list[dict[str, Any]]) -> str | None:
    """The newest STOP or RESUME event's name, None when QEMU sent neither."""
    return next((e["event"] for e in reversed(events) if e.get("event") in _TRANSITIONS), None)


_TRANSITIONS = frozenset({"STOP", "RESUME"})

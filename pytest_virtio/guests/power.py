"""Powering a guest off or restarting it, as a user would, and waiting for the result.

QEMU runs every guest with ``-no-reboot``: a reboot nobody asked for (a triple
fault, ``panic=-1`` without pvpanic, a stray ``reboot``) ends the guest at once
instead of looping through boots.  A reboot the test asks for switches QEMU's
reboot action to ``reset`` over QMP (``set-action``, QEMU 6.0+) for that one
boot and back to ``shutdown`` once the new boot answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pytest_virtio.errors import GuestError, GuestTimeout
from pytest_virtio.guests.shell import Shell
from pytest_virtio.qemu.machine import Machine

__all__ = ["POWEROFF_FAILED", "POWEROFF_SCRIPT", "REBOOT_SCRIPT", "poweroff", "restart"]

log = logging.getLogger(__name__)

#: What the guest prints on its kernel console when its power-off command failed.
POWEROFF_FAILED = "PYTEST-VIRTIO-POWEROFF-FAILED"

def _action_script(action: str, words: str, delay: str) -> str:
    """The guest's own ``action`` (poweroff or reboot), picked now, started ``delay``
    seconds later in the background; rc 127 with the reason when there is no way.

    systemd's orderly ``systemctl <action>`` when it is PID 1, else the syscall
    after a sync, through busybox's applet (our init runs under busybox, whose
    shell a plain ``reboot`` would only signal; the default image has no poweroff
    program) or a program of that name.  The command answers first (the framed
    reply must leave before systemd stops the console service: seen as exit 143
    'Terminated' when it did not); the action's output and a failure
    (:data:`POWEROFF_FAILED`) go to the kernel's console, which the host watches.
    Killed by a signal, the command failed nothing: the shutdown stops its service.
    """
    return f"""\
if [ -d /run/systemd/system ]; then how="systemctl {action}"
elif /bin/busybox --list 2>/dev/null | grep -qx {action}; then how="/bin/busybox {action} -f"
elif command -v {action} >/dev/null; then how="{action} -f"
else
  echo "cannot {words}: systemd is not running (no /run/systemd/system), /bin/busybox \
has no {action} applet, no {action} program on PATH ($PATH)" >&2
  exit 127
fi
command -v "${{how%% *}}" >/dev/null || {{ echo "cannot {words}: ${{how%% *}} not found \
on PATH ($PATH)" >&2; exit 127; }}
(sleep {delay}; sync; $how || {{ r=$?; [ $r -gt 128 ] || \
echo "{POWEROFF_FAILED}: '$how' exited $r"; }}) >/dev/console 2>&1 &
"""


#: The guest's own power-off, a second after the command answered.
POWEROFF_SCRIPT = _action_script("poweroff", "power off", "1")
#: The guest's own reboot, half a second after the command answered.
REBOOT_SCRIPT = _action_script("reboot", "reboot", "0.5")

#: While it waits for QEMU to exit, poweroff() looks at the console this often.
_POLL = 0.5


def poweroff(machine: Machine, shell: Shell, name: str, timeout: float) -> None:
    """Start the guest's own power-off and wait until its QEMU exits.

    No way to power off is a CommandFailed at once (with why); a power-off command
    that fails is a GuestError as soon as the console shows it; QEMU still running
    after ``timeout`` is a GuestTimeout.
    """
    log.info("guest %s: powering off from inside", name)
    shell.check(POWEROFF_SCRIPT)  # no way to power off: CommandFailed now, with why
    end = time.monotonic() + timeout
    while machine.wait_exit(min(_POLL, max(0.0, end - time.monotonic()))) is None:
        tail = shell.console_tail()
        failed = [line for line in tail.splitlines() if POWEROFF_FAILED in line]
        if failed:
            raise GuestError(f"guest {name!r} could not power off: {failed[-1].strip()}", tail)
        if time.monotonic() >= end:
            raise GuestTimeout(f"guest {name!r} did not power off within {timeout:.0f}s", tail)
    log.info("guest %s: powered off", name)


def restart(machine: Machine, name: str, timeout: float, trigger: Callable[[], object]) -> float:
    """Let ``trigger`` restart the guest and wait until the new boot's shell answers.

    Returns the new boot's uptime at readiness.  QEMU resets the machine
    (devices, hot-plugged ones included, stay; RAM and the guest's state go)
    and boots the same kernel again.  A guest that never comes back is a
    GuestTimeout with its console; one that cannot find its root fails as a
    first boot does (the console watches for it again).
    """
    log.info("guest %s: reboot allowed (QMP set-action reboot=reset)", name)
    machine.qmp("set-action", reboot="reset")
    console = machine.console
    try:
        trigger()
        # After the trigger: a failed one leaves the console as it was (its boot
        # watch off); what the new boot writes is only read from here on.
        console.begin_reboot()
        uptime = console.wait_ready(timeout)
    except BaseException:
        _forbid_reboot_after_failure(machine, name)
        raise
    machine.qmp("set-action", reboot="shutdown")
    log.info("guest %s: back after reboot (uptime %.2f s); a further reboot ends QEMU again",
             name, uptime)
    return uptime


def _forbid_reboot_after_failure(machine: Machine, name: str) -> None:
    """A restart that failed (no reboot began, or the new boot never answered) still
    puts ``-no-reboot``'s rule back: a later stray reboot must end QEMU, not loop.
    What this QMP call raises is logged, never raised over the restart's own error."""
    try:
        machine.qmp("set-action", reboot="shutdown")
    except Exception as exc:  # the restart's own error is the one to report
        log.warning("guest %s: could not forbid reboots again after a failed restart: %s",
                    name, exc)

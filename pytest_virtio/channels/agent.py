"""The QEMU guest agent (qemu-ga) as a way to run commands: ``run(via="agent")``.

Why a third runner: a guest whose own init we do not control (a distro image
with systemd, a Windows guest with the virtio-win tools) has no framed console
shell of ours and may have no SSH, but it can run qemu-ga on the standard
virtio-serial port ``org.qemu.guest_agent.0``; the agent is how libvirt and
avocado-vt drive such guests.

Protocol facts (QEMU docs, "QEMU Guest Agent Protocol Reference"): commands are
QMP-shaped JSON objects, replies one JSON object per line, no greeting.  After
a reconnect stale replies may still be queued, so every exchange starts with
``guest-sync-delimited``: the host sends 0xFF (the agent resets its parser), the
agent answers with 0xFF followed by the sync reply carrying our id, and anything
before that 0xFF is discarded.  ``guest-exec`` starts a process and returns its
pid at once; ``guest-exec-status`` is polled until ``exited``, with stdout and
stderr base64-encoded.  qemu.qmp's client expects QMP's greeting and capability
negotiation, which the agent does not speak, so this small client is our own.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from pytest_virtio.channels.runners import Result
from pytest_virtio.channels.serial import SerialPort
from pytest_virtio.errors import GuestError, GuestTimeout
from pytest_virtio.ids import AGENT_PORT
from pytest_virtio.starvation import Deadline

log = logging.getLogger(__name__)

__all__ = ["AGENT_PORT", "AgentError", "GuestAgent", "agent_start_script"]

#: Exit status paramiko and the console report for a command killed by signal N.
_SIGNAL_BASE = 128
_DELIMITER = b"\xff"


class AgentError(GuestError):
    """The agent answered a command with an error (its class and description kept)."""

    def __init__(self, command: str, error_class: str, desc: str, console_tail: str = "") -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"guest agent refused {command}: {desc} ({error_class})", console_tail)


def agent_start_script(qemu_pid_file: str = "/run/qemu-ga.pid") -> str:
    """Guest shell that makes sure qemu-ga serves the agent port, started once.

    Under systemd (a distro image) the package's own unit is started, which is
    what its udev rule does when the port appears anyway (``systemctl start``
    is idempotent and waits for the port's device); a second agent could not
    open the port, which takes one reader.  Our init has neither, so qemu-ga is
    started here, unless one already runs (``/proc/*/comm``: no pgrep needed).
    """
    port = f"/dev/virtio-ports/{AGENT_PORT}"
    unit = "qemu-guest-agent.service"
    running = ("for c in /proc/[0-9]*/comm; do [ \"$(cat \"$c\" 2>/dev/null)\" = qemu-ga ] "
               "&& exit 0; done")
    return (f"if [ -d /run/systemd/system ] && systemctl cat {unit} >/dev/null 2>&1; then "
            f"exec systemctl start {unit}; fi; {running}; command -v qemu-ga >/dev/null || "
            f"{{ echo 'qemu-ga is not in this image (Debian package qemu-guest-agent)' >&2; "
            f"exit 127; }}; mkdir -p /run; qemu-ga -d -m virtio-serial -p {port} "
            f"-f {qemu_pid_file}")


class GuestAgent:
    """A qemu-ga client over the host end of the agent's virtio-serial port."""

    def __init__(self, port: SerialPort, *, qemu_pid: int | None = None,
                 console_tail: Callable[[], str] = lambda: "",
                 alive: Callable[[], None] = lambda: None) -> None:
        self.port = port
        self.qemu_pid = qemu_pid
        self.console_tail = console_tail
        self.alive = alive
        self._synced = False

    # -- protocol -------------------------------------------------------------
    def sync(self, timeout: float) -> None:
        """Resynchronise with the agent (see the module docstring); retried until
        ``timeout``, because qemu-ga may still be starting."""
        deadline = Deadline(timeout, self.qemu_pid)
        last = ""
        while not deadline.expired():
            self.alive()
            ident = secrets.randbelow(2**31)
            try:
                self.port.send(_DELIMITER + _encode("guest-sync-delimited", {"id": ident}),
                               timeout=max(0.5, deadline.remaining()))
                if self._await_sync(ident, min(2.0, max(0.2, deadline.remaining()))):
                    self._synced = True
                    log.info("agent: synchronised with qemu-ga (id %d)", ident)
                    return
            except GuestTimeout as exc:
                last = str(exc)
        raise GuestTimeout(f"the guest agent did not answer guest-sync-delimited within "
                           f"{timeout:.0f}s{deadline.describe()} (is qemu-ga running on "
                           f"{AGENT_PORT}?) {last}", self.console_tail())

    def _await_sync(self, ident: int, timeout: float) -> bool:
        """Discard up to the agent's 0xFF, then read replies until ours (False: none)."""
        end = time.monotonic() + timeout
        self.port.recv_until(_DELIMITER, timeout=timeout)
        while (left := end - time.monotonic()) > 0:
            reply = self._reply(left)
            if reply.get("return") == ident:
                return True
        return False

    def _reply(self, timeout: float) -> dict[str, Any]:
        line = self.port.recv_until(b"\n", timeout=timeout).strip(b"\xff\r\n ")
        try:
            reply = json.loads(line)
        except ValueError:
            return {}
        return reply if isinstance(reply, dict) else {}

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        """Send one command and return its ``return`` value; AgentError on an error."""
        if not self._synced:
            self.sync(timeout)
        log.debug("agent: -> %s %s", command, arguments or {})
        self.port.send(_encode(command, arguments), timeout=timeout)
        deadline = Deadline(timeout, self.qemu_pid)
        while not deadline.expired():
            reply = self._reply(max(0.05, deadline.remaining()))
            if "error" in reply:
                error = reply["error"]
                log.info("agent: %s failed: %s", command, error)
                raise AgentError(command, str(error.get("class", "?")),
                                 str(error.get("desc", reply)), self.console_tail())
            if "return" in reply:
                return reply["return"]
        self._synced = False
        raise GuestTimeout(f"the guest agent did not answer {command} within {timeout:.0f}s",
                           self.console_tail())

    # -- the runner -----------------------------------------------------------
    def run(self, cmd: str, timeout: float, watch: Callable[[], None] | None = None) -> Result:
        """Run ``cmd`` through ``/bin/sh -c`` in the guest via ``guest-exec``.

        The same shape as the console and SSH runners: stdin empty, a command
        killed by signal N reports 128+N, ``watch`` may end the wait.
        """
        start = time.monotonic()
        deadline = Deadline(timeout, self.qemu_pid)
        pid = self.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", cmd],
                                          "capture-output": True}, timeout)["pid"]
        pause = 0.01
        while True:
            self.alive()
            if watch is not None:
                watch()
            status = self.execute("guest-exec-status", {"pid": pid},
                                  max(1.0, deadline.remaining()))
            if status.get("exited"):
                return Result(cmd=cmd, rc=_exit_code(status),
                              stdout_bytes=_data(status, "out-data"),
                              stderr_bytes=_data(status, "err-data"),
                              duration=time.monotonic() - start, via="agent")
            if deadline.expired():
                raise GuestTimeout(f"guest command via the agent did not finish within "
                                   f"{timeout:.0f}s{deadline.describe()}: {cmd} (still "
                                   f"running as pid {pid})", self.console_tail())
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _encode(command: str, arguments: Mapping[str, Any] | None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = dict(arguments)
    return json.dumps(message).encode() + b"\n"


def _exit_code(status: Mapping[str, Any]) -> int:
    if isinstance(status.get("signal"), int):
        return _SIGNAL_BASE + int(status["signal"])
    return int(status.get("exitcode", -1))


def _data(status: Mapping[str, Any], key: str) -> bytes:
    raw = status.get(key)
    if not isinstance(raw, str):
        return b""
    return base64.b64decode(raw)

"""SSH into guests: a per-session key, a pinned host key, commands and SFTP.

Why SSH next to the console: the serial console is one byte stream shared with
kernel messages and cannot move files or carry real traffic, while SSH gives
separate stdout/stderr, exit codes, parallel channels and SFTP.

Trust is set up without anything secret in the shared image:

* the client key pair is made once per pytest session (``generate_keypair``)
  and its public half reaches the guest through fw_cfg, which ``pvinit`` copies
  to ``/root/.ssh/authorized_keys``; dropbear runs with password logins off;
* the guest makes its host key at boot and prints it on the console, which only
  the host can read, so the key is pinned from there (``RejectPolicy``, never
  trust-on-first-use);
* QEMU forwards a kernel-chosen host port (``hostfwd=tcp:127.0.0.1:0-:22``) and
  we read the port back over QMP, so parallel guests never race for a port; a
  NIC whose guest is reachable through no host port (a tap in its own network
  namespace) gives a ``dial`` that makes the connection there (:class:`SshEndpoint`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, NoReturn

import paramiko

from pytest_virtio.channels.runners import Result
from pytest_virtio.channels.sshtrust import (
    KeyPair,
    PinnedOnly,
    UnpinnedHostKey,
    announced_key,
    generate_keypair,
    host_key_object,
    parse_host_key,
    parse_hostfwd_port,
)
from pytest_virtio.errors import GuestError, GuestTimeout
from pytest_virtio.starvation import Deadline

__all__ = [
    "AUTHORIZED_KEYS_FW_CFG",
    "KeyPair",
    "SshEndpoint",
    "SshSession",
    "announced_key",
    "generate_keypair",
    "parse_host_key",
    "parse_hostfwd_port",
]

log = logging.getLogger(__name__)

#: fw_cfg blob pvinit reads the authorized key from (``opt/`` is QEMU's user space).
AUTHORIZED_KEYS_FW_CFG = "opt/pytest-virtio/authorized_keys"
HOST = "127.0.0.1"
USER = "root"
#: Pause between connection attempts while dropbear is (re)starting.
RETRY_PAUSE = 0.2
#: How often a running command's channel is polled.
POLL = 0.005
#: paramiko's exit status until the server sends one; a channel that closes
#: while it still reads -1 was cut, not finished (real statuses are 0..255).
NO_EXIT_STATUS = -1
#: Past a command's deadline, how long before the watchdog cuts a link that hangs
#: paramiko itself (a frozen guest); normally ``_collect``'s own deadline fires first.
WATCHDOG_GRACE = 2.0
#: How often a refused channel open is retried on a live link.
CHANNEL_OPEN_TRIES = 5
#: How long a finished channel waits for the server's own close before it is
#: dropped locally (see :meth:`SshSession._retire`).
SERVER_CLOSE_WAIT = 5.0



# --------------------------------------------------------------------------- session


HostKeySource = Callable[[], "tuple[str, str] | None"]
#: A connected socket to the guest's SSH server, made within a timeout.
Dial = Callable[[float], socket.socket]


class SshEndpoint(NamedTuple):
    """How SSH reaches a guest's port 22: a ``port`` on 127.0.0.1, or ``dial`` where
    no host port leads there (``port`` then only names the host key); ``where``
    says it in error messages."""

    port: int
    dial: Dial | None = None
    where: str | None = None


class SshSession:
    """One guest's SSH connection: connects lazily, reconnects when it died.

    ``host_key_source`` is asked on every connect, so a guest that rebooted
    and re-announced its key is trusted again without trusting anything else.
    ``alive`` raises when QEMU is gone and ``console_tail`` feeds error messages.
    """

    def __init__(self, port: int, key: KeyPair, host_key_source: HostKeySource, *,
                 connect_timeout: float, console_tail: Callable[[], str] = lambda: "",
                 alive: Callable[[], None] = lambda: None,
                 qemu_pid: int | None = None, dial: Dial | None = None,
                 where: str | None = None) -> None:
        self.port = port
        #: Makes each connection instead of 127.0.0.1:``port`` (see SshEndpoint).
        self.dial = dial
        #: Where the guest's SSH server is, as messages say it.
        self.where = where or f"{HOST}:{port}"
        self.key = key
        self.host_key_source = host_key_source
        self.connect_timeout = connect_timeout
        self.console_tail = console_tail
        self.alive = alive
        #: Command deadlines leave out time the host kept QEMU off a CPU (Deadline).
        self.qemu_pid = qemu_pid
        self._client: paramiko.SSHClient | None = None
        #: Channel starts dropbear refused and we retried; nonzero means the
        #: quiesce in :meth:`_retire` did not prevent the race (tests read it).
        self.refused_starts = 0

    # -- connection ------------------------------------------------------------
    @property
    def connected(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    @property
    def client(self) -> paramiko.SSHClient:
        """A connected SSHClient; (re)connects if there is none or it dropped."""
        if not self.connected:
            self.reconnect()
        assert self._client is not None
        return self._client

    def reconnect(self, timeout: float | None = None) -> paramiko.SSHClient:
        """Drop any old connection and connect afresh.

        Retries until ``connect_timeout`` (or the shorter ``timeout`` a command
        has left), because dropbear may still be starting or restarting.
        """
        self.close()
        budget = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        deadline = time.monotonic() + budget
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.alive()
            try:
                self._client = self._connect_once(max(1.0, deadline - time.monotonic()))
                log.info("ssh: connected to %s (host key pinned)", self.where)
                return self._client
            except (OSError, EOFError, paramiko.SSHException) as exc:
                log.debug("ssh: connect to %s failed, retrying: %r", self.where, exc)
                last = exc
                time.sleep(RETRY_PAUSE)
        raise GuestError(
            f"SSH to the guest at {self.where} failed for {budget:.0f}s "
            f"(last error: {last!r}); is dropbear running in the guest?",
            self.console_tail(),
        )

    def _connect_once(self, timeout: float) -> paramiko.SSHClient:
        client = self._pinned_client()
        try:
            sock = self.dial(timeout) if self.dial is not None else None
            client.connect(
                HOST, port=self.port, sock=sock, username=USER, pkey=self.key.pkey(),
                look_for_keys=False, allow_agent=False, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout,
            )
        except paramiko.AuthenticationException as exc:
            client.close()
            raise GuestError(
                f"the guest at {self.where} refused the session key "
                f"{self.key.public_path} ({exc}); is the key in fw_cfg "
                f"{AUTHORIZED_KEYS_FW_CFG!r}? (password login is never tried)",
                self.console_tail(),
            ) from exc
        except (paramiko.BadHostKeyException, UnpinnedHostKey) as exc:
            client.close()
            raise GuestError(
                f"the SSH server at {self.where} offered host key "
                f"{exc.key.get_name()} {exc.key.get_base64()}, not the one the guest "
                "announced on its console: refusing to talk to it",
                self.console_tail(),
            ) from exc
        except BaseException:
            client.close()
            raise
        return client

    def _pinned_client(self) -> paramiko.SSHClient:
        """An SSHClient that trusts exactly the host key from the console."""
        announced = self.host_key_source()
        if announced is None:
            raise GuestError(
                "the guest never printed its SSH host key (PYTEST-VIRTIO-HOSTKEY): "
                "dropbear is missing from the image or pv.ssh=1 is not on the "
                "kernel command line",
                self.console_tail(),
            )
        client = paramiko.SSHClient()
        # paramiko's own name for the server: bare on port 22, bracketed otherwise.
        name = HOST if self.port == 22 else f"[{HOST}]:{self.port}"
        client.get_host_keys().add(name, announced[0],
                                   host_key_object(*announced))
        client.set_missing_host_key_policy(PinnedOnly())
        return client

    def host_key_line(self) -> str | None:
        """The pinned host key as ``type base64`` (None if the guest never said)."""
        announced = self.host_key_source()
        return " ".join(announced) if announced else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- commands --------------------------------------------------------------
    def run(self, cmd: str, timeout: float,
            watch: Callable[[], None] | None = None) -> Result:
        """Run ``cmd`` like the console does: ``sh`` in a subshell, stdin empty.

        The subshell makes a command killed by a signal report 128+N (as on
        the console) instead of an SSH exit-signal paramiko cannot read.
        ``watch`` is called while waiting; what it raises ends the wait.
        """
        start = time.monotonic()
        deadline = Deadline(timeout, self.qemu_pid)
        watchdog = _Watchdog(deadline, self.close)
        try:
            channel = self._start(cmd, timeout)
            try:
                out, err, rc = self._collect(channel, cmd, deadline, watch)
            finally:
                self._retire(channel, wait=channel.exit_status_ready())
        finally:
            watchdog.cancel()
        return Result(cmd=cmd, rc=rc, stdout_bytes=out, stderr_bytes=err,
                      duration=time.monotonic() - start, via="ssh")

    def _start(self, cmd: str, timeout: float) -> paramiko.Channel:
        """Open a channel and exec ``cmd``; paramiko waits here without a timeout,
        which is why ``run`` keeps a watchdog that closes the link past the deadline."""
        try:
            channel = self._open_channel(
                timeout, lambda ch: ch.exec_command(f"( {cmd}\n) </dev/null; exit $?"))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise GuestTimeout(
                f"SSH could not start {cmd!r} within {timeout:.0f}s ({exc!r})",
                self.console_tail(),
            ) from exc
        return channel

    def _open_channel(self, timeout: float,
                      start: Callable[[paramiko.Channel], None]) -> paramiko.Channel:
        """A session channel, started by ``start`` (exec a command, or the SFTP subsystem).

        Retrying is safe only before the server has started anything, and only
        for two causes: a transport found dead on the way gets one reconnect;
        on a live link, a channel the server closed before answering ``start``
        is opened again (:func:`_refused_start`), counted in ``refused_starts``.
        """
        client = self.client if self.connected else self.reconnect(timeout)
        reconnected = False
        for attempt in range(CHANNEL_OPEN_TRIES):
            try:
                return self._started(client, timeout, start)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if not self.connected and not reconnected:
                    client, reconnected = self.reconnect(timeout), True
                    continue
                if not _refused_start(exc) or attempt == CHANNEL_OPEN_TRIES - 1:
                    raise
                self.refused_starts += 1
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _retire(self, channel: paramiko.Channel, wait: bool = True) -> None:
        """Close a finished channel only once the server has closed its end.

        Why: paramiko forgets a channel the moment it sends its own close, so
        the next channel could be opened while dropbear is still tearing the
        old one down (its child's exit not yet reaped).  Seen under load: a
        channel opened in that window is closed by dropbear before its
        exec/subsystem request is answered (paramiko log: the new channel's
        EOF arrives together with the old one's exit-status and close).  Half
        closing first (EOF: sftp-server exits) and waiting for the server's
        close removes that window; the wait is bounded so a hung server only
        costs :data:`SERVER_CLOSE_WAIT`.  A command cut at its deadline is
        closed at once (``wait=False``): it would never finish on its own.
        """
        try:
            if not wait:
                return
            if not channel.closed and not channel.eof_sent:
                channel.shutdown_write()
            deadline = time.monotonic() + SERVER_CLOSE_WAIT
            while not _link_dead(channel) and time.monotonic() < deadline:
                time.sleep(POLL)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            channel.close()

    @classmethod
    def _started(cls, client: paramiko.SSHClient, timeout: float,
                 start: Callable[[paramiko.Channel], None]) -> paramiko.Channel:
        channel = cls._new_session(client, timeout)
        try:
            start(channel)
        except BaseException:
            channel.close()
            raise
        return channel

    @staticmethod
    def _new_session(client: paramiko.SSHClient, timeout: float) -> paramiko.Channel:
        transport = client.get_transport()
        if transport is None:
            raise paramiko.SSHException("no transport")
        return transport.open_session(timeout=timeout)

    def _collect(self, channel: paramiko.Channel, cmd: str, deadline: Deadline,
                 watch: Callable[[], None] | None = None) -> tuple[bytes, bytes, int]:
        """Read both streams until the exit status, the deadline or a dead link."""
        out, err = bytearray(), bytearray()
        while True:
            if watch is not None:
                watch()
            got = _drain(channel, out, err)
            if channel.exit_status_ready() and not got:
                _drain(channel, out, err)
                rc = channel.recv_exit_status()
                if rc != NO_EXIT_STATUS:
                    return bytes(out), bytes(err), rc
                self._raise_dropped(cmd, out, err)
            if _link_dead(channel) and not channel.status_event.wait(0.5):
                self._raise_dropped(cmd, out, err)
            if deadline.expired():
                raise GuestTimeout(
                    f"guest command over SSH did not finish within {deadline.budget:.0f}s"
                    f"{deadline.describe()}: {cmd}\n"
                    f"--- stdout so far ---\n{_text(out)[-2000:]}",
                    self.console_tail(),
                )
            if not got:
                time.sleep(POLL)

    def _raise_dropped(self, cmd: str, out: bytearray, err: bytearray) -> NoReturn:
        """The channel closed without an exit status: the link (or dropbear) died."""
        self.close()
        raise GuestError(
            f"the SSH connection dropped while running {cmd!r} (EOF, no exit status)\n"
            f"--- stdout so far ---\n{_text(out)[-2000:]}--- stderr so far ---\n"
            f"{_text(err)[-2000:]}",
            self.console_tail(),
        )

    # -- files -----------------------------------------------------------------
    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a host file into the guest over SFTP (dropbear runs sftp-server)."""
        with self._sftp(f"put {local} → {remote}") as sftp:
            sftp.put(os.fspath(local), remote, confirm=True)

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy a guest file to the host over SFTP."""
        with self._sftp(f"get {remote} → {local}") as sftp:
            sftp.get(remote, os.fspath(local))

    def _sftp(self, what: str) -> _SftpGuard:
        return _SftpGuard(self, what)


class _SftpGuard:
    """Opens SFTP on a live connection and turns its failures into GuestError."""

    def __init__(self, session: SshSession, what: str) -> None:
        self.session = session
        self.what = what
        self.sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> paramiko.SFTPClient:
        try:
            # The exec path's channel and retry (see SshSession._retire for why a
            # fresh channel can be refused at all).
            channel = self.session._open_channel(self.session.connect_timeout,
                                                 lambda ch: ch.invoke_subsystem("sftp"))
            self.sftp = paramiko.SFTPClient(channel)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise GuestError(
                f"SFTP would not start for {self.what} ({exc!r}): dropbear runs "
                "sftp-server from openssh-sftp-server; is it in the image?",
                self.session.console_tail(),
            ) from exc
        return self.sftp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if self.sftp is not None:
            channel = self.sftp.get_channel()
            if channel is not None:
                self.session._retire(channel)
            self.sftp.close()
        if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
            raise GuestError(f"SFTP {self.what} failed: {exc!r}",
                             self.session.console_tail()) from exc


class _Watchdog:
    """Cuts the link once ``deadline`` is past by :data:`WATCHDOG_GRACE`.

    Why: paramiko waits without a timeout in places (the start of a channel on
    a frozen guest).  It re-arms while the deadline still has time, so a
    starved but healthy guest's command is not cut at the wall-clock budget.
    """

    def __init__(self, deadline: Deadline, fire: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fire = fire
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._cancelled = False
        self._arm()

    def _arm(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._timer = threading.Timer(max(0.1, self.deadline.remaining() + WATCHDOG_GRACE),
                                          self._check)
            self._timer.daemon = True
            self._timer.start()

    def _check(self) -> None:
        if self.deadline.remaining() + WATCHDOG_GRACE > 0.05:
            self._arm()
        elif not self._cancelled:
            self.fire()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._timer is not None:
                self._timer.cancel()


def _refused_start(exc: BaseException) -> bool:
    """Did dropbear close a new channel before starting anything on it?

    paramiko reports that one event three ways, by when it notices the close:
    "Unable to open channel." (before open_session returned), "Channel is not
    open" (before the exec/subsystem request was sent) or "Channel closed."
    (before the request was answered).  The server answers a start request
    before it can close a channel that ran something, so each means nothing
    ran and a new channel is safe.
    """
    return isinstance(exc, paramiko.SSHException) and str(exc) in (
        "Unable to open channel.", "Channel is not open", "Channel closed.")


def _drain(channel: paramiko.Channel, out: bytearray, err: bytearray) -> bool:
    """Move whatever is buffered into ``out``/``err``; True if anything came."""
    got = False
    while channel.recv_ready():
        out += channel.recv(65536)
        got = True
    while channel.recv_stderr_ready():
        err += channel.recv_stderr(65536)
        got = True
    return got


def _link_dead(channel: paramiko.Channel) -> bool:
    """Closed under us or transport gone (EOF alone is normal: stdout can close early)."""
    transport = channel.get_transport()
    return channel.closed or transport is None or not transport.is_active()


def _text(data: bytearray) -> str:
    return data.decode("utf-8", "replace")

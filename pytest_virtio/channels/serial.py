"""Host side of a virtio-serial port: bytes in and out of one named guest port.

QEMU serves each ``virtserialport`` on a unix socket (``-chardev socket,
server=on,wait=off``); a :class:`SerialPort` is the host's connection to it.
Why connect at boot rather than on first use: while no client is connected,
QEMU drops what the guest writes, so a test that starts a guest-side writer
before asking for the port would lose data. The other direction needs nothing:
QEMU reads from the socket only while the guest has the port open, so bytes
sent early wait in the socket buffer.

Every read takes a timeout and raises :class:`GuestTimeout` naming the port
and how much arrived: a guest that never writes fails the test, never hangs it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from pytest_virtio.errors import GuestError, GuestTimeout

__all__ = ["SerialPort", "guest_link_script"]

#: Bytes asked of the socket per read (the socket buffer holds ~200 KiB).
_CHUNK = 1 << 16


class SerialPort:
    """A connected host end of virtio-serial port ``name`` (see module docstring)."""

    def __init__(self, name: str, path: str, sock: socket.socket, timeout: float) -> None:
        self.name = name
        self.path = path
        self.timeout = timeout
        self._sock = sock
        self._pending = bytearray()

    @classmethod
    def connect(cls, name: str, path: str, timeout: float) -> SerialPort:
        """Connect to QEMU's socket for port ``name``; ``timeout`` is the default for I/O."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise GuestError(f"virtio-serial port {name!r}: cannot connect to QEMU's socket "
                             f"{path}: {exc}") from exc
        return cls(name, path, sock, timeout)

    def __repr__(self) -> str:
        return f"SerialPort({self.name!r}, {self.path!r})"

    # -- sending ------------------------------------------------------------------
    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Send all of ``data`` to the guest; GuestTimeout if the guest stops reading.

        QEMU takes bytes only while the guest holds the port open and has
        buffers queued, so a guest that never reads shows up as this timeout.
        """
        view = memoryview(bytes(data))
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        sent = 0
        while sent < len(view):
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sent += self._sock.send(view[sent:])
            except TimeoutError:
                raise GuestTimeout(
                    f"virtio-serial port {self.name!r}: guest took {sent} of {len(view)} "
                    f"bytes in {t:.0f}s (is a guest process reading the port?)"
                ) from None
            except OSError as exc:
                raise GuestError(f"virtio-serial port {self.name!r}: send failed after "
                                 f"{sent} bytes: {exc}") from exc

    # -- receiving ----------------------------------------------------------------
    def _fill(self, deadline: float) -> bool:
        """Read what is there into the pending buffer; False on timeout."""
        self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = self._sock.recv(_CHUNK)
        except TimeoutError:
            return False
        except OSError as exc:
            raise GuestError(f"virtio-serial port {self.name!r}: receive failed: {exc}") from exc
        if not chunk:
            raise GuestError(f"virtio-serial port {self.name!r}: QEMU closed the socket "
                             f"(guest gone?) with {len(self._pending)} bytes unread")
        self._pending += chunk
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._pending[:size])
        del self._pending[:size]
        return data

    def recv(self, size: int = _CHUNK, timeout: float | None = None) -> bytes:
        """Up to ``size`` bytes, waiting for at least one; GuestTimeout if none comes."""
        t = self.timeout if timeout is None else timeout
        if not self._pending and not self._fill(time.monotonic() + t):
            raise GuestTimeout(f"virtio-serial port {self.name!r}: nothing from the guest "
                               f"in {t:.0f}s")
        return self._take(size)

    def recv_exactly(self, size: int, timeout: float | None = None) -> bytes:
        """Exactly ``size`` bytes; GuestTimeout says how many came before the deadline."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while len(self._pending) < size:
            if not self._fill(deadline):
                raise GuestTimeout(f"virtio-serial port {self.name!r}: {len(self._pending)} of "
                                   f"{size} bytes from the guest in {t:.0f}s")
        return self._take(size)

    def recv_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Bytes up to and including ``marker`` (e.g. ``b"\\n"``)."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while (end := self._pending.find(marker)) < 0:
            if not self._fill(deadline):
                raise GuestTimeout(f"virtio-serial port {self.name!r}: no {marker!r} from the "
                                   f"guest in {t:.0f}s; got {bytes(self._pending[-200:])!r}")
        return self._take(end + len(marker))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SerialPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def guest_link_script(names: tuple[str, ...]) -> str:
    """Shell that makes ``/dev/virtio-ports/<name>`` for each port, once the guest names it.

    udev does this on a distro; the guest runs none. The kernel names a port
    (``/sys/class/virtio-ports/vportNpM/name``) when QEMU's control message
    arrives, after the driver probed, so the script waits for every name and
    exits non-zero listing the ones that never came.
    """
    wanted = " ".join(f"'{n}'" for n in names)  # port names are [A-Za-z0-9_.-]
    return rf"""
mkdir -p /dev/virtio-ports
missing=""
for try in $(seq 1 100); do
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    n=$(cat "$p/name"); [ -n "$n" ] && ln -sf "../${{p##*/}}" "/dev/virtio-ports/$n"
  done
  missing=""
  for n in {wanted}; do [ -e "/dev/virtio-ports/$n" ] || missing="$missing $n"; done
  [ -z "$missing" ] && exit 0
  sleep 0.1
done
echo "virtio-serial ports never named:$missing" >&2
exit 1
"""


def socket_path(run_dir: Path, index: int) -> str:
    """QEMU's socket for the ``index``-th port of the guest (short: sun_path)."""
    return str(run_dir / f"ser{index}.sock")

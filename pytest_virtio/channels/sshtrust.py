"""SSH trust without secrets in the image: the session's key, the pinned host key, the port.

* the client key pair is made once per pytest session (``generate_keypair``);
  its public half reaches the guest through fw_cfg;
* the guest prints its host key on the console, which only the host reads, so
  it is pinned from there (``parse_host_key``; never trust-on-first-use);
* QEMU forwards a kernel-chosen host port, read back from ``info usernet``
  (``parse_hostfwd_port``), so parallel guests never race for a port.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pytest_virtio.channels.console import HOSTKEY_RE
from pytest_virtio.errors import GuestError

__all__ = [
    "KeyPair",
    "PinnedOnly",
    "UnpinnedHostKey",
    "announced_key",
    "generate_keypair",
    "host_key_object",
    "parse_host_key",
    "parse_hostfwd_port",
]

_FORWARD_RE = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+(?P<src>\S+)\s+(?P<port>\d+)\s+\S+\s+(?P<gport>\d+)"
)
_HUB_RE = re.compile(r"^Hub\s+-?\d+\s+\((?P<netdev>[^)]*)\):")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class KeyPair:
    """The session's client key: the private key file and the public line."""

    private_path: Path
    public_path: Path
    public_line: str

    def pkey(self) -> paramiko.PKey:
        """The private key as paramiko wants it (read from the OpenSSH file)."""
        return paramiko.Ed25519Key.from_private_key_file(str(self.private_path))


def generate_keypair(directory: Path, comment: str = "pytest-virtio") -> KeyPair:
    """Make a fresh ed25519 key pair under ``directory`` (private file mode 0600).

    ``cryptography`` generates it because ``paramiko.Ed25519Key`` can only load
    keys; the OpenSSH private format is the one paramiko reads back.
    """
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / "id_ed25519"
    _write_private(private_path, private)
    line = f"{public.decode()} {comment}"
    public_path = directory / "id_ed25519.pub"
    public_path.write_text(line + "\n")
    return KeyPair(private_path, public_path, line)


def _write_private(path: Path, data: bytes) -> None:
    """Create the file 0600 from the start: never a moment it is world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- parsing


def parse_hostfwd_port(usernet: str, guest_port: int = 22, netdev: str | None = None) -> int:
    """The host port QEMU chose for ``guest_port``, from HMP ``info usernet``.

    ``netdev`` picks one user-mode netdev when a guest has several; without it
    the first forward to ``guest_port`` wins.
    """
    current: str | None = None
    for line in usernet.splitlines():
        hub = _HUB_RE.match(line.strip())
        if hub:
            current = hub["netdev"]
            continue
        fwd = _FORWARD_RE.search(line)
        if fwd and int(fwd["gport"]) == guest_port and netdev in (None, current):
            return int(fwd["port"])
    where = f" on netdev {netdev!r}" if netdev else ""
    raise GuestError(
        f"QEMU reports no host forward to guest port {guest_port}{where}; "
        f"'info usernet' said:\n{usernet.strip()}"
    )


def parse_host_key(console_text: str) -> tuple[str, str] | None:
    """(key type, base64 blob) from the last PYTEST-VIRTIO-HOSTKEY line, if any.

    The last one, because a guest that rebooted announces its key again.
    """
    found = re.findall(HOSTKEY_RE, console_text)
    if not found:
        return None
    key_type, _, blob = str(found[-1]).partition(" ")
    return key_type, blob.strip()


def announced_key(console_log: Path) -> tuple[str, str] | None:
    """The host key the guest last announced in its kernel console's log, read now.

    Read once per boot (at readiness) and pinned for that boot: a line printed
    later cannot replace it.  An unreadable log is no announcement.
    """
    try:
        return parse_host_key(console_log.read_text(errors="replace"))
    except OSError:
        return None


def host_key_object(key_type: str, blob: str) -> paramiko.PKey:
    """A paramiko key from an ``ssh-ed25519 AAAA...`` pair."""
    try:
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    except (ValueError, paramiko.SSHException) as exc:
        raise GuestError(f"the guest announced an unusable host key {key_type} {blob}: {exc}"
                         ) from exc


class UnpinnedHostKey(paramiko.SSHException):
    """The server offered a host key of a type the console never announced."""

    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__(f"unpinned host key {key.get_name()}")
        self.key = key


class PinnedOnly(paramiko.RejectPolicy):
    """RejectPolicy that keeps the offered key, so the error can show it."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> NoReturn:
        raise UnpinnedHostKey(key)

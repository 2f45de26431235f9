"""The serial console: boot watching and nonce-framed commands over pexpect.

Why framing: the console carries the guest shell's output, kernel messages and
whatever the command prints, all in one byte stream.  Each command's stdout and
stderr are collected into files in the guest and printed between markers that
contain a fresh random nonce, and the markers are *built* by printf, so neither
the echoed command line nor anything the command prints can fake them.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from .errors import (
    BackendError,
    GuestError,
    GuestPanic,
    GuestTimeout,
    LaunchError,
)
from .qemu.starvation import Deadline
from .runners import Result

#: Commands between two removals of the console's (mostly empty) output files.
CLEANUP_EVERY = 32
READY_RE = r"PYTEST-VIRTIO-READY ([0-9.]+)\r?\n"
HOSTKEY_RE = r"PYTEST-VIRTIO-HOSTKEY (\S+ \S+)"
NO_ROOT_RE = r"PYTEST-VIRTIO-NO-ROOT ([^\r\n]*)"
#: A distro's initramfs giving up on the root: initramfs-tools ("ALERT!  LABEL=pvroot
#: does not exist.  Dropping to a shell!") and dracut ("Warning: Could not boot.").
DISTRO_NO_ROOT_RE = (r"(ALERT!\s+\S+ does not exist\.[^\r\n]*"
                     r"|dracut[^\r\n]*Warning: Could not boot\.[^\r\n]*)")
#: Lines that mean the guest kernel died; matched in every wait.
PANIC_RE = r"(Kernel panic - not syncing[^\r\n]*)"
#: While streaming, a line counts only once its end has arrived: ``[^\r\n]*``
#: would otherwise match whatever part of it the last read happened to hold.
WHOLE_LINE = r"\r?\n"


FRAME_LINE_RE = re.compile(r"^[0-9a-f]{16}(?:[SFZ]|E \d+)$")


def unframe(lines: list[str]) -> list[str]:
    """Drop :meth:`Console.run`'s nonce markers (and the blank line printed before each).

    They mean nothing to a person reading an error; what is left is the
    commands' output interleaved with the kernel's messages, as on a terminal.
    """
    kept = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if FRAME_LINE_RE.match(line) or (not line and FRAME_LINE_RE.match(nxt)):
            continue
        kept.append(line)
    return kept


def tail_of(path: Path, lines: int = 40) -> str:
    """Last lines of the console log, for error messages."""
    try:
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(unframe(data.replace("\r", "").splitlines())[-lines:])


@dataclass
class Console:
    """A pexpect session on QEMU's serial chardev socket.

    ``alive`` is asked while waiting so that a QEMU that exits turns into a
    LaunchError at once instead of a timeout.  ``qemu_pid`` lets every wait
    leave out the time the host kept QEMU off a CPU (:class:`Deadline`).
    """

    sock: socket.socket
    log_path: Path
    alive: Callable[[], None] = lambda: None
    qemu_pid: int | None = None
    _child: pexpect.fdpexpect.fdspawn = field(init=False)
    _dirty: bool = field(default=False, init=False)
    _commands: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._child = pexpect.fdpexpect.fdspawn(
            self.sock.fileno(), encoding="utf-8", codec_errors="replace", timeout=30,
            maxread=65536, searchwindowsize=None,
        )

    @classmethod
    def connect(
        cls, path: str, log_path: Path, alive: Callable[[], None], timeout: float,
        qemu_pid: int | None = None,
    ) -> Console:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return cls(sock, log_path, alive, qemu_pid)
            except OSError:
                sock.close()
                alive()
                if time.monotonic() > deadline:
                    raise LaunchError(f"console socket {path} never appeared") from None
                time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        return tail_of(self.log_path, lines)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, text: str) -> None:
        """Write to the guest; a dead QEMU is reported as such, not as EPIPE."""
        self.alive()
        try:
            self._child.send(text)
        except OSError as exc:
            self.alive()
            raise LaunchError(f"cannot write to the guest console: {exc}\n{self.tail()}"
                              ) from exc

    def expect(self, pattern: str, timeout: float, what: str,
               watch: Callable[[], None] | None = None) -> re.Match[str]:
        """Wait for ``pattern``; a panic, an EOF or the deadline raise precisely.

        Waits in short slices so a dead QEMU is noticed by ``alive()``, and a
        failed in-process backend by ``watch()`` (it raises), at once.
        """
        patterns = [pattern, PANIC_RE + WHOLE_LINE, NO_ROOT_RE + WHOLE_LINE,
                    DISTRO_NO_ROOT_RE + WHOLE_LINE, pexpect.EOF, pexpect.TIMEOUT]
        deadline = Deadline(timeout, self.qemu_pid)
        while True:
            slice_ = max(0.05, min(0.5, deadline.remaining()))
            try:
                idx = self._child.expect(patterns, timeout=slice_)
            except OSError as exc:  # ECONNRESET: QEMU died under us
                self._wait_for_exit()
                raise LaunchError(f"QEMU dropped the console while {what}: {exc}\n"
                                  f"{self.tail()}") from exc
            match = self._child.match
            if idx == 0:
                assert isinstance(match, re.Match)
                return match
            if idx == 1:
                assert isinstance(match, re.Match)
                self._collect_after_panic()
                raise GuestPanic(f"guest kernel panicked while {what}: {match.group(1)}",
                                 self.tail())
            if idx == 2:
                assert isinstance(match, re.Match)
                raise GuestError(no_root_diagnosis(match.group(1)), self.tail())
            if idx == 3:
                assert isinstance(match, re.Match)
                raise GuestError(distro_no_root_diagnosis(match.group(1)), self.tail())
            if idx == 4:
                self.alive()
                raise LaunchError(f"QEMU closed the console while {what}\n{self.tail()}")
            self.alive()
            if watch is not None:
                watch()
            if deadline.expired():
                raise GuestTimeout(f"guest did not answer within {timeout:.0f}s while {what}"
                                   f"{deadline.describe()}", self.tail())

    def _wait_for_exit(self, grace: float = 2.0) -> None:
        """A reset console means QEMU is dying: let ``alive()`` see its exit status."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.alive()
            time.sleep(0.02)

    def _collect_after_panic(self) -> None:
        """Let the panic's trace reach the log before it is quoted."""
        with contextlib.suppress(OSError):
            self._child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.5)

    def wait_ready(self, timeout: float) -> float:
        """Wait for init's readiness line; returns the guest uptime it reported."""
        match = self.expect(READY_RE, timeout, "booting")
        return float(match.group(1))

    def run(self, cmd: str, timeout: float,
            watch: Callable[[], None] | None = None) -> Result:
        """Run ``cmd`` in the guest shell; stdout and stderr come back separately.

        ``watch`` is called while waiting; what it raises ends the wait (the
        command is interrupted, as on a timeout).
        """
        if self._dirty:
            self._resync(timeout)
        nonce = secrets.token_hex(8)
        out, err = f"/tmp/.pv-{nonce}.o", f"/tmp/.pv-{nonce}.e"
        self._commands += 1
        # cat only a non-empty file, and remove the files in batches after the
        # answer: dash's test and printf are builtins, and every exec costs ~70 ms
        # under TCG (docs/boot-time.md). Was cat, cat, rm on every command: 0.15-0.2 s
        # of a `true`. Each command keeps its own files, so a background job it left
        # writing to its stdout never shows up in a later command's output.
        cleanup = " rm -f /tmp/.pv-*.[oe];" if self._commands % CLEANUP_EVERY == 0 else ""
        script = (
            f"( {cmd}\n) </dev/null >{out} 2>{err}; pv_rc=$?; "
            f"printf '%s\\n' {nonce}S; [ ! -s {out} ] || cat {out}; "
            f"printf '\\n%s %d\\n' {nonce}E $pv_rc; "
            f"[ ! -s {err} ] || cat {err}; printf '\\n%s\\n' {nonce}F;{cleanup}\n"
        )
        start = time.monotonic()
        self._dirty = True
        self.send(script)
        pattern = (
            rf"{nonce}S\r?\n(?P<out>.*?)\r?\n{nonce}E (?P<rc>\d+)\r?\n"
            rf"(?P<err>.*?)\r?\n{nonce}F\r?\n"
        )
        try:
            match = self.expect(f"(?s){pattern}", timeout, f"running {cmd!r}", watch)
        except (GuestTimeout, BackendError):
            self.send("\x03")
            raise
        self._dirty = False
        return Result(
            cmd=cmd, rc=int(match["rc"]), stdout=_clean(match["out"]),
            stderr=_clean(match["err"]), duration=time.monotonic() - start,
        )

    def _resync(self, timeout: float) -> None:
        """After an interrupted command: wait for a fresh shell to echo a marker."""
        nonce = secrets.token_hex(8)
        self.send(f"\nprintf '%s\\n' {nonce}Z\n")
        self.expect(f"{nonce}Z", timeout, "resynchronising the console after a timeout")
        self._dirty = False


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n")


def distro_no_root_diagnosis(line: str) -> str:
    """The distro initramfs's own words, and the fix a user of that distro applies."""
    return (
        f"the distro's initramfs did not find the root disk: {line.strip()!r}. It most "
        "likely lacks the driver for the root disk's bus (virtio_blk and virtio_pci for a "
        "virtio-blk root): in the guest add them to /etc/initramfs-tools/modules and run "
        "update-initramfs -u (dracut: add_drivers+=\" virtio_blk \"), or use MODULES=most"
    )


def no_root_diagnosis(detail: str) -> str:
    """Turn the initramfs's NO-ROOT line into a sentence that names the fix."""
    fields = dict(part.split("=", 1) for part in detail.split() if "=" in part)
    loaded = [m for m in fields.get("loaded", "").split(",") if m]
    blocks = [b for b in fields.get("blockdevs", "").split(",") if b]
    if "label" in fields:
        return (
            f"the initramfs found no root disk labelled {fields['label']!r}: "
            f"block devices seen: {blocks or 'none'}; modules loaded: {loaded or 'none'}. "
            "The initramfs most likely lacks the driver for the root disk's bus "
            "(e.g. virtio_blk for a virtio-blk root): add it to the initramfs modules."
        )
    return f"the initramfs could not mount the root disk: {detail}"

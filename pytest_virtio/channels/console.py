"""The guest's two serial lines: the kernel's console, watched, and the command channel.

Why two: one line that carries the kernel's messages, the shell's output and
whatever a command prints cannot tell them apart.  A command printing
``Kernel panic - not syncing`` looked like a panic, a kernel message printed
during a command landed inside its stdout, and the boot-watch patterns were
armed over a command's output.  So the kernel keeps ``ttyS0`` (``console=ttyS0``;
watched for panics always, for an initramfs giving up while booting) and the
shell that runs the host's commands sits alone on ``ttyS1`` (a second ISA UART,
which every x86 machine type has, so an all-emulated guest has it too), in raw
mode: no echo, no line discipline limits, no CR/LF translation, bytes as sent.

Why framing: a command's stdout and stderr are collected into files in the
guest and printed between markers carrying a fresh random nonce, built by
printf, so nothing a command prints can end its frame.  The command itself
travels single-quoted in short lines (control bytes as octal escapes), and
the guest checks its byte count before it runs it: any command arrives intact
(any length, any syntax: a syntax error is the shell's own rc 2 and message) or
not at all, with a clear error.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import secrets
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import (
    BackendError,
    ChannelError,
    ChannelMode,
    ChannelRefused,
    GuestError,
    GuestPanic,
    GuestTimeout,
    LaunchError,
    ShellRestarted,
)
from pytest_virtio.spec.context import command_channel_log
from pytest_virtio.starvation import Deadline

log = logging.getLogger(__name__)

#: Commands between two removals of the channel's (mostly empty) output files.
CLEANUP_EVERY = 32
READY_RE = r"PYTEST-VIRTIO-READY ([0-9.]+)\r?\n"
HOSTKEY_RE = r"PYTEST-VIRTIO-HOSTKEY (\S+ \S+)"
NO_ROOT_RE = r"PYTEST-VIRTIO-NO-ROOT ([^\r\n]*)"
#: A distro's initramfs giving up on the root: initramfs-tools ("ALERT!  LABEL=pvroot
#: does not exist.  Dropping to a shell!") and dracut ("Warning: Could not boot.").
DISTRO_NO_ROOT_RE = (r"(ALERT!\s+\S+ does not exist\.[^\r\n]*"
                     r"|dracut[^\r\n]*Warning: Could not boot\.[^\r\n]*)")
#: Our init's word that the guest has no second serial port for the channel.
NO_CHANNEL_RE = r"PYTEST-VIRTIO-NO-CHANNEL (\S+)"
#: Lines that mean the guest kernel died; matched on the kernel's console always.
PANIC_RE = r"(Kernel panic - not syncing[^\r\n]*)"

#: The guest side of the channel, sent once to every new shell (dash).  ``pv_a``
#: appends a literal piece of the command (single-quoted by the host), ``pv_o`` a
#: run of control bytes as octal escapes (printf in a command substitution: a
#: fork, so only for the bytes a terminal would act on).  ``pv_x NONCE LEN``
#: refuses the command when its byte count is not LEN (a line cut or a byte lost
#: on the way), runs it with ``eval`` in a subshell (so a syntax error is that
#: subshell's rc 2, not the channel's), then frames the results.  ``[ -s ]`` and
#: printf are builtins: a ``true`` costs the subshell's fork and nothing else.
SHELL_FUNCTIONS = (
    "pv_c=; pv_k=0; pv_a() { pv_c=$pv_c$1; }; "
    "pv_o() { pv_t=$(printf \"$1\"; printf x); pv_c=$pv_c${pv_t%x}; }; "
    "pv_x() { pv_m=$pv_c; pv_c=; "
    "if [ \"${#pv_m}\" != \"$2\" ]; then printf '%sL %s\\n' \"$1\" \"${#pv_m}\"; return; fi; "
    "pv_f=${TMPDIR:-/tmp}/.pv-$1.o; pv_g=${TMPDIR:-/tmp}/.pv-$1.e; "
    "if ! { : >$pv_f && : >$pv_g; } 2>/dev/null; then printf '%sN\\n' \"$1\"; return; fi; "
    "( set --; eval \"$pv_m\"\n) </dev/null >$pv_f 2>$pv_g; pv_r=$?; "
    "printf '%sS\\n' \"$1\"; [ ! -s $pv_f ] || cat $pv_f; : >$pv_f; "
    "printf '\\n%sE %d\\n' \"$1\" $pv_r; [ ! -s $pv_g ] || cat $pv_g; : >$pv_g; "
    "printf '\\n%sF\\n' \"$1\"; pv_k=$((pv_k+1)); "
    f"[ $pv_k -lt {CLEANUP_EVERY} ] || {{ pv_k=0; rm -f ${{TMPDIR:-/tmp}}/.pv-*.[oe]; }}; }}"
)
#: The terminal mode the channel needs: raw (no canonical line limit, no CR/LF
#: translation either way), no echo, no extended input processing (^V, ^O), but
#: signals on so ^C interrupts a command; ``sane`` first undoes whatever else a
#: command set (istrip, inlcr, a moved intr character).
STTY = "stty sane raw -echo -iexten isig"
#: Bytes a terminal may act on even in that mode (signals; the rest for a
#: terminal someone set otherwise): sent as octal escapes, never as themselves.
_CONTROL = frozenset(set(range(0x20)) - {0x09, 0x0A} | {0x7F})
#: Escaped command characters per line: far below the 4095 of a canonical line.
CHUNK = 1000
#: Kernel console bytes kept in memory for line matching (the log has them all).
_LINE_LIMIT = 65536
_READY = re.compile(READY_RE.encode())
#: How often a wait checks QEMU, the backends and its deadline while data flows.
_CHECK_EVERY = 0.25
#: The longest command the channel takes: the guest's terminal buffers about
#: 640 KiB of unread input and drops the rest (no flow control on the line).
MAX_COMMAND = 256 << 10
#: A resync's first round waits this long for its marker, each later one as
#: much more, up to :data:`_RESYNC_MAX` (see :meth:`Console._resync`).
_RESYNC_EVERY = 1.0
_RESYNC_MAX = 5.0
#: The pause between a resync round's ^C and its marker: a marker read before
#: the shell took its SIGINT would be dropped with the half-parsed input.
_RESYNC_SETTLE = 0.2


def command_lines(cmd: str) -> list[str]:
    """The shell lines that hand ``cmd`` to ``pv_x``, none longer than ~:data:`CHUNK`.

    Literal pieces go single-quoted (a quote as ``'\\''``), runs of control
    bytes as octal escapes for printf; so whatever the command holds (newlines,
    quotes, CR, control and non-UTF-8 bytes), the terminal sees short lines that
    its shell only ever stores in a variable.
    """
    data = cmd.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError(f"a shell command cannot contain a NUL byte: {cmd[:200]!r}")
    if len(data) > MAX_COMMAND:
        raise ValueError(f"a console command holds at most {MAX_COMMAND >> 10} KiB (this one "
                         f"{len(data) >> 10} KiB): the guest's terminal has no flow control; "
                         "put a long script in a file (guest.put over SSH, a disk) and run that")
    lines: list[str] = []
    for control, run in _runs(data):
        function = "pv_o" if control else "pv_a"
        tokens = [f"\\{b:03o}" if control else ("'\\''" if b == 0x27 else chr(b))
                  for b in run]
        lines += [f"{function} '{piece}'" for piece in _pack(tokens)]
    return lines


def _pack(tokens: list[str]) -> list[str]:
    """Tokens joined into pieces of at most :data:`CHUNK` characters, none split."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for token in tokens:
        if current and size + len(token) > CHUNK:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(token)
        size += len(token)
    pieces.append("".join(current))
    return pieces


def _runs(data: bytes) -> list[tuple[bool, bytes]]:
    """``data`` cut into alternating runs of control and plain bytes."""
    runs = itertools.groupby(data, _CONTROL.__contains__)
    return [(control, bytes(run)) for control, run in runs]


def command_script(cmd: str, nonce: str) -> bytes:
    """What the host types for one command: its pieces, then the run with its length."""
    length = len(cmd.encode("utf-8", "surrogateescape"))
    lines = [*command_lines(cmd), f"pv_x {nonce} {length}"]
    return ("\n".join(lines) + "\n").encode("latin-1")


@dataclass(frozen=True)
class Frame:
    """One command's framed answer, parsed from the channel's bytes."""

    rc: int
    stdout: bytes
    stderr: bytes
    #: Offset just past the frame's last marker in the buffer it was read from.
    end: int


class FrameScan:
    """Finds one nonce's frame in a growing buffer, scanning each byte about once.

    Called with the whole buffer each time more arrived; it remembers how far
    it got (head marker, E marker), so reading N bytes of output costs O(N),
    not O(N) per read.  Raises :class:`ChannelRefused` when the guest refused
    the command (its byte count differed) and :class:`ChannelMode` when the
    markers show the terminal translated newlines (some program changed the
    channel's mode): the output would not be exact.
    """

    #: Bytes searched again at each call, for a marker cut across two reads.
    OVERLAP = 48

    def __init__(self, nonce: str) -> None:
        n = nonce.encode()
        self._n = n
        self._refused = re.compile(re.escape(n) + rb"L (\d+)\n")
        self._no_files = re.compile(re.escape(n) + rb"N\n")
        self._tail = re.compile(rb"\n" + re.escape(n) + rb"E (\d+)\n")
        self._pos = 0
        self._body: int | None = None
        self._rc: int | None = None
        self._stdout_end = 0
        self._stderr = 0

    def __call__(self, buf: bytes | bytearray) -> Frame | None:
        start = max(0, self._pos - self.OVERLAP)
        self._pos = len(buf)
        if self._body is None and not self._find_head(buf, start):
            return None
        if self._rc is None and not self._find_tail(buf, start):
            return None
        finish = buf.find(b"\n" + self._n + b"F\n", max(start, self._stderr - 1))
        if finish < 0:
            return None
        assert self._body is not None and self._rc is not None
        return Frame(rc=self._rc, stdout=bytes(buf[self._body:self._stdout_end]),
                     stderr=bytes(buf[self._stderr:finish]), end=finish + len(self._n) + 3)

    def _find_head(self, buf: bytes | bytearray, start: int) -> bool:
        head = buf.find(self._n + b"S\n", start)
        # Only what came before the frame is the shell's own: the same words in
        # the command's output are output.
        before = len(buf) if head < 0 else head
        if _READY.search(buf, start, before):
            raise ShellRestarted("the guest's command shell died before the command's "
                                 "result was written (init started a new one): no exit status")
        if self._no_files.search(buf, start, before):
            raise ChannelError("the guest could not create the command's output files in /tmp "
                               "(full or read-only?): the command did not run")
        refused = self._refused.search(buf, start, before)
        if refused:
            raise ChannelRefused(
                f"the guest received the command as {refused.group(1).decode()} bytes, not "
                "the bytes sent: the command channel lost or cut input")
        if head < 0:
            if buf.find(self._n + b"S\r\n", start) >= 0:
                raise ChannelMode(
                    "the command channel's terminal translated newlines (a program changed "
                    "its mode from the raw one it needs): this command's output is not exact")
            return False
        self._body = head + len(self._n) + 2
        return True

    def _find_tail(self, buf: bytes | bytearray, start: int) -> bool:
        assert self._body is not None
        tail = self._tail.search(buf, max(start, self._body - 1))
        if not tail:
            return False
        self._rc = int(tail.group(1))
        self._stdout_end = tail.start()
        self._stderr = tail.end()
        return True


FRAME_LINE_RE = re.compile(r"^[0-9a-f]{16}(?:[SFZL]|[EL] \d+)$")


def unframe(lines: list[str]) -> list[str]:
    """Drop the nonce markers (and the blank line printed before each).

    They mean nothing to a person reading an error; what is left is the
    commands' output, as on a terminal.
    """
    kept = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if FRAME_LINE_RE.match(line) or (not line and FRAME_LINE_RE.match(nxt)):
            continue
        kept.append(line)
    return kept


def tail_of(path: Path, lines: int = 40) -> str:
    """Last lines of a console log, for error messages."""
    try:
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(unframe(data.replace("\r", "").splitlines())[-lines:])


def both_tails(console_log: Path, lines: int = 40) -> str:
    """The last lines of a guest's kernel console and of its command channel.

    A quiet kernel (``loglevel=1``) leaves its own log nearly empty; what the
    shell last printed is then the trail, so both are shown, each labelled.
    """
    channel_log = Path(command_channel_log(console_log))
    parts = [tail_of(console_log, lines)]
    channel = tail_of(channel_log, max(1, lines // 2))
    if channel:
        parts.append(f"--- command channel ({channel_log.name}) ---\n{channel}")
    return "\n".join(p for p in parts if p)


class _Line:
    """One chardev socket, read without blocking into a buffer."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.buf = bytearray()
        self.eof = False
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def fill(self) -> int:
        """Read all that is there; returns the byte count. ECONNRESET propagates."""
        got = 0
        while not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                self.eof = True
                break
            self.buf += data
            got += len(data)
        return got


class _KernelWatch:
    """Whole lines of the kernel's console, matched as they complete."""

    def __init__(self) -> None:
        self._partial = b""
        self._boot = [
            (re.compile(NO_ROOT_RE.encode()), no_root_diagnosis),
            (re.compile(DISTRO_NO_ROOT_RE.encode()), distro_no_root_diagnosis),
            (re.compile(NO_CHANNEL_RE.encode()), no_channel_diagnosis),
        ]
        self._panic = re.compile(PANIC_RE.encode())

    def feed(self, data: bytes, booting: bool) -> tuple[str, str] | None:
        """('panic'|'no-root', message) for the first alarming complete line, else None."""
        text = self._partial + data
        lines = text.split(b"\n")
        self._partial = lines.pop()[-_LINE_LIMIT:]
        for raw in lines:
            found = self._panic.search(raw)
            if found:
                return "panic", found.group(1).decode("utf-8", "replace").rstrip("\r")
            if not booting:
                continue
            for pattern, diagnose in self._boot:
                found = pattern.search(raw)
                if found:
                    return "no-root", diagnose(found.group(1).decode("utf-8", "replace"))
        return None


@dataclass
class Console:
    """The kernel console (``con0``) and the command channel (``cmd0``) of one QEMU.

    ``alive`` is asked while waiting so that a QEMU that exits turns into a
    LaunchError at once instead of a timeout.  ``qemu_pid`` lets every wait
    leave out the time the host kept QEMU off a CPU (:class:`Deadline`).
    """

    kernel_sock: socket.socket
    channel_sock: socket.socket
    log_path: Path
    alive: Callable[[], None] = lambda: None
    qemu_pid: int | None = None
    _kernel: _Line = field(init=False)
    _channel: _Line = field(init=False)
    _watch: _KernelWatch = field(init=False)
    _booting: bool = field(default=True, init=False)
    _dirty: bool = field(default=False, init=False)
    #: The shell on the channel has our functions and mode (reset by a resync).
    _prepared: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._kernel = _Line(self.kernel_sock, "kernel console")
        self._channel = _Line(self.channel_sock, "command channel")
        self._watch = _KernelWatch()

    @classmethod
    def connect(
        cls, path: str, channel_path: str, log_path: Path, alive: Callable[[], None],
        timeout: float, qemu_pid: int | None = None,
    ) -> Console:
        deadline = time.monotonic() + timeout
        kernel = _connect(path, deadline, alive)
        try:
            channel = _connect(channel_path, deadline, alive)
        except BaseException:
            kernel.close()
            raise
        log.debug("connected to the kernel console %s and the command channel %s",
                  path, channel_path)
        return cls(kernel, channel, log_path, alive, qemu_pid)

    def tail(self, lines: int = 40) -> str:
        """The kernel console's last lines, then the command channel's (for errors)."""
        return both_tails(self.log_path, lines)

    def close(self) -> None:
        for sock in (self.kernel_sock, self.channel_sock):
            with contextlib.suppress(OSError):
                sock.close()

    def send(self, data: bytes, timeout: float = 30.0) -> None:
        """Write to the command channel; a dead QEMU is reported as such, not as EPIPE,
        and a guest that stops reading as a timeout, not a hang."""
        self.alive()
        deadline = Deadline(timeout, self.qemu_pid)
        view = memoryview(data)
        while view:
            try:
                sent = self.channel_sock.send(view)
            except BlockingIOError:
                select.select([], [self.channel_sock], [], 0.5)
                self.alive()
                if deadline.expired():
                    raise GuestTimeout(f"the guest stopped reading its command channel: "
                                       f"{len(view)} of {len(data)} bytes not taken within "
                                       f"{timeout:.0f}s{deadline.describe()}",
                                       self.tail()) from None
                continue
            except OSError as exc:
                self.alive()
                raise LaunchError(f"cannot write to the guest's command channel: {exc}\n"
                                  f"{self.tail()}") from exc
            view = view[sent:]

    # -- waiting ---------------------------------------------------------------
    def wait_for(self, found: Callable[[bytearray], object], timeout: float, what: str,
                 watch: Callable[[], None] | None = None) -> object:
        """Read both lines until ``found(channel buffer)`` returns something truthy.

        A panic on the kernel's console (any time) or an initramfs giving up
        (while booting), an EOF, a dead QEMU, what ``watch`` raises (a failed
        in-process backend) and the deadline end the wait precisely.
        """
        deadline = Deadline(timeout, self.qemu_pid)
        checked = time.monotonic()
        while True:
            result = found(self._channel.buf)
            if result:
                return result
            slice_ = max(0.05, min(0.5, deadline.remaining()))
            try:
                ready, _, _ = select.select([self._kernel, self._channel], [], [], slice_)
                for line in ready:
                    self._read(line, what)
            except OSError as exc:  # ECONNRESET: QEMU died under us
                self._wait_for_exit()
                raise LaunchError(f"QEMU dropped the console while {what}: {exc}\n"
                                  f"{self.tail()}") from exc
            # Also while a line keeps talking: a kernel printing faster than
            # every slice must not hold the wait open past its deadline.
            if not ready or time.monotonic() - checked >= _CHECK_EVERY:
                checked = time.monotonic()
                self._check(deadline, timeout, what, watch)

    def _check(self, deadline: Deadline, timeout: float, what: str,
               watch: Callable[[], None] | None) -> None:
        """QEMU alive, the backends well, the deadline not passed; else raise."""
        self.alive()
        if watch is not None:
            watch()
        if deadline.expired():
            raise GuestTimeout(f"guest did not answer within {timeout:.0f}s while "
                               f"{what}{deadline.describe()}", self.tail())

    def _read(self, line: _Line, what: str) -> None:
        before = len(line.buf)
        line.fill()
        if line is self._kernel:
            alarm = self._watch.feed(bytes(line.buf[before:]), self._booting)
            line.buf.clear()
            if alarm is not None:
                self._alarm(alarm, what)
        if line.eof:
            # QEMU's sockets close as it exits, a moment before its exit status
            # is there to read: give alive() the chance to name the cause.
            self._wait_for_exit()
            raise LaunchError(f"QEMU closed the {line.name} while {what}\n{self.tail()}")

    def _alarm(self, alarm: tuple[str, str], what: str) -> None:
        kind, message = alarm
        if kind == "panic":
            self._collect_after_panic()
            raise GuestPanic(f"guest kernel panicked while {what}: {message}", self.tail())
        raise GuestError(message, self.tail())

    def _wait_for_exit(self, grace: float = 2.0) -> None:
        """A reset console means QEMU is dying: let ``alive()`` see its exit status."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.alive()
            time.sleep(0.02)

    def _collect_after_panic(self) -> None:
        """Let the panic's trace reach the log before it is quoted."""
        end = time.monotonic() + 0.5
        with contextlib.suppress(OSError):
            while time.monotonic() < end and not self._kernel.eof:
                select.select([self._kernel], [], [], 0.1)
                self._kernel.fill()
                self._kernel.buf.clear()

    def expect(self, pattern: str, timeout: float, what: str,
               watch: Callable[[], None] | None = None) -> tuple[str, ...]:
        """Wait for ``pattern`` on the command channel; its groups, consumed up to its end."""
        compiled = re.compile(pattern.encode())
        match = self.wait_for(compiled.search, timeout, what, watch)
        assert isinstance(match, re.Match)
        # Copied out before the buffer they point into is cut.
        groups = tuple(g.decode("utf-8", "replace") if g is not None else ""
                       for g in match.groups())
        del self._channel.buf[:match.end()]
        return groups

    def wait_ready(self, timeout: float) -> float:
        """Wait for the channel shell's readiness line; returns the guest uptime it reported."""
        (uptime,) = self.expect(READY_RE, timeout, "booting")
        self.adopt_booted()
        log.info("guest ready: its command shell answered at uptime %s s", uptime)
        return float(uptime)

    def begin_reboot(self) -> None:
        """The guest is about to boot again: what the old shell left is dropped, the
        boot watch (initramfs giving up) is armed, and the next shell gets our functions."""
        self._channel.buf.clear()
        self._booting = True
        self._dirty = False
        self._prepared = False

    def adopt_booted(self) -> None:
        """A shell that is up, with its mode set, but not yet given our functions."""
        self._booting = False
        self._prepared = False

    def adopt_restored(self) -> None:
        """A guest loaded from a snapshot: its shell was prepared before the save."""
        self._booting = False
        self._prepared = True

    # -- commands --------------------------------------------------------------
    def run(self, cmd: str, timeout: float,
            watch: Callable[[], None] | None = None) -> Result:
        """Run ``cmd`` in the guest shell; stdout and stderr come back byte-exact.

        ``watch`` is called while waiting; what it raises ends the wait (the
        command is interrupted, as on a timeout).  A command the guest refused
        (bytes lost on the way in: none of it ran) is sent once more after a
        resync; a result the terminal mangled is an error after a resync.
        """
        start = time.monotonic()
        try:
            frame = self._run_once(cmd, timeout, watch)
        except ChannelRefused as exc:
            log.warning("command channel: %s; resynchronising and sending it again", exc)
            self._resync(timeout)
            frame = self._run_once(cmd, timeout, watch)
        except ShellRestarted as exc:
            # Resync before the next command: if the READY was not a real restart,
            # the old command may still run; a real new shell needs our functions.
            self._dirty, self._prepared = True, False
            raise ShellRestarted(f"{exc}; the command was {cmd[:200]!r}", self.tail()) from None
        except ChannelMode as exc:
            self._resync(timeout)
            raise ChannelMode(f"{exc} (the command was {cmd[:200]!r}; the channel's mode is "
                              "restored for the next command)", self.tail()) from None
        log.debug("ran %r: rc %d, %d+%d bytes", cmd[:200], frame.rc, len(frame.stdout),
                  len(frame.stderr))
        return Result(cmd=cmd, rc=frame.rc, stdout_bytes=frame.stdout,
                      stderr_bytes=frame.stderr, duration=time.monotonic() - start)

    def _run_once(self, cmd: str, timeout: float,
                  watch: Callable[[], None] | None) -> Frame:
        nonce = secrets.token_hex(8)
        script = command_script(cmd, nonce)
        if self._dirty:
            self._resync(timeout)
        # A READY left over means a new shell started since: it lacks our functions.
        fresh = not self._prepared or _READY.search(self._channel.buf) is not None
        prelude = self._prelude() if fresh else b""
        self._dirty = True
        self._channel.buf.clear()
        self.send(prelude + script, timeout)
        self._prepared = True
        try:
            frame = self.wait_for(FrameScan(nonce), timeout, f"running {cmd[:200]!r}", watch)
        except (GuestTimeout, BackendError):
            self.send(b"\x03")
            raise
        assert isinstance(frame, Frame)
        del self._channel.buf[:frame.end]
        self._dirty = False
        return frame

    @staticmethod
    def _prelude() -> bytes:
        """The functions a new shell needs (init already set its mode: no exec here)."""
        return f"{SHELL_FUNCTIONS}\n".encode()

    def _resync(self, timeout: float) -> None:
        """After an interrupted command or a lost shell: ^C and a marker, until one echoes.

        Each round sends ^C, lets the shell take it, then the marker line with
        the mode and functions.  The ^C is what makes a round work whatever the
        shell was doing: an interactive shell drops its half-parsed input on
        SIGINT, and a shell that started reading part-way through an earlier
        line (the one before it was killed by ``kill -9 $$`` and init started
        a new one) may sit inside an unclosed quote, where no later line, each
        with its quotes paired, would ever close it.  Rounds grow apart (1 s,
        2 s, ... at most :data:`_RESYNC_MAX`): under a loaded host a round's
        ^C must not keep cutting the previous round's marker short.
        """
        log.info("resynchronising the command channel")
        deadline = Deadline(timeout, self.qemu_pid)
        sent: list[bytes] = []

        def echoed(buf: bytearray) -> int:
            return max((buf.find(m) + len(m) for m in sent if m in buf), default=0)

        for round_ in itertools.count(1):
            self.send(b"\x03")
            end = self._wait_quietly(echoed, _RESYNC_SETTLE)
            if not end:
                nonce = secrets.token_hex(8).encode()
                sent.append(nonce + b"Z\n")
                self.send(f"\n{STTY}; {SHELL_FUNCTIONS}; printf '%sZ\\n' ".encode()
                          + nonce + b"\n")
                every = min(_RESYNC_EVERY * round_, _RESYNC_MAX)
                end = self._wait_quietly(echoed, min(every, max(0.05, deadline.remaining())))
            if end:
                assert isinstance(end, int)
                del self._channel.buf[:end]
                break
            if deadline.expired():
                raise GuestTimeout(
                    f"the guest's command shell did not come back within {timeout:.0f}s "
                    f"after an interrupted command: the guest is lost{deadline.describe()}",
                    self.tail())
            log.info("command channel: no answer to resync round %d; sending ^C and the "
                     "marker again", round_)
        self._dirty = False
        self._prepared = True

    def _wait_quietly(self, found: Callable[[bytearray], object], timeout: float) -> object:
        """:meth:`wait_for`, with its deadline an answer of ``None`` (a death still raises)."""
        try:
            return self.wait_for(found, timeout, "resynchronising the command channel")
        except GuestTimeout:
            return None


def _connect(path: str, deadline: float, alive: Callable[[], None]) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"console socket {path} never appeared") from None
            time.sleep(0.02)


def no_channel_diagnosis(device: str) -> str:
    """The guest's kernel has no terminal for the command channel: it cannot start."""
    if "hvc" in device:
        return (f"the guest has no {device} for the command channel "
                "(command_channel='virtio-console'): its kernel lacks CONFIG_VIRTIO_CONSOLE, "
                "or the virtio_console module is missing from its modules tree; use "
                "command_channel='serial' with this kernel")
    return (f"the guest has no {device} for the command channel: its kernel registered "
            "fewer than two 8250 serial ports (it needs CONFIG_SERIAL_8250 and "
            "8250.nr_uarts>=2, which pytest-virtio puts on the kernel command line)")


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

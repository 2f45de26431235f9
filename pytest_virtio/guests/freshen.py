"""Making a restored guest as fresh as a boot: its wall clock and its CRNG.

Every guest restored from one template wakes with the template's clock (the
instant of the save) and the template's RNG state, so two of them would
produce the same "random" bytes.  Its first console command therefore sets the
clock from the host's and credits host bytes to the kernel's input pool, then
reseeds the CRNG at once (linux/random.h: RNDADDENTROPY, RNDRESEEDCRNG; a write
to /dev/urandom alone mixes the bytes in but leaves the CRNG as it is until
its next scheduled reseed).

Why a resident helper: TCG's translation cache is not part of the saved state,
so every program a restored guest runs is translated from nothing.  A perl
started per restore cost 0.15 s of a 0.36 s restore that way (measured, A/B on
one template).  So before the save the template starts one perl that waits on
a FIFO (:func:`start_command`); a restored guest's first command writes one
request line to it and reads the reply with dash builtins only, no exec
(:func:`request_command`).  A request marked ``last`` makes the helper exit
and remove its directory after replying, so the test's guest holds no trace of
it.  The template's own first guest, which runs on for its test, sends one
such request too after the save (its clock stood still while it was saved).
"""

from __future__ import annotations

import secrets
import shlex
import time

#: The helper's directory in the guest (a tmpfs): its request and reply FIFOs
#: and its pid (written by the shell that started it).
DIR = "/run/pytest-virtio-freshen"

#: x86_64 settimeofday (arch/x86/entry/syscalls/syscall_64.tbl); guests here
#: are x86_64 only.
_SYS_SETTIMEOFDAY = 164
#: _IOW('R', 0x03, int[2]) and _IO('R', 0x07), include/uapi/linux/random.h.
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207

#: The helper: ``perl -e HELPER DIR``.  One request per line, ``SECONDS
#: MICROSECONDS HEX MODE`` (MODE ``stay`` or ``last``); the reply is ``ok`` or
#: what failed.  A bad request gets an error reply, never a silent death (the
#: shell would wait on its FIFO until the command's timeout); one whose MODE is
#: not ``stay`` counts as ``last``, so a garbled request leaves no helper
#: behind.  The entropy is credited as 8 bits per byte: struct rand_pool_info
#: {int entropy_count; int buf_size; __u32 buf[];}.  Its pid file is written by
#: the shell that starts it (:func:`start_command`), the one writer.
HELPER = f"""
$0 = "pytest-virtio-freshen";
$SIG{{HUP}} = $SIG{{INT}} = "IGNORE";
require POSIX; POSIX::setsid();
my $d = shift;
sub freshen {{
    my ($s, $us, $hex) = @_;
    $s =~ /^\\d+$/ && $us =~ /^\\d{{1,6}}$/ or die "bad clock '$s.$us'\\n";
    $hex =~ /^(?:[0-9a-f]{{2}})+$/ or die "bad entropy\\n";
    syscall({_SYS_SETTIMEOFDAY}, pack("l!l!", $s, $us), 0) == 0 or die "settimeofday: $!\\n";
    my $b = pack("H*", $hex);
    open(my $f, ">", "/dev/urandom") or die "/dev/urandom: $!\\n";
    ioctl($f, {_RNDADDENTROPY}, pack("ii", 8 * length($b), length($b)) . $b)
        or die "RNDADDENTROPY: $!\\n";
    ioctl($f, {_RNDRESEEDCRNG}, 0) or die "RNDRESEEDCRNG: $!\\n";
    close $f;
}}
while (1) {{
    open(my $in, "<", "$d/req") or exit 1;
    my $line = <$in> // ""; close $in;
    my ($s, $us, $hex, $mode) = split " ", $line;
    my $reply = eval {{ ($mode // "") =~ /^(?:stay|last)$/ or die "bad request\\n";
                       freshen($s // "", $us // "", $hex // ""); "ok" }};
    $reply = $@ unless defined $reply;
    $reply =~ s/\\s+/ /g; $reply =~ s/ $//;
    my $last = ($mode // "") ne "stay";
    unlink "$d/req", "$d/pid" if $last;
    open(my $out, ">", "$d/ack") or exit 1; print $out "$reply\\n"; close $out;
    if ($last) {{ unlink "$d/ack"; rmdir $d; exit 0; }}
}}
"""


def start_command(directory: str = DIR) -> str:
    """The template's command, before its save: make the FIFOs, start the helper.

    Fails (no hang) on a rootfs without perl.  The shell writes the helper's
    pid before the command returns, so the first request's liveness check
    never races the helper's start.  The helper leaves the console's session
    (``POSIX::setsid``) and ignores SIGINT and SIGHUP: a ^C to the console
    shell must not reach it.
    """
    d = shlex.quote(directory)
    return (f"command -v perl >/dev/null && rm -rf {d} && mkdir -m 700 {d} && "
            f"mkfifo {d}/req {d}/ack && "
            f"(perl -e {shlex.quote(HELPER)} {d} </dev/null >/dev/null 2>&1 & echo $! > {d}/pid)")


def stop_command(directory: str = DIR) -> str:
    """For a guest that will not be a template after all: end the helper, if any."""
    d = shlex.quote(directory)
    return (f"{{ read -r __pv_p < {d}/pid && kill $__pv_p; }} 2>/dev/null; rm -rf {d}; true")


def request_line(now: float | None = None, entropy: bytes | None = None,
                 last: bool = True) -> str:
    """``SECONDS MICROSECONDS HEX MODE``: the host's clock now, 64 fresh bytes."""
    when = time.time() if now is None else now
    seconds, micros = divmod(round(when * 1_000_000), 1_000_000)
    seed = secrets.token_bytes(64) if entropy is None else entropy
    return f"{seconds} {micros} {seed.hex()} {'last' if last else 'stay'}"


def request_command(line: str, directory: str = DIR) -> str:
    """Send one request and fail, saying why, unless the helper replies ``ok``.

    Dash builtins only.  The helper's pid is checked first, so a missing or
    dead helper fails at once instead of blocking on the FIFO.
    """
    d = shlex.quote(directory)
    return (f"if {{ read -r __pv_p < {d}/pid; }} 2>/dev/null && [ -d /proc/$__pv_p ]; then "
            f"echo {line} > {d}/req && read -r __pv_r < {d}/ack && "
            f'{{ [ "$__pv_r" = ok ] || {{ echo "pytest-virtio: freshening the guest failed: '
            f'$__pv_r" >&2; false; }}; }}; '
            f'else echo "pytest-virtio: the freshening helper is not running in this guest" '
            f">&2; false; fi")


__all__ = ["DIR", "HELPER", "request_command", "request_line", "start_command",
           "stop_command"]

"""dd: the lowest common denominator workload, present in every guest (busybox too).

dd reports on stderr, in a human format that differs between implementations:

* GNU coreutils ≥ 8.24: ``67108864 bytes (67 MB, 64 MiB) copied, 0.0433721 s, 1.5 GB/s``
  (older ones omit the ``, 64 MiB``; tiny copies omit the parenthesis; very fast
  ones print the time as ``6.9289e-05 s``; ``status=progress`` adds ``\\r``-separated
  interim lines of the same form; some locales write ``0,043 s``).
* busybox with ``FEATURE_DD_THIRD_STATUS_LINE``:
  ``67108864 bytes (64.0MB) copied, 0.051245 seconds, 1.2GB/s``.  Builds without the
  feature (Debian's busybox-static among them) print only the records lines, so
  no rate can be measured: we say so instead of guessing.

We recompute the rate from bytes and seconds rather than trusting dd's rounded,
implementation-specific unit string.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.units import parse_size

__all__ = ["DIRECTIONS", "DdJob", "DdResult", "check_dd_run", "dd_shell", "parse_dd"]

#: Which way a :class:`DdJob` copies: zeros onto the disk, or the disk into /dev/null.
DIRECTIONS = ("write", "read")

_COPIED_RE = re.compile(
    r"(?P<bytes>\d+) bytes?(?: \([^)]*\))? copied, (?P<seconds>[0-9.,eE+-]+) (?:s|seconds?)\b"
)
_FLAG_RE = re.compile(r"^[a-z_]+(?:,[a-z_]+)*$")


@dataclass(frozen=True)
class DdResult:
    """Bytes copied, elapsed seconds, and bytes per second (``0.0`` if dd saw no time)."""

    bytes: int
    seconds: float
    bw: float


def _block_size(bs: object) -> int:
    """``bs`` in bytes (the size grammar), refusing zero."""
    block = parse_size(bs, "dd: bs") if isinstance(bs, int | str) else -1
    if block <= 0:
        raise ConfigError(f"dd: bs={bs!r} must be a size greater than zero, e.g. '1M'")
    return block


def _check_count(count: object) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"dd: count={count!r} must be an integer >= 1")


@dataclass(frozen=True)
class DdJob:
    """One dd run through a disk, as data: ``direction`` ``"write"`` copies zeros onto
    the disk, ``"read"`` copies the disk to /dev/null; ``count`` blocks of ``bs``
    bytes (a size such as ``"1M"`` is taken and stored in bytes), direct I/O on the
    disk's side.  Validated at construction, so a bad job fails at collection."""

    direction: str = "write"
    bs: int = 1 << 20
    count: int = 64

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"dd: direction={self.direction!r} must be one of "
                              f"{', '.join(DIRECTIONS)}")
        object.__setattr__(self, "bs", _block_size(self.bs))
        _check_count(self.count)


def _flag(name: str, value: str | None) -> list[str]:
    """``iflag``/``oflag``/``conv`` words; their values are comma lists of identifiers."""
    if value is None:
        return []
    if not _FLAG_RE.match(value):
        raise ConfigError(f"dd: {name}={value!r} must be a comma list like 'direct,sync'")
    return [f"{name}={value}"]


def dd_shell(
    source: str,
    dest: str,
    *,
    bs: str | int = "1M",
    count: int | None = None,
    iflag: str | None = None,
    oflag: str | None = None,
    conv: str | None = None,
) -> str:
    """A quoted ``dd`` command line; ``bs`` is validated and written in bytes.

    Bytes, because GNU and busybox disagree on suffix spellings (``1M`` vs
    ``1MiB``) but both take a plain number.
    """
    block = _block_size(bs)
    if count is not None:
        _check_count(count)
    words = ["dd", f"if={source}", f"of={dest}", f"bs={block}"]
    if count is not None:
        words.append(f"count={count}")
    words += _flag("iflag", iflag) + _flag("oflag", oflag) + _flag("conv", conv)
    return shlex.join(words)


def parse_dd(stderr: str) -> DdResult:
    """The final ``... bytes ... copied, T s, R`` line of dd's stderr as numbers."""
    matches = list(_COPIED_RE.finditer(stderr.replace("\r", "\n")))
    if not matches:
        hint = ""
        if "records out" in stderr:
            hint = (
                " (this dd prints only record counts: busybox built without"
                " FEATURE_DD_THIRD_STATUS_LINE; use coreutils dd)"
            )
        raise WorkloadError(f"no transfer summary in dd output{hint}\n--- dd stderr ---\n{stderr}")
    last = matches[-1]
    num_bytes = int(last["bytes"])
    try:
        seconds = float(last["seconds"].replace(",", "."))
    except ValueError:
        raise WorkloadError(f"dd printed an unreadable time {last['seconds']!r}") from None
    return DdResult(num_bytes, seconds, num_bytes / seconds if seconds > 0 else 0.0)


def check_dd_run(rc: int, stderr: str) -> DdResult:
    """Judge a finished dd: non-zero status raises with dd's message, else parse."""
    if rc != 0:
        raise WorkloadError(f"dd exited with status {rc}\n--- dd stderr ---\n{stderr.strip()}")
    return parse_dd(stderr)

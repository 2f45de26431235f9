"""fio: describe a job as data, turn it into a command, turn fio's JSON into numbers.

Nothing here runs a process.  The guest layer runs the command that
:func:`fio_shell` builds and hands the exit status and both streams to
:func:`check_fio_run`; keeping it pure means every shape of fio output we have
ever met is a unit test, not a QEMU boot.

Output shapes understood by :func:`parse_fio_json`:

* fio 3.x: ``read``/``write`` sections with ``bw_bytes`` (bytes/s), ``io_bytes``
  (bytes) and latencies in ``lat_ns``/``clat_ns`` (nanoseconds), percentiles keyed
  ``"99.000000"`` under ``clat_ns`` (or ``lat_ns`` when ``lat_percentiles=1``).
* fio 2.x: no ``bw_bytes``; ``bw`` in KiB/s, ``io_bytes`` in KiB, latencies in
  ``lat``/``clat`` in microseconds.
* Text before the JSON object (fio writes warnings such as
  ``note: both iodepth >= 1 and synchronous I/O engine ...`` or
  ``fio: pid=..., err=84/...`` there, and a serial console merges stderr into
  stdout) and text after it are ignored but kept for error messages.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.units import parse_duration, parse_size

__all__ = [
    "IOENGINES",
    "RW_MODES",
    "VERIFY_METHODS",
    "FioJob",
    "FioJobResult",
    "FioResult",
    "IoStats",
    "check_fio_run",
    "extract_json_object",
    "fio_argv",
    "fio_jobfile_shell",
    "fio_shell",
    "parse_fio_json",
]

RW_MODES = (
    "read",
    "write",
    "randread",
    "randwrite",
    "rw",
    "readwrite",
    "randrw",
    "trim",
    "randtrim",
    "trimwrite",
)
IOENGINES = ("libaio", "io_uring", "psync", "sync", "pvsync", "pvsync2", "posixaio", "mmap", "null")
VERIFY_METHODS = (
    "md5",
    "crc64",
    "crc32c",
    "crc32c-intel",
    "crc32",
    "crc16",
    "crc7",
    "xxhash",
    "sha512",
    "sha256",
    "sha1",
    "sha3-224",
    "sha3-256",
    "sha3-384",
    "sha3-512",
    "meta",
    "pattern",
    "null",
)
SEQUENTIAL_MODES = frozenset({"read", "write", "rw", "readwrite", "trim", "trimwrite"})

# fio reports a failed data verification as EILSEQ ("Invalid or incomplete
# multibyte or wide character"), which reads like nonsense unless we translate it.
_VERIFY_ERRNO = errno.EILSEQ
_OPTION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SECTION_RE = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_OPTION_LINE_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:=\s*(.*?))?\s*$")
_STDERR_TAIL_LINES = 40

OptionValue = str | int | bool


def _allowed(values: Iterable[str]) -> str:
    return ", ".join(values)


def _fio_size(num_bytes: int) -> str:
    """The shortest exact fio spelling of a byte count (``4096`` → ``"4k"``)."""
    for suffix, power in (("T", 4), ("G", 3), ("M", 2), ("k", 1)):
        unit = 1024**power
        if num_bytes >= unit and num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


def _fio_time(ns: int) -> str:
    """fio's own time syntax; whole seconds stay readable, anything finer uses ms/us."""
    for suffix, unit in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= unit and ns % unit == 0:
            return f"{ns // unit}{suffix}"
    raise ConfigError(f"fio job: runtime {ns} ns is below fio's 1us resolution")


def _validate_option_value(key: str, value: object) -> str:
    """fio option values become argv words, so they must be flat scalars."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        text = str(value)
        if "\n" in text or "\x00" in text:
            raise ConfigError(f"fio job: option {key}={value!r} contains a newline or NUL")
        return text
    raise ConfigError(f"fio job: option {key}={value!r} must be a str, int or bool")


@dataclass(frozen=True)
class FioJob:
    """One fio job as data: hashable, comparable, printable in a test id.

    ``extra`` carries any fio option we do not model (``rwmixread``,
    ``verify_pattern`` …) as ``{"name": value}``; it is excluded from hashing
    because dicts are not hashable, and the modelled fields identify a job.
    """

    filename: str
    rw: str = "randread"
    bs: str | int = "4k"
    iodepth: int = 16
    runtime: str | int | None = None
    size: str | int | None = None
    numjobs: int = 1
    ioengine: str = "libaio"
    direct: int = 1
    time_based: bool = False
    verify: str | None = None
    name: str = "job"
    extra: Mapping[str, OptionValue] = field(default_factory=dict, hash=False)

    #: What a caller budgets for a job without a runtime (fio then runs until
    #: ``size`` is done, which it cannot know beforehand).
    UNTIMED_SECONDS = 10.0

    @property
    def runtime_seconds(self) -> float:
        """The job's runtime in seconds (:data:`UNTIMED_SECONDS` when unset)."""
        if self.runtime is None:
            return self.UNTIMED_SECONDS
        return runtime_ns(self.runtime) / 1e9

    def __post_init__(self) -> None:
        """Validate at construction so a bad job fails at collection, not in a guest."""
        if not self.filename or "\n" in self.filename:
            raise ConfigError(f"fio job: filename={self.filename!r} must be a non-empty path")
        if self.rw not in RW_MODES:
            raise ConfigError(
                f"fio job: rw={self.rw!r} is not a fio I/O pattern; allowed: {_allowed(RW_MODES)}"
            )
        _job_bytes("bs", self.bs)
        if self.size is not None:
            _job_bytes("size", self.size)
        if self.runtime is not None:
            runtime_ns(self.runtime)
        for key in ("iodepth", "numjobs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"fio job: {key}={value!r} must be an integer >= 1")
        if self.ioengine not in IOENGINES:
            raise ConfigError(
                f"fio job: ioengine={self.ioengine!r} is not supported; "
                f"allowed: {_allowed(IOENGINES)}"
            )
        if self.direct not in (0, 1):
            raise ConfigError(f"fio job: direct={self.direct!r} must be 0 or 1")
        if self.verify is not None and self.verify not in VERIFY_METHODS:
            raise ConfigError(
                f"fio job: verify={self.verify!r} is not a fio verify method; "
                f"allowed: {_allowed(VERIFY_METHODS)}"
            )
        if not _OPTION_NAME_RE.match(self.name):
            raise ConfigError(f"fio job: name={self.name!r} must match [a-z][a-z0-9_]*")
        for key, value in self.extra.items():
            if not _OPTION_NAME_RE.match(key):
                raise ConfigError(f"fio job: extra option name {key!r} must match [a-z][a-z0-9_]*")
            _validate_option_value(key, value)

    @property
    def sequential(self) -> bool:
        """Sequential jobs are judged by bandwidth, random ones by IOPS."""
        return self.rw in SEQUENTIAL_MODES


def _job_bytes(key: str, value: str | int) -> int:
    """A size option as bytes, with a ConfigError that names the fio option."""
    try:
        num = parse_size(value)
    except ConfigError as exc:
        raise ConfigError(f"fio job: {key}={value!r} is not a size; use e.g. 4k, 1M, 1G") from exc
    if num <= 0:
        raise ConfigError(f"fio job: {key}={value!r} must be greater than zero")
    return num


def runtime_ns(value: str | int) -> int:
    """A bare runtime number means seconds, as in fio; strings may carry a unit."""
    if isinstance(value, bool):
        raise ConfigError(f"fio job: runtime={value!r} must be seconds or a duration like '5s'")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"fio job: runtime={value!r} must be greater than zero")
        return value * 1_000_000_000
    try:
        ns = parse_duration(value) if not value.strip().isdigit() else int(value) * 10**9
    except ConfigError as exc:
        raise ConfigError(
            f"fio job: runtime={value!r} must be seconds or a duration like '5s', '500ms'"
        ) from exc
    if ns <= 0:
        raise ConfigError(f"fio job: runtime={value!r} must be greater than zero")
    return ns


def _job_options(job: FioJob) -> list[tuple[str, str]]:
    """The job's fio options in a stable order (stable argv makes golden tests work)."""
    options: list[tuple[str, str]] = [
        ("name", job.name),
        ("filename", job.filename),
        ("rw", job.rw),
        ("bs", _fio_size(_job_bytes("bs", job.bs))),
        ("iodepth", str(job.iodepth)),
        ("ioengine", job.ioengine),
        ("direct", str(job.direct)),
        ("numjobs", str(job.numjobs)),
    ]
    if job.size is not None:
        options.append(("size", _fio_size(_job_bytes("size", job.size))))
    if job.runtime is not None:
        options.append(("runtime", _fio_time(runtime_ns(job.runtime))))
    if job.time_based:
        options.append(("time_based", "1"))
    if job.verify is not None:
        options.append(("verify", job.verify))
    options.extend((key, _validate_option_value(key, value)) for key, value in job.extra.items())
    return options


def fio_argv(job: FioJob) -> list[str]:
    """``["fio", "--name=job", ..., "--output-format=json"]`` for ``job``."""
    return [
        "fio",
        *(f"--{key}={value}" for key, value in _job_options(job)),
        "--output-format=json",
    ]


def fio_shell(job: FioJob) -> str:
    """:func:`fio_argv` as one shell-quoted line, ready for ``guest.run``."""
    return shlex.join(fio_argv(job))


def _validate_jobfile(text: str) -> None:
    """Catch the mistakes that would otherwise surface as a puzzling fio error in a guest."""
    if "\x00" in text:
        raise ConfigError("fio job file contains a NUL byte")
    sections = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if _SECTION_RE.match(stripped):
            sections += 1
            continue
        match = _OPTION_LINE_RE.match(stripped)
        if match is None:
            raise ConfigError(f"fio job file line {number}: cannot parse {stripped!r}")
        key, value = match.groups()
        if sections == 0:
            raise ConfigError(f"fio job file line {number}: option {key!r} before any [section]")
        if key == "rw" and value is not None and value not in RW_MODES:
            raise ConfigError(
                f"fio job file line {number}: rw={value!r} is not a fio I/O pattern; "
                f"allowed: {_allowed(RW_MODES)}"
            )
        if key == "bs" and value is not None and "," not in value and "-" not in value:
            _job_bytes("bs", value)
    if sections == 0:
        raise ConfigError("fio job file has no [section]; fio needs at least one job")


def fio_jobfile_shell(text: str) -> str:
    """A one-line command that feeds job-file ``text`` to ``fio -`` on stdin.

    One line, because the command goes through a serial console where a
    multi-line heredoc would echo continuation prompts into the output; stdin,
    because then no temporary file is left in the guest.
    """
    _validate_jobfile(text)
    body = text if text.endswith("\n") else text + "\n"
    escaped = body.replace("\\", "\\\\").replace("%", "%%").replace("\n", "\\n")
    return f"printf {shlex.quote(escaped)} | fio --output-format=json -"


@dataclass(frozen=True)
class IoStats:
    """One direction (read or write) of a fio result, in base units.

    Percentiles are ``None`` when fio did not report them (``percentile_list``
    without that point, or a direction that did no I/O).
    """

    iops: float = 0.0
    bw_bytes: float = 0.0
    lat_mean_ns: float = 0.0
    lat_p50_ns: float | None = None
    lat_p99_ns: float | None = None
    lat_p999_ns: float | None = None
    io_bytes: int = 0
    runtime_ms: int = 0
    total_ios: int = 0


@dataclass(frozen=True)
class FioJobResult:
    """One entry of fio's ``jobs`` array, kept so per-job numbers stay inspectable."""

    name: str
    error: int
    read: IoStats
    write: IoStats
    total_err: int = 0
    options: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class FioResult:
    """What a fio run did, aggregated over all its jobs.

    Across jobs IOPS, bandwidth and bytes add up; mean latency is weighted by
    each job's I/O count, which is exact.  Percentiles are I/O-weighted averages
    of the jobs' percentiles, which is an approximation: run with
    ``group_reporting=1`` when exact cross-job percentiles matter (fio then
    merges the histograms and reports one job).
    """

    read: IoStats
    write: IoStats
    errors: int = 0
    verify_ok: bool | None = None
    jobs: tuple[FioJobResult, ...] = ()
    fio_version: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def iops(self) -> float:
        """Read plus write IOPS: the number a randrw threshold is about."""
        return self.read.iops + self.write.iops

    @property
    def bw(self) -> float:
        """Read plus write bandwidth in bytes per second."""
        return self.read.bw_bytes + self.write.bw_bytes

    @property
    def lat_mean_ns(self) -> float:
        """Mean completion-to-submission latency over both directions, I/O-weighted."""
        return (
            _weighted(
                [
                    (self.read.lat_mean_ns, self.read.total_ios),
                    (self.write.lat_mean_ns, self.write.total_ios),
                ]
            )
            or 0.0
        )

    @property
    def lat_p99_ns(self) -> float | None:
        """The worse of the two directions' p99: a latency bound must hold for both."""
        values = [
            s.lat_p99_ns
            for s in (self.read, self.write)
            if s.lat_p99_ns is not None and s.total_ios > 0
        ]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no ``raw``), for reports and xdist transport."""
        return {
            "read": asdict(self.read),
            "write": asdict(self.write),
            "iops": self.iops,
            "bw": self.bw,
            "errors": self.errors,
            "verify_ok": self.verify_ok,
            "jobs": [
                {
                    "name": j.name,
                    "error": j.error,
                    "total_err": j.total_err,
                    "read": asdict(j.read),
                    "write": asdict(j.write),
                }
                for j in self.jobs
            ],
            "fio_version": self.fio_version,
        }


def _weighted(pairs: Iterable[tuple[float | None, int]]) -> float | None:
    """Weighted mean of the values that exist; ``None`` when nothing carries weight."""
    total = 0.0
    weight = 0
    for value, count in pairs:
        if value is not None and count > 0:
            total += value * count
            weight += count
    return total / weight if weight else None


def _num(mapping: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    """A finite float from fio's JSON, tolerating absent keys and odd types."""
    value = mapping.get(key, default)
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _percentile(percentiles: Mapping[str, Any], point: float) -> float | None:
    """fio keys percentiles as ``"99.000000"``; compare numerically, not textually."""
    for key, value in percentiles.items():
        try:
            if math.isclose(float(key), point):
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _direction_stats(section: Mapping[str, Any]) -> IoStats:
    """One ``read``/``write`` section → :class:`IoStats`, for fio 3.x or 2.x."""
    if "lat_ns" in section or "clat_ns" in section or "bw_bytes" in section:
        scale = 1.0
        lat: Mapping[str, Any] = section.get("lat_ns") or {}
        clat: Mapping[str, Any] = section.get("clat_ns") or {}
        io_bytes = int(_num(section, "io_bytes"))
        bw_bytes = _num(section, "bw_bytes", _num(section, "bw") * 1024)
    else:  # fio 2.x: microseconds, KiB and KiB/s
        scale = 1000.0
        lat = section.get("lat") or {}
        clat = section.get("clat") or {}
        io_bytes = int(_num(section, "io_bytes")) * 1024
        bw_bytes = _num(section, "bw") * 1024
    percentiles = lat.get("percentile") or clat.get("percentile") or {}
    lat_mean = _num(lat, "mean") if lat else _num(clat, "mean")

    def point(p: float) -> float | None:
        value = _percentile(percentiles, p)
        return None if value is None else value * scale

    iops = _num(section, "iops")
    runtime_ms = int(_num(section, "runtime"))
    total_ios = int(_num(section, "total_ios", iops * runtime_ms / 1000))
    if total_ios == 0:
        return IoStats(runtime_ms=runtime_ms)
    return IoStats(
        iops=iops,
        bw_bytes=bw_bytes,
        lat_mean_ns=lat_mean * scale,
        lat_p50_ns=point(50.0),
        lat_p99_ns=point(99.0),
        lat_p999_ns=point(99.9),
        io_bytes=io_bytes,
        runtime_ms=runtime_ms,
        total_ios=total_ios,
    )


def _aggregate(stats: list[IoStats]) -> IoStats:
    """Sum what adds up, I/O-weight what averages; see :class:`FioResult`."""
    active = [s for s in stats if s.total_ios > 0]
    if not active:
        return IoStats(runtime_ms=max((s.runtime_ms for s in stats), default=0))
    if len(active) == 1:
        return active[0]

    def weighted(attr: str) -> float | None:
        return _weighted((getattr(s, attr), s.total_ios) for s in active)

    return IoStats(
        iops=sum(s.iops for s in active),
        bw_bytes=sum(s.bw_bytes for s in active),
        lat_mean_ns=weighted("lat_mean_ns") or 0.0,
        lat_p50_ns=weighted("lat_p50_ns"),
        lat_p99_ns=weighted("lat_p99_ns"),
        lat_p999_ns=weighted("lat_p999_ns"),
        io_bytes=sum(s.io_bytes for s in active),
        runtime_ms=max(s.runtime_ms for s in active),
        total_ios=sum(s.total_ios for s in active),
    )


def extract_json_object(
    text: str, *, required_key: str, what: str
) -> tuple[str, dict[str, Any], str]:
    """(noise before, the JSON object, noise after) from mixed console output.

    The object is the first line starting with ``{`` that decodes as a JSON
    object carrying ``required_key``: warnings may precede it and shell prompts
    or kernel messages may follow it, and neither must hide the result.  Shared
    with the iperf3 parser, whose output reaches us the same way.
    """
    decoder = json.JSONDecoder()
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("{"):
            start = offset + (len(line) - len(line.lstrip()))
            try:
                obj, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                obj, end = None, start
            if isinstance(obj, dict) and required_key in obj:
                return text[:start], obj, text[end:]
        offset += len(line)
    raise WorkloadError(
        f"no {what} JSON found in the output (was its JSON output option given?)"
        + _section(f"{what} output", text)
    )


def _section(title: str, text: str) -> str:
    """A titled block of the last lines of ``text`` for an error message ('' if empty)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return f"\n--- {title} ---\n" + "\n".join(lines[-_STDERR_TAIL_LINES:])


def _errno_text(code: int) -> str:
    """fio's job ``error`` is an errno; say what it means, and what EILSEQ means to fio."""
    if code == _VERIFY_ERRNO:
        return "data verification failed (EILSEQ)"
    try:
        return os.strerror(code)
    except ValueError:
        return "unknown error"


def _job_result(job: Mapping[str, Any], global_options: Mapping[str, Any]) -> FioJobResult:
    options = {str(k): str(v) for k, v in global_options.items()}
    options.update({str(k): str(v) for k, v in (job.get("job options") or {}).items()})
    return FioJobResult(
        name=str(job.get("jobname", "?")),
        error=int(_num(job, "error")),
        read=_direction_stats(job.get("read") or {}),
        write=_direction_stats(job.get("write") or {}),
        total_err=int(_num(job, "total_err")),
        options=options,
    )


def _verify_requested(jobs: Iterable[FioJobResult]) -> bool:
    return any(j.options.get("verify", "0") not in ("0", "null", "") for j in jobs)


def _verify_failed(jobs: Iterable[FioJobResult], messages: str) -> bool:
    """fio marks a verify failure with EILSEQ and prints 'verify' lines on stderr."""
    return any(j.error == _VERIFY_ERRNO for j in jobs) or bool(
        re.search(r"verify failed|bad magic header|verify: bad", messages)
    )


def parse_fio_json(text: str, *, stderr: str = "", strict: bool = True) -> FioResult:
    """Parse fio's ``--output-format=json`` output (noise around it is allowed).

    With ``strict`` (the default) a job that reports a non-zero ``error`` raises
    :class:`WorkloadError` carrying fio's own message (from ``stderr`` or the
    noise before the JSON).  With ``strict=False`` the result is returned with
    ``errors`` and ``verify_ok`` set, for tests that inject faults on purpose and
    want to assert that fio noticed.
    """
    before, data, _after = extract_json_object(text, required_key="jobs", what="fio")
    if not isinstance(data["jobs"], list):
        raise WorkloadError("fio JSON has a 'jobs' entry that is not a list")
    jobs = tuple(
        _job_result(job, data.get("global options") or {})
        for job in data["jobs"]
        if isinstance(job, Mapping)
    )
    messages = before + "\n" + stderr
    failed = [j for j in jobs if j.error != 0]
    if strict and failed:
        summary = "; ".join(
            f"fio job {j.name!r} failed: error {j.error} ({_errno_text(j.error)})" for j in failed
        )
        raise WorkloadError(
            summary + _section("fio stderr", stderr) + _section("fio output before JSON", before)
        )
    errors = sum(j.total_err if j.total_err else (1 if j.error else 0) for j in jobs)
    verify_ok: bool | None = None
    if _verify_requested(jobs) or _verify_failed(jobs, messages):
        verify_ok = not _verify_failed(jobs, messages)
    return FioResult(
        read=_aggregate([j.read for j in jobs]),
        write=_aggregate([j.write for j in jobs]),
        errors=errors,
        verify_ok=verify_ok,
        jobs=jobs,
        fio_version=str(data.get("fio version", "")),
        raw=data,
    )


def check_fio_run(rc: int, stdout: str, stderr: str = "", *, strict: bool = True) -> FioResult:
    """Judge a finished fio process: the one call the guest layer needs.

    A non-zero exit status with no parseable JSON (fio rejected its options, or
    is not installed) raises :class:`WorkloadError` with stderr and the output
    tail.  With JSON present, job errors are judged as in :func:`parse_fio_json`,
    and in strict mode a non-zero status fails even when every job looks clean,
    because fio only exits non-zero when something went wrong.
    """
    try:
        result = parse_fio_json(stdout, stderr=stderr, strict=strict)
    except WorkloadError as exc:
        if rc == 0:
            raise
        if not any(line.lstrip().startswith("{") for line in stdout.splitlines()):
            raise WorkloadError(
                f"fio exited with status {rc} and printed no JSON"
                + _section("fio stderr", stderr)
                + _section("fio output", stdout)
            ) from None
        raise WorkloadError(f"fio exited with status {rc}: {exc}") from None
    if strict and rc != 0:
        raise WorkloadError(
            f"fio exited with status {rc} although its jobs report no error"
            + _section("fio stderr", stderr)
        )
    return result

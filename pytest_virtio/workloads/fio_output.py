"""fio's output: its JSON as numbers, and a run's exit status and streams as a verdict.

Pure, like the job side (``fio.py``): every shape of fio output we have ever met
is a unit test, not a QEMU boot.

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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_virtio.errors import WorkloadError

__all__ = [
    "FioJobResult",
    "FioResult",
    "IoStats",
    "check_fio_run",
    "extract_json_object",
    "parse_fio_json",
]

# fio reports a failed data verification as EILSEQ ("Invalid or incomplete
# multibyte or wide character"), which reads like nonsense unless we translate it.
_VERIFY_ERRNO = errno.EILSEQ
_STDERR_TAIL_LINES = 40


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

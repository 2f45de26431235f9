"""fio: describe a job as data and turn it into a command (fio_output.py reads the result).

Nothing here runs a process.  The guest layer runs the command that
:func:`fio_shell` builds and hands the exit status and both streams to
:func:`check_fio_run` (``fio_output.py``, re-exported here so one import serves
a caller that builds a job and reads its result).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pytest_virtio.errors import ConfigError
from pytest_virtio.units import parse_duration, parse_size
from pytest_virtio.workloads.fio_output import (
    FioJobResult,
    FioResult,
    IoStats,
    check_fio_run,
    extract_json_object,
    parse_fio_json,
)

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

_OPTION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SECTION_RE = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_OPTION_LINE_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:=\s*(.*?))?\s*$")

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

"""Workloads run inside guests: command builders and output parsers, no I/O.

Each module turns a workload description into a shell line for ``guest.run`` and
turns the program's output back into frozen result dataclasses, so the guest
layer stays generic and every parser is unit-tested against recorded output.
"""

from pytest_virtio.workloads.fio import (
    FioJob,
    FioJobResult,
    FioResult,
    IoStats,
    check_fio_run,
    fio_argv,
    fio_jobfile_shell,
    fio_shell,
    parse_fio_json,
)

__all__ = [
    "FioJob",
    "FioJobResult",
    "FioResult",
    "IoStats",
    "check_fio_run",
    "fio_argv",
    "fio_jobfile_shell",
    "fio_shell",
    "parse_fio_json",
]

"""pytest-virtio: QEMU guests, virtio devices and workloads for pytest.

The names a test file writes are importable from here (``from pytest_virtio
import Guest, MakeGuest``), whatever wing they live in. They load on first use
(PEP 562): importing ``pytest_virtio.errors`` or the spec alone must not pull in
the guest runtime and pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_virtio.guests.crashcheck import CrashCheckFailed, CrashReport
    from pytest_virtio.guests.faultsearch import (
        FaultScheduleFailed,
        FaultSearchReport,
        search_faults,
    )
    from pytest_virtio.guests.guest import Guest
    from pytest_virtio.guests.session import VirtioSession
    from pytest_virtio.plugin.crash_check import CrashCheck
    from pytest_virtio.plugin.fixtures import MakeGuest
    from pytest_virtio.vhost_user.faultschedule import Fault, Schedule, armed

#: public name -> the module that defines it
_PUBLIC = {
    "CrashCheck": "pytest_virtio.plugin.crash_check",
    "CrashCheckFailed": "pytest_virtio.guests.crashcheck",
    "CrashReport": "pytest_virtio.guests.crashcheck",
    "Fault": "pytest_virtio.vhost_user.faultschedule",
    "FaultScheduleFailed": "pytest_virtio.guests.faultsearch",
    "FaultSearchReport": "pytest_virtio.guests.faultsearch",
    "Schedule": "pytest_virtio.vhost_user.faultschedule",
    "armed": "pytest_virtio.vhost_user.faultschedule",
    "search_faults": "pytest_virtio.guests.faultsearch",
    "Guest": "pytest_virtio.guests.guest",
    "VirtioSession": "pytest_virtio.guests.session",
    "MakeGuest": "pytest_virtio.plugin.fixtures",
}

__version__ = "0.1.0"

__all__ = ["CrashCheck", "CrashCheckFailed", "CrashReport", "Fault", "FaultScheduleFailed",
           "FaultSearchReport", "Guest", "MakeGuest", "Schedule", "VirtioSession", "__version__",
           "armed", "search_faults"]


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_virtio' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

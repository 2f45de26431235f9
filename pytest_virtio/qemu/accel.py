"""Choose the accelerator: KVM only when a guest has been seen to boot under it.

Why a probe boot and not just ``os.access('/dev/kvm')``: on nested or
paravirtual hosts /dev/kvm opens fine and QEMU starts, yet the guest kernel
hangs (measured on this project's CI machines).  So ``auto`` boots the real
test image under KVM with a short deadline and uses KVM only if the guest's
readiness line appears.  The verdict is cached per host boot (boot_id) and
QEMU binary, so xdist workers and later runs do not pay for it again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from pytest_virtio.errors import VirtioError

#: Guest timeouts are written for KVM; TCG runs guest code several times slower.
TIMEOUT_SCALE = {"kvm": 1.0, "tcg": 4.0}
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class AccelChoice:
    accel: str
    note: str
    probe_seconds: float | None = None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


ProbeBoot = Callable[[float], float]


def choose_accel(
    requested: str, cache_dir: Path, qemu_id: str, probe: ProbeBoot
) -> AccelChoice:
    """Resolve ``auto|kvm|tcg``; ``probe(timeout)`` boots a KVM guest and returns seconds.

    ``probe`` raises on failure (timeout, hang, crash); its message becomes the note.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "TCG (requested)")
    if requested == "kvm":
        return AccelChoice("kvm", "KVM (requested, not probed)")
    why = kvm_usable()
    if why:
        return AccelChoice("tcg", f"TCG: {why}")
    cache = cache_dir / f"accel-{boot_id()}-{qemu_id}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if cache.exists():
            try:
                return AccelChoice(**json.loads(cache.read_text()))
            except (ValueError, TypeError):
                pass
        choice = _probe(probe)
        cache.write_text(json.dumps(asdict(choice)))
    return choice


def _probe(probe: ProbeBoot) -> AccelChoice:
    start = time.monotonic()
    try:
        probe(PROBE_TIMEOUT)
    except VirtioError as exc:
        first = str(exc).splitlines()[0]
        return AccelChoice(
            "tcg",
            f"TCG: /dev/kvm present but a probe guest did not boot under KVM ({first})",
            round(time.monotonic() - start, 2),
        )
    took = round(time.monotonic() - start, 2)
    return AccelChoice("kvm", f"KVM (probe guest booted in {took}s)", took)

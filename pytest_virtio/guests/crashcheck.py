"""Crash states checked in a guest (issue 28 items 3-4): the oracle over a logged disk.

``check_crash_states(session, guest.logged_disk("data"), directory, check=...)``
builds the states a power cut could have left on the disk
(:func:`pytest_virtio.vhost_user.crashstates.crash_states`: every flush boundary,
the final state and a seeded sample of subsets), materializes each into
``directory`` and shows it to a checker guest, one state at a time:

- the checker is one guest of the session's normal provisioning (a restored
  snapshot template with ``--virtio-snapshot``, else a boot), reused for every
  state, with a blank in-process vhost-user-blk disk of the logged disk's size
  (name and serial :data:`CRASH_DISK`; a template shape like any other);
- each state is materialized into that same file (same inode: the backend's
  open fd serves it) while the guest has it unmounted, and the guest drops its
  cache of the device (``blockdev --flushbufs``) before looking: a fresh view
  of the state for a fraction of a second, where a hot-plug and unplug per
  state cost 1.8 s under TCG (measured);
- the guest may write the live copy (a journal replays on mount); a state that
  fails is materialized again into ``state-NNN.img``, which nobody writes, and
  kept;
- with ``fs`` set (default ``"ext4"``) the check is: mount it (the journal
  replays on the overlay; a refused mount fails the state), unmount, the
  filesystem's own ``fsck -n`` (:data:`FSCK`: any exit but 0 fails), then the
  test's ``check`` with the filesystem mounted read-only at ``$MNT``; the test's
  check is a shell command (``$DEV`` the guest device, ``$MNT`` the mount
  point; exit 0 passes) or a callable ``check(guest, dev)`` (an AssertionError
  or ``False`` fails the state; any other exception ends the run).

The :class:`CrashReport` counts states generated, checked and failed, names the
first failure (``CrashState.describe()``: the cut, the dropped records), keeps
that state's image and a ``reproduce.sh`` that boots a guest with it as disk
``crash`` (over an overlay), and splits the wall time into guest provisioning,
materializing, hot-plug and unplug, and the check itself.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import ConfigError, VirtioError
from pytest_virtio.guests import reproduce
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.writelogs import LoggedDisk
from pytest_virtio.images import GuestImage
from pytest_virtio.vhost_user.crashstates import CrashState, DiscardRule, crash_states, materialize

__all__ = ["CRASH_DISK", "FSCK", "Check", "CheckerHost", "CrashCheckFailed", "CrashReport",
           "StateVerdict", "Timings", "check_crash_states", "reproducer_wrapper"]

log = logging.getLogger(__name__)

#: Name and serial of the crash image in the checker guest.
CRASH_DISK: Final = "crash"
#: Where the checker mounts the crash image.
MOUNT_POINT: Final = "/mnt/pv-crash"
#: Each filesystem's own read-only check (exit 0: clean).
FSCK: Final = {
    "ext2": "e2fsck -fn",
    "ext3": "e2fsck -fn",
    "ext4": "e2fsck -fn",
}

#: The test's own check: a shell command (``$DEV``, ``$MNT``) or ``check(guest, dev)``.
Check = str | Callable[[Guest, str], object]


class CheckerHost(Protocol):
    """What the checker needs from the session (:class:`.session.VirtioSession`)."""

    #: The session's guests: the checker leaves it once closed.
    guests: list[Guest]

    def boot(self, spec: spec_mod.MachineSpec | None = None, name: str = "guest") -> Guest: ...

    def image_for(self, spec: spec_mod.MachineSpec) -> GuestImage: ...


class CrashCheckFailed(VirtioError):
    """A crash state failed its check: the message is the report's summary."""


@dataclass(frozen=True)
class StateVerdict:
    """One checked state: ``phase`` is what failed (``mount``, ``fsck``, ``check``) or ''."""

    index: int
    state: CrashState
    phase: str
    output: str

    @property
    def ok(self) -> bool:
        return not self.phase

    def describe(self) -> str:
        tail = self.output.strip().splitlines()[-6:]
        what = f"state {self.index} ({self.state.describe()})"
        return what if self.ok else f"{what}: {self.phase} failed: " + " | ".join(tail)


@dataclass
class Timings:
    """Wall seconds by phase, summed over the states."""

    #: Provisioning the checker guest (boot or restore, its crash disk plugged).
    guest: float = 0.0
    #: Building each state's image on the host.
    materialize: float = 0.0
    #: The guest's side: cache drop, mount, fsck, the test's check.
    check: float = 0.0
    #: Closing the checker guest.
    close: float = 0.0

    @property
    def total(self) -> float:
        return self.guest + self.materialize + self.check + self.close


@dataclass(frozen=True)
class CrashReport:
    """What checking a logged disk's crash states found."""

    disk: str
    seed: int
    generated: int
    verdicts: tuple[StateVerdict, ...]
    directory: Path
    kept_image: Path | None
    reproducer: Path | None
    timings: Timings

    @property
    def checked(self) -> int:
        return len(self.verdicts)

    @property
    def failures(self) -> tuple[StateVerdict, ...]:
        return tuple(v for v in self.verdicts if not v.ok)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def first_failure(self) -> StateVerdict | None:
        return next(iter(self.failures), None)

    @property
    def states_per_minute(self) -> float:
        return 60.0 * self.checked / self.timings.total if self.timings.total else 0.0

    def summary(self) -> str:
        t = self.timings
        head = (f"disk {self.disk!r}: {self.generated} crash state(s) generated (seed "
                f"{self.seed}), {self.checked} checked, {self.failed} failed in "
                f"{t.total:.1f}s (guest {t.guest + t.close:.1f}s, images "
                f"{t.materialize:.1f}s, checks {t.check:.1f}s)")
        first = self.first_failure
        if first is None:
            return head
        return (f"{head}; first failure: {first.describe()}; image kept: {self.kept_image}, "
                f"boot a guest on it: {self.reproducer}")

    def raise_on_failure(self) -> None:
        """:class:`CrashCheckFailed` with :meth:`summary` if any state failed."""
        if self.failed:
            raise CrashCheckFailed(self.summary())


def _check_fs(fs: str | None) -> None:
    if fs is not None and fs not in FSCK:
        raise ConfigError(f"check_crash_states(fs={fs!r}): no fsck known for it; choose one "
                          f"of {', '.join(sorted(FSCK))}, or fs=None to check the raw device")


def guest_steps(fs: str | None, dev: str, check: str | None) -> list[tuple[str, str]]:
    """(phase, shell command) run in order on the checker guest; the first to fail names
    the state's failure.  Pure: unit-tested."""
    d, m = shlex.quote(dev), shlex.quote(MOUNT_POINT)
    steps = []
    if fs is not None:
        steps += [("mount", f"mkdir -p {m} && mount -t {fs} {d} {m} && umount {m}"),
                  ("fsck", f"{FSCK[fs]} {d}"),
                  ("mount read-only", f"mount -t {fs} -o ro {d} {m}")]
    if check is not None:
        steps.append(("check", f"DEV={d} MNT={m}; export DEV MNT; {check}"))
    return steps


def _run_steps(guest: Guest, fs: str | None, dev: str, check: Check | None
               ) -> tuple[str, str]:
    """(failed phase or '', output) of one state's checks; the mount is always undone."""
    shell = check if isinstance(check, str) else None
    try:
        for phase, cmd in guest_steps(fs, dev, shell):
            res = guest.run(f"{cmd} 2>&1")
            if not res.ok:
                return phase, f"exit {res.rc}: {res.stdout}"
        if callable(check):
            try:
                if check(guest, dev) is False:
                    return "check", f"{check!r} returned False"
            except AssertionError as exc:
                return "check", f"{type(exc).__name__}: {exc}"
        return "", ""
    finally:
        if fs is not None:
            guest.run(f"umount {shlex.quote(MOUNT_POINT)} 2>/dev/null; true")


def _crash_disk(overlay: Path) -> spec_mod.Disk:
    # cache=unsafe: the overlay is thrown away after the state, its flushes buy nothing.
    return spec_mod.Disk(name=CRASH_DISK, bus="virtio-blk", image=str(overlay), format="qcow2",
                         cache="unsafe")


def reproducer_wrapper(image: Path, boot_script: Path, about: str) -> str:
    """``reproduce.sh`` for a kept crash image: an overlay over it in the run directory,
    then the checker's own boot (``boot_script``, with disk ``crash`` on that overlay)."""
    return "\n".join([
        "#!/bin/sh",
        f"# Boots a guest with this crash state as its virtio-blk disk {CRASH_DISK!r} (serial",
        f"# {CRASH_DISK}): {about}",
        "# The guest writes a qcow2 overlay in the run directory; the image stays as checked.",
        "set -e",
        'here=$(cd "$(dirname "$0")" && pwd)',
        'PV_RUN=${PV_RUN:-$(mktemp -d "${TMPDIR:-/tmp}/pv-repro.XXXXXX")}',
        "export PV_RUN",
        'mkdir -p "$PV_RUN"',
        f'qemu-img create -q -f qcow2 -F raw -b "$here/{image.name}" '
        f'"$PV_RUN/{CRASH_DISK}.qcow2"',
        f'exec sh "$here/{boot_script.name}" "$@"',
    ]) + "\n"


def _keep_reproducer(host: CheckerHost, guest: Guest, image: Path, state: CrashState) -> Path:
    """Write ``reproduce.sh`` (and the boot it runs) next to the kept ``image``."""
    assert guest.ctx is not None and guest.spec is not None
    overlay = guest.run_dir / f"{CRASH_DISK}.qcow2"
    others = tuple(d for d in guest.spec.disks if d.name != CRASH_DISK)
    spec = guest.spec.replace(disks=(*others, _crash_disk(overlay)))
    root = host.image_for(spec)
    ctx = dataclasses.replace(guest.ctx, root_image=str(root.rootfs),
                              root_format=root.rootfs_format, root_snapshot=True,
                              shared_memory=True,
                              disk_files={**guest.ctx.disk_files, CRASH_DISK: str(overlay)})
    boot = image.with_name(f"{image.stem}-boot.sh")
    boot.write_text(reproduce.script(spec_mod.to_argv(spec, ctx), guest.run_dir, spec, ctx))
    path = image.with_name("reproduce.sh")
    path.write_text(reproducer_wrapper(image, boot, state.describe()))
    path.chmod(0o755)
    return path


@dataclass
class _Run:
    """One check_crash_states call's state: the checker guest, the kept image, timings."""

    host: CheckerHost
    disk: LoggedDisk
    directory: Path
    fs: str | None
    check: Check | None
    timings: Timings
    guest: Guest | None = None
    dev: str = ""
    live: Path | None = None
    kept: Path | None = None
    reproducer: Path | None = None

    def checker(self, spec: spec_mod.MachineSpec) -> Guest:
        """The checker guest: ``spec`` with disk ``crash``, the disk's size (booted once)."""
        if self.guest is None:
            start = time.monotonic()
            crash = spec_mod.Disk(name=CRASH_DISK, size=self.disk.log.disk_size)
            self.guest = self.host.boot(spec.replace(disks=(*spec.disks, crash)),
                                        "crash-checker")
            assert self.guest.ctx is not None
            self.live = Path(self.guest.ctx.disk_files[CRASH_DISK])
            self.dev = self.guest.disk_path(CRASH_DISK)
            self.timings.guest += time.monotonic() - start
        return self.guest

    def one(self, index: int, state: CrashState, spec: spec_mod.MachineSpec) -> StateVerdict:
        guest = self.checker(spec)
        assert self.live is not None
        t0 = time.monotonic()
        # The same file (inode) each time: its backend's open fd serves the new state.
        materialize(state, self.disk.log, self.disk.base, self.live)
        t1 = time.monotonic()
        # Only the device's cache: drop_caches would also drop the root's, and every
        # program the check then runs is read again (2.1 s per state under TCG, measured).
        guest.check(f"blockdev --flushbufs {shlex.quote(self.dev)}")
        phase, output = _run_steps(guest, self.fs, self.dev, self.check)
        t3 = time.monotonic()
        self._add(t1 - t0, t3 - t1)
        verdict = StateVerdict(index, state, phase, output)
        if not verdict.ok and self.kept is None:
            self._keep(verdict, guest)
        return verdict

    def _add(self, materialize_s: float, check: float) -> None:
        self.timings.materialize += materialize_s
        self.timings.check += check

    def _keep(self, verdict: StateVerdict, guest: Guest) -> None:
        """Materialize the failed state again (the checker wrote the live copy) and keep it."""
        image = materialize(verdict.state, self.disk.log, self.disk.base,
                            self.directory / f"state-{verdict.index:03d}.img")
        log.warning("crash state %d of disk %s failed %s; image kept: %s", verdict.index,
                    self.disk.name, verdict.phase, image)
        self.kept = image
        self.reproducer = _keep_reproducer(self.host, guest, image, verdict.state)

    def close(self) -> None:
        if self.guest is not None:
            start = time.monotonic()
            self.guest.close()
            self.timings.close += time.monotonic() - start
            if self.guest in self.host.guests:
                self.host.guests.remove(self.guest)


def check_crash_states(host: CheckerHost, disk: LoggedDisk, directory: str | Path, *,
                       subsets: int = 16, seed: int = 0, check: Check | None = None,
                       fs: str | None = "ext4", spec: spec_mod.MachineSpec | None = None,
                       fail_fast: bool = False,
                       discard: DiscardRule = DiscardRule.ZEROES) -> CrashReport:
    """Check every flush boundary, the final state and ``subsets`` sampled crash states of
    ``disk`` (``guest.logged_disk(name)``, read after the workload) in one checker guest
    of ``spec`` (default: the default machine) from ``host`` (the VirtioSession).

    Images go to ``directory`` (created; only the first failing state's is kept, with
    its ``reproduce.sh``).  ``fail_fast`` stops at the first failure.  Deterministic for
    a log, ``seed`` and ``subsets``.  The report does not raise: call
    :meth:`CrashReport.raise_on_failure` (or assert on it).
    """
    _check_fs(fs)
    if fs is None and check is None:
        raise ConfigError("check_crash_states(fs=None, check=None) would check nothing; give "
                          "a check or a filesystem")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    states = crash_states(disk.log, durability=disk.durability, seed=seed, subsets=subsets,
                          discard=discard)
    log.info("disk %s: %d crash states (%s, seed %d) to check", disk.name, len(states),
             disk.durability.value, seed)
    run = _Run(host, disk, out, fs, check, Timings())
    verdicts: list[StateVerdict] = []
    try:
        for index, state in enumerate(states):
            verdicts.append(run.one(index, state, spec or spec_mod.MachineSpec()))
            if fail_fast and not verdicts[-1].ok:
                break
    except BaseException:
        _close_quietly(run, disk.name)  # the check's own error is the one to report
        raise
    run.close()
    return CrashReport(disk.name, seed, len(states), tuple(verdicts), out, run.kept,
                       run.reproducer, run.timings)


def _close_quietly(run: _Run, disk: str) -> None:
    """Close the checker after a failure; what closing raises is logged, not raised."""
    try:
        run.close()
    except Exception as exc:
        log.warning("crash checker of disk %s did not close cleanly: %s", disk, exc)

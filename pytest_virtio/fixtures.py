"""Fixtures: ``guest``, ``make_guest``, ``virtio_session``, ``vhost``.

Thin on purpose: booting lives in :mod:`pytest_virtio.session`, marker
parsing in :mod:`pytest_virtio.spec`; here we only wire them to a test's
lifetime, keep artifacts of failures and check ``expect_drivers``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from . import spec as spec_mod
from .errors import GuestError, VirtioError
from .guest import Guest
from .session import MissingDevices, VirtioSession

MakeGuest = Callable[..., Guest]


@pytest.fixture(scope="session")
def virtio_session(pytestconfig: pytest.Config) -> VirtioSession:
    """The process's VirtioSession (image, accelerator, run directory)."""
    from .plugin import SESSION_KEY

    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture
def virtio_choice(request: pytest.FixtureRequest) -> dict[str, str] | None:
    """This test's ``virtio_matrix`` choice (e.g. {'disk': 'ahci'}), or None."""
    return getattr(request, "param", None)


@pytest.fixture
def make_guest(
    request: pytest.FixtureRequest, virtio_session: VirtioSession
) -> Iterator[MakeGuest]:
    """Factory: ``make_guest(spec=None, name="guest", **vm_kwargs)`` boots one more guest.

    Every guest it made is shut down at teardown; if the test failed, each
    one's console log, QEMU stderr, QMP events, reproduce.sh and (when the
    guest still answers) dmesg are kept under ``.pytest-virtio/<test id>/``.
    """
    from .plugin import REPORTS_KEY, USES_GUEST_KEY, artifacts_dir

    made: list[Guest] = []
    request.node.stash[USES_GUEST_KEY] = True

    def factory(spec: spec_mod.MachineSpec | None = None, name: str | None = None,
                **vm_kwargs: Any) -> Guest:
        if spec is None:
            spec = spec_mod.spec_from_kwargs(vm_kwargs, where="make_guest")
        elif vm_kwargs:
            raise VirtioError("make_guest(): pass either spec= or vm keyword arguments")
        try:
            guest = virtio_session.boot(spec, name or f"guest{len(made)}")
        except MissingDevices as exc:
            # A QEMU build without the model cannot run this test: skip, naming it.
            pytest.skip(f"QEMU lacks device model(s) {', '.join(sorted(exc.missing))} "
                        f"({exc.qemu})")
        except VirtioError as exc:
            failed = exc.failed_guest
            if isinstance(failed, Guest) and virtio_session.settings.keep != "never":
                dest = artifacts_dir(request.node) / failed.name
                _keep_artifacts(failed, dest)
                exc.add_note(f"pytest-virtio artifacts: {dest}")
            raise
        made.append(guest)
        return guest

    yield factory

    reports = request.node.stash.get(REPORTS_KEY, {})
    failed = any(r.failed for r in reports.values())
    keep = virtio_session.settings.keep
    for guest in made:
        if (failed and keep == "failed") or keep == "always":
            _keep_artifacts(guest, artifacts_dir(request.node) / guest.name)
        with contextlib.suppress(VirtioError, OSError):
            guest.close()
        with contextlib.suppress(ValueError):
            virtio_session.guests.remove(guest)
    for guest in made:
        guest.raise_backend_errors()


def _keep_artifacts(guest: Guest, dest: Any) -> None:
    if not any(guest.run_dir.glob("vhost-state-*.json")):  # none written at a timeout
        guest.dump_backend_state()
    with contextlib.suppress(VirtioError, OSError):
        if guest.machine.state.value == "running":
            res = guest.run("dmesg", timeout=10 * guest.timeout_scale)
            (guest.run_dir / "dmesg.txt").write_text(res.stdout)
    with contextlib.suppress(OSError, TypeError):
        (guest.run_dir / "qmp-events.json").write_text(
            json.dumps(guest.machine.events, indent=1, default=str)
        )
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(guest.run_dir, dest, ignore=shutil.ignore_patterns("*.sock", "disk-*"))


def spec_for(node: Any, choice: Mapping[str, str] | None) -> spec_mod.MachineSpec:
    """The machine a test's ``vm`` marks (merged, closest key wins) and matrix choice ask for."""
    from .plugin import vm_kwargs

    spec = spec_mod.spec_from_kwargs(vm_kwargs(node), where="vm")
    if choice:
        spec = spec_mod.apply_matrix(spec, dict(choice))
    return spec


@pytest.fixture
def guest(
    request: pytest.FixtureRequest, make_guest: MakeGuest,
    virtio_choice: dict[str, str] | None,
) -> Guest:
    """A fresh guest for this test, shaped by ``@pytest.mark.vm(...)``."""
    g = make_guest(spec_for(request.node, virtio_choice), name="guest")
    exp = request.node.get_closest_marker("expect_drivers")
    if exp is not None:
        from .plugin import expect_drivers_args

        check_drivers(g, *expect_drivers_args(exp))
    _run_marked_workload(request, g)
    return g


def _run_marked_workload(request: pytest.FixtureRequest, g: Guest) -> None:
    """``@pytest.mark.workload``: run it now (before the body), file the result.

    In the guest fixture rather than a separate one so a test that never asks
    for ``workload`` still gets measured; the result goes to the item (for the
    ``workload`` fixture and the perf check) and to the session's report.
    """
    marker = request.node.get_closest_marker("workload")
    if marker is None:
        return
    from .plugin import MEASURED_KEY, RESULTS_KEY
    from .workloads.run import WorkloadSpec, run_workload

    measured = run_workload(g, WorkloadSpec.from_marker(marker.args, marker.kwargs))
    request.node.stash[MEASURED_KEY] = measured
    record, check = record_measurement(request.node, g.accel, measured)
    results = request.config.stash[RESULTS_KEY]
    results.records.append(record)
    if check is not None:
        results.checks.append(check)


def record_measurement(node: Any, accel: str, measured: Any) -> tuple[Any, Any]:
    """The report Record (and relative perf check, if the test has one) of a measurement;
    the record's figures also become junit properties of the test."""
    from .perf import PerfSpec
    from .report import RelativeCheck, junit_properties

    group = f"{node.nodeid.rsplit('::', 1)[0]}::{getattr(node, 'originalname', node.name)}"
    record = measured.to_record(node.nodeid, accel, group)
    node.user_properties.extend(junit_properties(record))
    marker = node.get_closest_marker("perf")
    spec = PerfSpec.from_marker(marker.args, marker.kwargs) if marker else None
    reference = spec.reference_for(record.device) if spec is not None else None
    if spec is None or reference is None:
        return record, None
    return record, RelativeCheck(node.nodeid, group, record.device, record.workload, accel,
                                 reference, spec.by, spec.metric)


@pytest.fixture
def workload(request: pytest.FixtureRequest, guest: Guest) -> Any:
    """The result of this test's ``@pytest.mark.workload`` (a FioResult for fio,
    DdResult for dd, NetResult for iperf3), measured before the test body."""
    from .plugin import MEASURED_KEY

    measured = request.node.stash.get(MEASURED_KEY, None)
    if measured is None:
        raise VirtioError("the `workload` fixture needs @pytest.mark.workload('fio', ...)")
    return measured.result


def check_drivers(g: Guest, present: tuple[str, ...], absent: tuple[str, ...]) -> None:
    """Fail naming what is there when expected drivers are missing (or unwanted ones bound)."""
    mods = g.lsmod()
    bound = g.bound_drivers()
    have = {m.replace("-", "_") for m in mods} | {b.replace("-", "_") for b in bound}
    missing = [n for n in present if n.replace("-", "_") not in have]
    unwanted = [n for n in absent if n.replace("-", "_") in have]
    if missing or unwanted:
        loaded = sorted(m for m, info in mods.items() if not info.builtin)
        parts = []
        if missing:
            parts.append(f"expected drivers missing: {', '.join(missing)}")
        if unwanted:
            parts.append(f"drivers that should be absent are present: {', '.join(unwanted)}")
        raise GuestError(
            "; ".join(parts) + f"\nbound drivers: {', '.join(sorted(bound)) or 'none'}"
            f"\nloaded modules: {', '.join(loaded) or 'none'}"
        )


@pytest.fixture
def vhost(guest: Guest) -> Mapping[str, Any]:
    """The in-process vhost-user-blk servers of ``guest``, keyed by disk name."""
    return guest.backends

"""Fixtures: ``guest``, ``make_guest``, ``virtio_session``, ``vhost``.

Thin on purpose: booting lives in :mod:`pytest_virtio.guests.session`, marker
parsing in :mod:`pytest_virtio.plugin.plan`, the marked workload's run in
:mod:`pytest_virtio.plugin.marked_workload`; here we only wire them to a test's
lifetime, keep artifacts of failures and check ``expect_drivers``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import GuestError, VirtioError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.measure import Measurement
from pytest_virtio.guests.session import MissingDevices, VirtioSession
from pytest_virtio.guests.sharing import SharedGuests, pool_fixture_name
from pytest_virtio.guests.teardown import Teardown
from pytest_virtio.plugin import artifacts
from pytest_virtio.plugin.marked_workload import run_marked_workload
from pytest_virtio.plugin.state import (
    GUESTS_KEY,
    MEASURED_KEY,
    REPORTS_KEY,
    SESSION_KEY,
    USES_GUEST_KEY,
    artifacts_dir,
    artifacts_root,
    plan_of,
)
from pytest_virtio.workloads.dd import DdResult
from pytest_virtio.workloads.fio import FioResult
from pytest_virtio.workloads.iperf import NetResult

if TYPE_CHECKING:  # the backend package loads lazily (its import cost: guests/launch.py)
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

MakeGuest = Callable[..., Guest]


@pytest.fixture(scope="session")
def virtio_session(pytestconfig: pytest.Config) -> VirtioSession:
    """The process's VirtioSession (image, accelerator, run directory)."""
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture
def virtio_choice(request: pytest.FixtureRequest) -> dict[str, str] | None:
    """This test's ``virtio_matrix`` choice (e.g. {'disk': 'ahci'}), or None."""
    return getattr(request, "param", None)


@pytest.fixture
def make_guest(
    request: pytest.FixtureRequest, virtio_session: VirtioSession
) -> Iterator[MakeGuest]:
    """Factory: ``make_guest(spec=None, name="guest<N>", **vm_kwargs)`` boots one more guest.

    Every guest it made is shut down at teardown; if the test failed, each
    one's console log, QEMU stderr, QMP events, reproduce.sh and (when the
    guest still answers) dmesg are kept under ``.pytest-virtio/<test id>/<name>/``
    (each a directory name made by :func:`pytest_virtio.plugin.artifacts.dir_name`); a
    name is used once per test.
    """
    made: list[Guest] = []
    request.node.stash[USES_GUEST_KEY] = True

    def factory(spec: spec_mod.MachineSpec | None = None, name: str | None = None,
                **vm_kwargs: Any) -> Guest:
        if spec is None:
            spec = spec_mod.spec_from_kwargs(vm_kwargs, where="make_guest")
        elif vm_kwargs:
            raise VirtioError("make_guest(): pass either spec= or vm keyword arguments")
        guest = boot_for(request.node, virtio_session, spec, _new_name(name, made))
        made.append(guest)
        return guest

    yield factory

    failed = _test_failed(request.node)
    keep = virtio_session.settings.keep
    teardown = Teardown()
    for guest in made:
        try:
            if (failed and keep == "failed") or keep == "always":
                _keep_or_warn(request.node, guest)
        finally:  # closed even when keeping its artifacts went wrong
            teardown.close(guest)
            with contextlib.suppress(ValueError):
                virtio_session.guests.remove(guest)
    for guest in made:
        guest.raise_backend_errors()
    teardown.raise_stuck()


def _new_name(name: str | None, made: list[Guest]) -> str:
    """``name``, or the first free ``guest<N>``; a name used twice in one test is refused
    (each guest's artifacts go to a directory named after it)."""
    taken = {g.name for g in made}
    if name is None:
        return next(f"guest{i}" for i in range(len(made) + 1) if f"guest{i}" not in taken)
    if name in taken:
        raise VirtioError(f"make_guest(name={name!r}): this test already has a guest of that "
                          "name; give each guest its own name")
    return name


def boot_for(node: Any, session: VirtioSession, spec: spec_mod.MachineSpec,
             name: str, pool: SharedGuests | None = None) -> Guest:
    """Boot ``spec`` for the test ``node`` (or take ``pool``'s live guest of it): a QEMU
    without the model skips the test, a failed boot keeps its artifacts under the
    test's directory."""
    try:
        guest = session.boot(spec, name, pool=pool)
    except MissingDevices as exc:
        # A QEMU build without the model cannot run this test: skip, naming it.
        pytest.skip(f"QEMU lacks device model(s) {', '.join(sorted(exc.missing))} "
                    f"({exc.qemu})")
    except VirtioError as exc:
        failed = exc.failed_guest
        if isinstance(failed, Guest) and session.settings.keep != "never":
            root, dest = _guest_dest(node, failed)
            try:
                _keep_artifacts(failed, root, dest)
            except (OSError, VirtioError) as why:
                exc.add_note(artifacts.not_kept_message(f"guest {failed.name!r}", dest, why))
            else:
                exc.add_note(f"pytest-virtio artifacts: {dest}")
        raise
    node.stash.setdefault(GUESTS_KEY, []).append(guest)
    return guest


def _test_failed(node: Any) -> bool:
    return any(r.failed for r in node.stash.get(REPORTS_KEY, {}).values())


def _guest_dest(node: Any, guest: Guest) -> tuple[Path, Path]:
    """(artifacts root, where ``guest``'s artifacts go: its own directory in the test's)."""
    return artifacts_root(node.config), artifacts_dir(node) / artifacts.dir_name(guest.name)


def _keep_or_warn(node: Any, guest: Guest) -> None:
    """Keep ``guest``'s artifacts; if that fails (a full disk, say), warn in one line
    naming the path and go on: the test keeps its own outcome."""
    root, dest = _guest_dest(node, guest)
    try:
        _keep_artifacts(guest, root, dest)
    except (OSError, VirtioError) as exc:
        warnings.warn(artifacts.ArtifactsNotKept(
            artifacts.not_kept_message(f"guest {guest.name!r}", dest, exc)), stacklevel=1)


def _keep_artifacts(guest: Guest, root: Path, dest: Path) -> None:
    if not any(guest.run_dir.glob("vhost-state-*.json")):  # none written at a timeout
        guest.dump_backend_state()
    with contextlib.suppress(VirtioError, OSError):
        if guest.machine.state.value == "running":
            # The console directly, not guest.run: after an in-process backend failed,
            # guest.run re-raises that failure, and its dmesg is what explains it.
            res = guest.machine.console.run("dmesg", 10 * guest.timeout_scale)
            (guest.run_dir / "dmesg.txt").write_text(res.stdout)
    with contextlib.suppress(OSError, TypeError):
        (guest.run_dir / "qmp-events.json").write_text(
            json.dumps(guest.machine.events, indent=1, default=str)
        )
    artifacts.replace_dir(root, dest, lambda d: artifacts.copy_tree(
        guest.run_dir, d, ignore=shutil.ignore_patterns("*.sock", "disk-*")))


def spec_for(node: Any, choice: Mapping[str, str] | None) -> spec_mod.MachineSpec:
    """The machine a test's plan (its ``vm`` marks) and matrix choice ask for."""
    return plan_of(node).machine_for(choice)


def _pool(scope: str, session: VirtioSession) -> Iterator[SharedGuests]:
    """The body of the per-scope pool fixtures: close the guests when the scope ends."""
    pool = SharedGuests(scope)
    yield pool
    closed = pool.close()
    for g in closed:
        with contextlib.suppress(ValueError):
            session.guests.remove(g)
    for g in closed:
        g.raise_backend_errors()


@pytest.fixture(scope="class", name=pool_fixture_name("class"))
def _virtio_class_guests(virtio_session: VirtioSession) -> Iterator[SharedGuests]:
    """The guests shared by the tests of one class (``vm(scope="class")``)."""
    yield from _pool("class", virtio_session)


@pytest.fixture(scope="module", name=pool_fixture_name("module"))
def _virtio_module_guests(virtio_session: VirtioSession) -> Iterator[SharedGuests]:
    """The guests shared by the tests of one module (``vm(scope="module")``)."""
    yield from _pool("module", virtio_session)


@pytest.fixture(scope="session", name=pool_fixture_name("session"))
def _virtio_session_guests(virtio_session: VirtioSession) -> Iterator[SharedGuests]:
    """The guests shared by every test of the session (``vm(scope="session")``)."""
    yield from _pool("session", virtio_session)


def _shared_guest(request: pytest.FixtureRequest, scope: str,
                  spec: spec_mod.MachineSpec) -> Guest:
    """This test's guest from the ``scope`` pool; a failure keeps artifacts for this test."""
    session: VirtioSession = request.getfixturevalue("virtio_session")
    pool: SharedGuests = request.getfixturevalue(pool_fixture_name(scope))
    request.node.stash[USES_GUEST_KEY] = True
    g = boot_for(request.node, session, spec, "guest", pool)

    def keep_if_failed() -> None:
        keep = session.settings.keep
        if (keep == "failed" and _test_failed(request.node)) or keep == "always":
            _keep_or_warn(request.node, g)

    request.addfinalizer(keep_if_failed)
    return g


@pytest.fixture
def guest(
    request: pytest.FixtureRequest, make_guest: MakeGuest,
    virtio_choice: dict[str, str] | None,
) -> Guest:
    """A guest for this test, shaped by ``@pytest.mark.vm(...)``: fresh per test, or
    shared by the class/module/session with ``vm(scope=...)``."""
    plan = plan_of(request.node)
    spec = plan.machine_for(virtio_choice)
    if plan.scope == "function":
        g = make_guest(spec, name="guest")
    else:
        g = _shared_guest(request, plan.scope, spec)
    if plan.expect is not None:
        check_drivers(g, plan.expect.present, plan.expect.absent)
    run_marked_workload(request.node, g, virtio_choice, make_guest)
    return g


@pytest.fixture
def workload(request: pytest.FixtureRequest, guest: Guest
             ) -> FioResult | DdResult | NetResult:
    """The result of this test's ``@pytest.mark.workload`` (a FioResult for fio,
    DdResult for dd, NetResult for iperf3), measured before the test body."""
    measured: Measurement | None = request.node.stash.get(MEASURED_KEY, None)
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
def vhost(guest: Guest) -> Mapping[str, VhostUserBlkServer]:
    """The in-process vhost-user-blk servers of ``guest``, keyed by disk name."""
    return guest.backends

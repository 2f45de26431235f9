"""One frozen plan per test, built from its markers once, at collection.

Why: each marker used to be parsed where a piece of it was needed — the
``vm`` marks at collection and again at setup, ``perf`` at collection, at
setup, after the call and at the session's end — so four readers of one text
could disagree, and a value could only be trusted where it had been checked.
Now :func:`build_plan` validates every pytest-virtio marker of a test and
returns a :class:`TestPlan`; the plugin keeps it in the item's stash and
fixtures, the perf check and the report read the plan, never the markers.

Usable without pytest: ``build_plan`` takes anything with ``iter_markers`` /
``get_closest_marker`` (a pytest node) and the resolved :class:`Settings`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.measure import WorkloadSpec
from pytest_virtio.guests.session import check_honoured
from pytest_virtio.guests.settings import Settings
from pytest_virtio.guests.sharing import split_scope
from pytest_virtio.images import kernel as kernel_mod
from pytest_virtio.keywords import check_keys
from pytest_virtio.results import perf as perf_mod
from pytest_virtio.results.perf import PerfSpec

__all__ = ["Expectation", "MarkedNode", "MatrixItem", "TestPlan", "build_plan", "vm_kwargs"]


class _Mark(Protocol):
    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


class MarkedNode(Protocol):
    """What the plan needs of a pytest node: its marks."""

    def iter_markers(self, name: str | None = None) -> Any: ...

    def get_closest_marker(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Expectation:
    """``expect_drivers(*present, absent=...)``: driver names checked after boot."""

    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplatPolicy:
    """``splats(allow=[...], expect=[...])``: kernel splats this test tolerates, and
    those it must produce (a test of a warning path), as patterns searched in each
    splat's report (its first line names the kind: ``WARNING: CPU: 0 PID: 1 at ...``)."""

    allow: tuple[re.Pattern[str], ...] = ()
    expect: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True)
class MatrixItem:
    """One ``virtio_matrix`` combination: its test id and the axis values it sets."""

    id: str
    choice: Mapping[str, str]


@dataclass(frozen=True)
class TestPlan:
    """Everything a test's markers ask for, validated.

    ``machine`` is the merged ``vm`` marks before any matrix choice; a matrix
    item's machine is :meth:`machine_for` its choice.
    """

    __test__ = False  # not a test class, whatever pytest's name pattern says

    machine: spec_mod.MachineSpec
    scope: str = "function"
    matrix: tuple[MatrixItem, ...] | None = None
    expect: Expectation | None = None
    workload: WorkloadSpec | None = None
    perfs: tuple[PerfSpec, ...] = ()
    splats: SplatPolicy = SplatPolicy()

    def machine_for(self, choice: Mapping[str, str] | None) -> spec_mod.MachineSpec:
        """The machine one item boots: the ``vm`` marks with its matrix choice applied."""
        if not choice:
            return self.machine
        return spec_mod.apply_matrix(self.machine, dict(choice))

    def rounds(self, default: int) -> int:
        """How many times the workload runs: the largest ``perf(rounds=)``, else ``default``."""
        return max([p.rounds for p in self.perfs if p.rounds] or [default])


def build_plan(node: MarkedNode, settings: Settings) -> TestPlan:
    """Validate every pytest-virtio marker of ``node``; raises ConfigError naming
    the marker and key."""
    scope, vm = split_scope(vm_kwargs(node))
    base = spec_mod.spec_from_kwargs(vm, where="vm", also_allowed=("scope",))
    _check_kernel_keys(base, settings)
    matrix_kwargs = _marker_kwargs(node, "virtio_matrix")
    workload, perfs = _perf_plan(node, matrix_kwargs)
    exp = node.get_closest_marker("expect_drivers")
    return TestPlan(
        machine=base, scope=scope,
        matrix=None if matrix_kwargs is None else _matrix(base, matrix_kwargs, settings),
        expect=None if exp is None else expect_drivers_args(exp),
        workload=workload, perfs=perfs, splats=splats_args(node.get_closest_marker("splats")),
    )


def vm_kwargs(node: MarkedNode) -> dict[str, Any]:
    """The test's ``vm`` keywords: stacked marks merged key by key, the closest winning.

    Why merge rather than take the closest mark whole: ``vm(memory="1G")`` on a
    class plus ``vm(smp=2)`` on a method silently lost the memory. pytest lists
    marks closest first (function, class, module), so the farthest is applied
    first and nearer ones override per key; a list key (``disks``) is replaced,
    not extended, so a method can say exactly which disks it wants.
    """
    merged: dict[str, Any] = {}
    for marker in reversed(list(node.iter_markers("vm"))):
        merged.update(_keywords(marker))
    return merged


def _keywords(marker: _Mark) -> dict[str, Any]:
    if marker.args:
        raise ConfigError(f"@pytest.mark.{marker.name}: takes keyword arguments only, "
                          f"got positional {marker.args!r}")
    return dict(marker.kwargs)


def _marker_kwargs(node: MarkedNode, name: str) -> dict[str, Any] | None:
    marker = node.get_closest_marker(name)
    return None if marker is None else _keywords(marker)


def _matrix(base: spec_mod.MachineSpec, kwargs: dict[str, Any],
            settings: Settings) -> tuple[MatrixItem, ...]:
    items = []
    for ident, choice in spec_mod.matrix_params(kwargs):
        try:
            check_honoured(spec_mod.apply_matrix(base, choice), settings)
        except ConfigError as exc:
            raise ConfigError(f"@pytest.mark.virtio_matrix: {exc}") from None
        items.append(MatrixItem(ident, MappingProxyType(dict(choice))))
    return tuple(items)


def _check_kernel_keys(spec: spec_mod.MachineSpec, settings: Settings) -> None:
    """vm(kernel=, modules=) paths, and keys a custom --virtio-initrd cannot honour."""
    try:
        check_honoured(spec, settings)
        if spec.kernel is not None:
            kernel_mod.check_choice(spec.kernel, spec.modules, where="@pytest.mark.vm")
    except ConfigError as exc:
        msg = str(exc)
        if not msg.startswith("@pytest.mark.vm"):
            msg = f"@pytest.mark.vm: {msg}"
        raise ConfigError(msg) from None


def _perf_plan(node: MarkedNode, matrix: dict[str, Any] | None
               ) -> tuple[WorkloadSpec | None, tuple[PerfSpec, ...]]:
    """``workload`` and ``perf``: bad keys, a perf without a workload, and a
    ``faster_than`` naming a device the test's matrix never runs."""
    wl = node.get_closest_marker("workload")
    work = WorkloadSpec.from_marker(wl.args, wl.kwargs) if wl is not None else None
    perfs = tuple(PerfSpec.from_marker(pm.args, pm.kwargs) for pm in node.iter_markers("perf"))
    for perf in perfs:
        if work is None:
            raise ConfigError("@pytest.mark.perf needs @pytest.mark.workload(...) on the same "
                              "test: it checks that workload's figures")
        _validate_perf(perf, work, matrix)
    return work, perfs


def _validate_perf(perf: PerfSpec, work: WorkloadSpec, matrix: dict[str, Any] | None) -> None:
    perf_mod.check_applicable(perf, work.kind)
    axis = "nic" if work.kind == "iperf3" else "disk"
    values = (matrix or {}).get(axis) or ()
    values = (values,) if isinstance(values, str) else tuple(values)
    for device in perf.references:
        if device not in values:
            raise ConfigError(
                f"@pytest.mark.perf(faster_than=...): {device!r} is not in the test's "
                f"@pytest.mark.virtio_matrix({axis}=[...]) (has: {', '.join(values) or 'none'});"
                " relative checks compare the matrix items of one test"
            )


def splats_args(marker: _Mark | None) -> SplatPolicy:
    """``splats(allow=[...], expect=[...])`` checked once: each a regular expression."""
    if marker is None:
        return SplatPolicy()
    where = "@pytest.mark.splats"
    if marker.args:
        raise ConfigError(f"{where}: takes allow=[...] and expect=[...], got positional "
                          f"{marker.args!r}")
    check_keys(where, marker.kwargs, ("allow", "expect"))
    return SplatPolicy(**{key: _patterns(f"{where}: {key}", value)
                          for key, value in marker.kwargs.items()})


def _patterns(where: str, value: object) -> tuple[re.Pattern[str], ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: give a pattern or a list of patterns, got {value!r}")
    compiled = []
    for item in items:
        try:
            compiled.append(re.compile(item))
        except re.error as exc:
            raise ConfigError(f"{where}: {item!r} is not a regular expression ({exc})") from None
    return tuple(compiled)


def expect_drivers_args(marker: _Mark) -> Expectation:
    """``expect_drivers("virtio_blk", absent=["ata_piix"])`` checked once."""
    check_keys("@pytest.mark.expect_drivers", marker.kwargs, ("absent",))
    names = tuple(marker.args)
    absent = marker.kwargs.get("absent", ())
    if isinstance(absent, str):
        absent = (absent,)
    for n in (*names, *absent):
        if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", n):
            raise ConfigError(f"@pytest.mark.expect_drivers: {n!r} is not a driver name")
    return Expectation(names, tuple(absent))

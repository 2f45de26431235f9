"""The per-test plan: built once at collection, read by everything after.

These tests boot nothing: the items ask for ``virtio_choice`` only, so the
plan's readers (setup, the perf check after the call) run without a guest.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from pytest_virtio import spec as spec_mod
from pytest_virtio.guests.measure import WorkloadSpec
from pytest_virtio.results.perf import PerfSpec

TCG = "--virtio-accel=tcg"

MATRIX_FILE = """
import pytest
from pytest_virtio.plugin.hooks import plan_of

@pytest.mark.vm(memory="512M")
@pytest.mark.virtio_matrix(disk=["ide", "virtio-blk"])
@pytest.mark.workload("fio", rw="randread", runtime="1s")
@pytest.mark.perf(faster_than="ide", by=1.0)
@pytest.mark.expect_drivers("virtio_pci", absent=["e1000"])
def test_items(request, virtio_choice):
    plan = plan_of(request.node)
    assert plan is plan_of(request.node)
    assert [m.id for m in plan.matrix] == ["disk=ide", "disk=virtio-blk"]
    machine = plan.machine_for(virtio_choice)
    assert machine.memory_mib == 512
    assert machine.disks[-1].bus == virtio_choice["disk"]
    assert plan.expect.present == ("virtio_pci",) and plan.expect.absent == ("e1000",)
    assert plan.workload.kind == "fio" and plan.perfs[0].references == ("ide",)
"""


def _counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
              calls: Counter[str]) -> None:
    original = getattr(owner, name)
    func = getattr(original, "__func__", None)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"] += 1
        return original(*args[1:] if func is not None else args, **kwargs)

    monkeypatch.setattr(owner, name, classmethod(wrapper) if func is not None else wrapper)


def test_markers_are_parsed_once_per_test_function(pytester: pytest.Pytester,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two matrix items, four stacked marks: each parser runs once for the
    function (at collection), none again at setup or in the perf check."""
    calls: Counter[str] = Counter()
    _counting(monkeypatch, spec_mod, "spec_from_kwargs", calls)
    _counting(monkeypatch, PerfSpec, "from_marker", calls)
    _counting(monkeypatch, WorkloadSpec, "from_marker", calls)
    pytester.makepyfile(MATRIX_FILE)
    result = pytester.runpytest_inprocess(TCG, "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert calls == {"spec.spec_from_kwargs": 1, "PerfSpec.from_marker": 1,
                     "WorkloadSpec.from_marker": 1}, calls


def test_plan_is_frozen(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import dataclasses
        import pytest
        from pytest_virtio.plugin.hooks import plan_of

        @pytest.mark.vm(smp=2)
        def test_frozen(request):
            plan = plan_of(request.node)
            with pytest.raises(dataclasses.FrozenInstanceError):
                plan.scope = "session"
            assert plan.machine.smp == 2 and plan.matrix is None and plan.perfs == ()
        """
    )
    pytester.runpytest_inprocess(TCG).assert_outcomes(passed=1)

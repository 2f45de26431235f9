"""The ``workload`` marker run for one test: rounds, the paired reference guest,
mechanism counts, and the records and relative checks it files.

Why its own module: it is the one data path from a guest's fio/dd/iperf3 run to
the report (Measurement -> Record -> SessionResults), so it is typed end to end
here instead of passing ``Any`` through the fixtures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.measure import Measurement, count_mechanism, device_of, measure
from pytest_virtio.plugin.state import MEASURED_KEY, RESULTS_KEY, SETTINGS_KEY, plan_of
from pytest_virtio.results.metrics import MECHANISM
from pytest_virtio.results.records import Record, RelativeCheck, Role
from pytest_virtio.results.render import junit_properties
from pytest_virtio.workloads.mechanism import Mechanism

__all__ = ["record_measurement", "record_of", "run_marked_workload", "with_mechanism"]

MakeGuest = Callable[..., Guest]


def run_marked_workload(node: pytest.Item, g: Guest, choice: Mapping[str, str] | None,
                        make_guest: MakeGuest) -> None:
    """``@pytest.mark.workload``: run it now (before the body), file the result.

    Called by the guest fixture rather than a fixture of its own so a test that
    never asks for ``workload`` still gets measured; the result goes to the item
    (for the ``workload`` fixture and the perf check) and to the session's report.

    With ``perf(rounds=N)`` (or ``--virtio-perf-rounds``) the workload runs N
    times and every round is its own record (a sample).  A matrix item with a
    relative promise then also boots its reference device's guest and
    alternates rounds between the two (A, ref, A, ref, ...): both devices see
    the same host load, so a load swing moves both samples, not the ratio.
    """
    plan = plan_of(node)
    spec, perfs = plan.workload, plan.perfs
    if spec is None:
        return
    rounds = plan.rounds(node.config.stash[SETTINGS_KEY].perf_rounds)
    device = device_of(g, spec)
    # Timed promises only: counted (mechanism) metrics do not move with load.
    references = sorted({ref for p in perfs if (ref := p.reference_for(device))
                         and p.by_for(g.accel) is not None and p.metric not in MECHANISM})
    partners: list[Guest] = []
    if rounds > 1 and choice and references:
        axis = "nic" if spec.kind == "iperf3" else "disk"
        partners = [make_guest(plan.machine_for({**choice, axis: ref}), name=f"ref-{ref}")
                    for ref in references]
    results = node.config.stash[RESULTS_KEY]
    pair = node.nodeid if partners else None
    tags: dict[str, int] = {}
    if rounds > 1:
        tags["rounds"] = rounds
    records: list[tuple[int, Record]] = []  # (guest index, record) in the order measured
    for index in range(rounds):
        if rounds > 1:
            tags["round"] = index + 1
        measured = measure(g, spec)
        node.stash[MEASURED_KEY] = measured
        record, checks = record_measurement(node, g.accel, measured)
        records.append((0, dataclasses.replace(
            record, extra={**record.extra, **tags}, pair=pair)))
        if index == 0:
            results.checks.extend(checks)
        for number, partner in enumerate(partners, start=1):
            paired = record_of(node, partner.accel, measure(partner, spec))
            records.append((number, dataclasses.replace(
                paired, extra={**paired.extra, **tags}, pair=pair, role=Role.REFERENCE)))
    # Counted after the timed rounds: untraced rounds stay unbiased, and fio's binary
    # is already in the page cache, so the root disk is quiet while traps are counted.
    counted = [count_mechanism(guest, spec) for guest in (g, *partners)]
    results.records.extend(with_mechanism(r, counted[n]) for n, r in records)


def with_mechanism(record: Record, mechanism: Mechanism | None) -> Record:
    """``record`` carrying the counted traps/interrupts/CPU per I/O (None: not counted)."""
    if mechanism is None:
        return record
    return dataclasses.replace(
        record, traps_per_io=mechanism.traps_per_io, irqs_per_io=mechanism.irqs_per_io,
        cpu_us_per_io=mechanism.cpu_us_per_io,
        extra={**record.extra, **mechanism.counts()})


def record_of(node: pytest.Item, accel: str, measured: Measurement) -> Record:
    """The report Record of a measurement of this test (``group``: the test function)."""
    group = f"{node.nodeid.rsplit('::', 1)[0]}::{getattr(node, 'originalname', node.name)}"
    return measured.to_record(node.nodeid, accel, group)


def record_measurement(node: pytest.Item, accel: str, measured: Measurement
                       ) -> tuple[Record, list[RelativeCheck]]:
    """The report Record and the relative perf checks (one per ``perf`` mark with a
    ``faster_than`` for this device) of a measurement; the record's figures also
    become junit properties of the test."""
    record = record_of(node, accel, measured)
    node.user_properties.extend(junit_properties(record))
    checks = []
    for spec in plan_of(node).perfs:
        reference, by = spec.reference_for(record.device), spec.by_for(accel)
        if reference is not None and by is not None:
            checks.append(RelativeCheck(node.nodeid, record.group, record.device,
                                        record.workload, accel, reference, by, spec.metric,
                                        record.machine))
    return record, checks

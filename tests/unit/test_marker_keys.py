"""One marker grammar: every marker's unknown key reads the same, and marked jobs are typed."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.measure import MARKED_DISK, FioJobfile, WorkloadSpec, run_workload
from pytest_virtio.guests.settings import Settings
from pytest_virtio.keywords import check_keys
from pytest_virtio.plugin.plan import build_plan
from pytest_virtio.workloads.dd import DdJob
from pytest_virtio.workloads.fio import FioJob
from pytest_virtio.workloads.iperf import IperfJob


class Node:
    """Marks as pytest gives them to ``build_plan``: by name, closest first."""

    def __init__(self, **marks: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        self.marks = {name: SimpleNamespace(name=name, args=args, kwargs=kwargs)
                      for name, (args, kwargs) in marks.items()}

    def iter_markers(self, name: str | None = None) -> Iterator[SimpleNamespace]:
        return iter([m for n, m in self.marks.items() if name in (None, n)])

    def get_closest_marker(self, name: str) -> SimpleNamespace | None:
        return self.marks.get(name)


FIO = (("fio",), {})


@pytest.mark.parametrize(("marks", "where", "listed"), [
    ({"vm": ((), {"bogus": 1})}, "@pytest.mark.vm", "'memory'"),
    ({"vm": ((), {"disks": [{"bus": "ide", "bogus": 1}]})}, "@pytest.mark.vm: disks[0]",
     "'bus'"),
    ({"vm": ((), {"devices": [{"kind": "rng", "bogus": 1}]})},
     "@pytest.mark.vm: devices[0] (rng)", "'transport'"),
    ({"workload": (("fio",), {"bogus": 1})}, '@pytest.mark.workload("fio")', "'iodepth'"),
    ({"workload": (("fio",), {"jobfile": "[j]\n", "bogus": 1})},
     '@pytest.mark.workload("fio")', "'jobfile', 'label'"),
    ({"workload": (("dd",), {"bogus": 1})}, '@pytest.mark.workload("dd")', "'direction'"),
    ({"workload": (("iperf3",), {"bogus": 1})}, '@pytest.mark.workload("iperf3")',
     "'reverse'"),
    ({"workload": FIO, "perf": ((), {"bogus": 1})}, "@pytest.mark.perf", "'faster_than'"),
    ({"workload": FIO, "perf": ((), {"min_iops": {"bogus": 1}})},
     "@pytest.mark.perf(min_iops=...)", "'kvm', 'tcg'"),
    ({"expect_drivers": (("virtio_blk",), {"bogus": 1})}, "@pytest.mark.expect_drivers",
     "'absent'"),
])
def test_every_marker_names_an_unknown_key_the_same_way(
        marks: dict[str, Any], where: str, listed: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_plan(Node(**marks), Settings())
    message = str(info.value)
    assert re.fullmatch(re.escape(where) + r": unknown key 'bogus' \(allowed: '.+'\)", message)
    assert listed in message


def test_several_unknown_keys_are_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        check_keys("@pytest.mark.x", {"b": 1, "a": 2, "ok": 3}, ("ok",))
    assert str(info.value) == "@pytest.mark.x: unknown keys 'a', 'b' (allowed: 'ok')"
    check_keys("@pytest.mark.x", {"ok": 1}, ("ok",))


def test_marked_jobs_are_typed_once() -> None:
    fio = WorkloadSpec.from_marker(("fio",), {"disk": "data", "bs": "64k", "timeout": 30})
    assert fio == WorkloadSpec("data", FioJob(MARKED_DISK, bs="64k", runtime="5s",
                                              time_based=True), timeout=30.0)
    assert fio.kind == "fio" and fio.name == "randread 64K qd16"
    dd = WorkloadSpec.from_marker(("dd",), {"bs": "4k", "count": 8, "direction": "read"})
    assert dd.job == DdJob(direction="read", bs=4096, count=8) and dd.kind == "dd"
    assert dd.name == "dd read 4K"
    net = WorkloadSpec.from_marker(("iperf3",), {"seconds": 2, "reverse": True})
    assert net == WorkloadSpec("net0", IperfJob(seconds=2.0, reverse=True))
    text = "[j]\nfilename=${DISK}\nrw=read\n"
    jobfile = WorkloadSpec.from_marker(("fio",), {"jobfile": text, "label": "mine"})
    assert jobfile.job == FioJobfile(text, "mine") and jobfile.name == "mine"
    assert "fio --output-format=json -" in jobfile.job.command  # type: ignore[union-attr]
    # Hashable, so equal markers are one job (dicts in options used to forbid that).
    assert len({fio, WorkloadSpec.from_marker(("fio",), {"disk": "data", "bs": "64k",
                                                         "timeout": 30})}) == 1


@pytest.mark.parametrize(("args", "kwargs", "text"), [
    (("dd",), {"bs": 0}, "dd: bs=0"),
    (("dd",), {"count": "many"}, "dd: count='many'"),
    (("iperf3",), {"seconds": "3"}, "iperf3: seconds='3'"),
    (("fio",), {"timeout": "5s"}, "timeout=...): '5s'"),
    (("fio",), {"jobfile": 3}, "jobfile must be the text"),
])
def test_bad_job_values_fail_at_collection(args: tuple[Any, ...], kwargs: dict[str, Any],
                                           text: str) -> None:
    with pytest.raises(ConfigError, match=r"^@pytest\.mark\.workload") as info:
        WorkloadSpec.from_marker(args, kwargs)
    assert text in str(info.value)


class JobGuest:
    """A guest that records the typed jobs it is asked to run."""

    timeout_scale = 1.0

    def __init__(self) -> None:
        self.spec = SimpleNamespace(disks=[SimpleNamespace(name="disk0", bus="virtio-blk")])
        self.ran: list[Any] = []

    def disk_path(self, name: str) -> str:
        return "/dev/vdb"

    def default_timeout(self) -> float:
        return 30.0

    def fio(self, device: FioJob, timeout: float | None = None) -> Any:
        self.ran.append((device, timeout))
        raise ConfigError("stop here")  # the job is what this test checks

    def dd(self, src: str, dst: str, **kw: Any) -> Any:
        self.ran.append((src, dst, kw))
        return SimpleNamespace(seconds=2.0, bw=1.0)


def test_the_guest_runs_the_validated_job_on_the_marked_disk() -> None:
    guest = JobGuest()
    spec = WorkloadSpec.from_marker(("fio",), {"rw": "write", "timeout": 9})
    with pytest.raises(ConfigError, match="stop here"):
        run_workload(guest, spec)  # type: ignore[arg-type]
    assert guest.ran == [(dataclasses.replace(spec.job, filename="/dev/vdb"), 9.0)]
    dd = run_workload(guest, WorkloadSpec.from_marker(("dd",), {"count": 4}))  # type: ignore[arg-type]
    assert guest.ran[-1] == ("/dev/zero", "/dev/vdb",
                             {"bs": 1 << 20, "count": 4, "timeout": None, "oflag": "direct"})
    assert dd.ios == 4 and dd.iops == 2.0

"""``@pytest.mark.workload(...)``: validate it at collection, run it on a guest.

The only module under ``workloads/`` that does I/O: it asks the guest to run the
command the pure builders produce (fio, dd, iperf3) and, for iperf3, starts the
host-side server.  The result comes back as a :class:`Measurement` — the
workload's own result object plus the few numbers the report, the baselines and
the ``perf`` marker use — so every consumer reads one shape whatever ran.

Marker forms::

    workload("fio", disk="disk0", rw="randread", bs="4k", iodepth=16, runtime="5s")
    workload("fio", disk="disk0", jobfile="[j]\\nfilename=${DISK}\\nrw=read\\n...")
    workload("dd", disk="disk0", direction="write", bs="1M", count=64)
    workload("iperf3", nic="net0", seconds=3, reverse=False)

The disk is named as in ``@pytest.mark.vm`` (found in the guest by serial) and
the *device* a result is filed under is that disk's bus (or the NIC's model), so
the rows of a ``virtio_matrix`` line up by device in the table and the chart.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pytest_virtio import ids
from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.guests.nethost import NicHost, host_of
from pytest_virtio.keywords import check_keys
from pytest_virtio.results.baseline import machine_id
from pytest_virtio.results.records import Record
from pytest_virtio.spec.model import MachineSpec
from pytest_virtio.starvation import schedstat
from pytest_virtio.units import format_size, parse_size
from pytest_virtio.workloads import dd as dd_mod
from pytest_virtio.workloads import fio as fio_mod
from pytest_virtio.workloads import iperf as iperf_mod
from pytest_virtio.workloads.iperf_server import host_iperf3_server
from pytest_virtio.workloads.mechanism import (
    PLANS,
    BackendLike,
    BackendWindow,
    MachineLike,
    Mechanism,
    TraceWindow,
    with_pins,
)

__all__ = [
    "KINDS", "MARKER_KEYS", "CountableGuest", "GuestLike", "Measurement", "WorkloadSpec",
    "count_mechanism", "device_of", "measure", "run_workload",
]

MARKER = "workload"
KINDS = ("fio", "dd", "iperf3")
#: Defaults that make a bare ``workload("fio")`` a short, comparable benchmark.
FIO_DEFAULTS: Mapping[str, Any] = {
    "rw": "randread", "bs": "4k", "iodepth": 16, "runtime": "5s", "time_based": True,
}
_FIO_FIELDS = tuple(f for f in fio_mod.FioJob.__dataclass_fields__ if f != "filename")
#: Every key the marker takes, per kind (``pytest --markers`` lists these).
MARKER_KEYS: Mapping[str, tuple[str, ...]] = {
    "fio": ("disk", *_FIO_FIELDS, "jobfile", "label", "timeout"),
    "dd": ("disk", *dd_mod.DdJob.__dataclass_fields__, "timeout"),
    "iperf3": ("nic", *iperf_mod.IperfJob.__dataclass_fields__, "timeout"),
}
#: The keys of ``workload("fio", jobfile=...)``: the job file says everything else.
JOBFILE_KEYS = ("disk", "jobfile", "label", "timeout")
#: The filename of a marked fio job until it runs: the marked disk's device is known
#: only in the guest (:func:`_run_fio` puts it in), as ``${DISK}`` in a job file.
MARKED_DISK = "${DISK}"


class GuestLike(Protocol):
    """What a workload needs from :class:`pytest_virtio.guests.guest.Guest`."""

    spec: MachineSpec
    timeout_scale: float

    @property
    def nets(self) -> Mapping[str, NicHost]:
        """Each NIC's host side (where the iperf3 server runs), by NIC name."""
        ...

    def default_timeout(self) -> float: ...
    def disk_path(self, name: str) -> str: ...
    def fio(self, device: str | fio_mod.FioJob | None = None, *, jobfile: str | None = None,
            timeout: float | None = None, **job: Any) -> fio_mod.FioResult: ...
    def dd(self, source: str, dest: str, *, bs: str | int = ..., count: int | None = ...,
           iflag: str | None = ..., oflag: str | None = ..., conv: str | None = ...,
           timeout: float | None = ...) -> dd_mod.DdResult: ...
    def run(self, cmd: str, timeout: float | None = None, via: str = ...) -> Result: ...
    def nic_interface(self, name: str) -> str: ...


class QemuLike(MachineLike, Protocol):
    """The QEMU of a guest, as counting and timing a workload use it: QMP and HMP for
    trace events, the process id for schedstat (None: not running)."""

    @property
    def pid(self) -> int | None: ...


class CountableGuest(GuestLike, Protocol):
    """A guest whose workload can be timed and counted: its QEMU, the vhost-user
    backends we serve in-process (by disk name) and its run directory (trace log)."""

    @property
    def machine(self) -> QemuLike: ...
    @property
    def backends(self) -> Mapping[str, BackendLike]: ...
    @property
    def run_dir(self) -> Path: ...


def _where(key: str | None = None) -> str:
    return f"@pytest.mark.{MARKER}" + (f"({key}=...)" if key else "")


@dataclass(frozen=True)
class FioJobfile:
    """``workload("fio", jobfile=...)``: a fio job file (``${DISK}`` in it is the marked
    disk's device) and its report name; the command is built, and so checked, once."""

    text: str
    label: str | None = None
    command: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ConfigError(f"jobfile must be the text of a fio job file, got {self.text!r}")
        if self.label is not None:
            object.__setattr__(self, "label", str(self.label))
        object.__setattr__(self, "command", fio_mod.fio_jobfile_shell(self.text))


#: A marked workload's job, typed: what ran is what was validated at collection.
Job = fio_mod.FioJob | FioJobfile | dd_mod.DdJob | iperf_mod.IperfJob


@dataclass(frozen=True)
class WorkloadSpec:
    """A validated ``workload`` marker: the job, what it runs on, its time limit."""

    #: The disk (fio, dd) or NIC (iperf3) named in ``@pytest.mark.vm``.
    target: str
    job: Job
    #: Seconds the guest command may take (None: the runner's default for the job).
    timeout: float | None = None

    @property
    def kind(self) -> str:
        """The marker's first argument: ``fio``, ``dd`` or ``iperf3``."""
        if isinstance(self.job, dd_mod.DdJob):
            return "dd"
        if isinstance(self.job, iperf_mod.IperfJob):
            return "iperf3"
        return "fio"

    @classmethod
    def from_marker(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> WorkloadSpec:
        """Validate everything a guest is not needed for; errors name marker and key."""
        if len(args) != 1 or args[0] not in KINDS:
            raise ConfigError(
                f"{_where()}: first argument must be the workload kind, one of "
                f"{', '.join(KINDS)}; got {args!r}"
            )
        kind = str(args[0])
        opts = dict(kwargs)
        jobfile = kind == "fio" and "jobfile" in opts
        check_keys(f'{_where()}("{kind}")', opts, JOBFILE_KEYS if jobfile else MARKER_KEYS[kind])
        axis = "nic" if kind == "iperf3" else "disk"
        target = _name(opts.pop(axis, f"{'net' if axis == 'nic' else axis}0"), axis)
        timeout = _timeout(opts.pop("timeout", None))
        where = _where("jobfile" if jobfile else None)
        try:
            job = _JOBS[kind](opts)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except TypeError as exc:  # a wrongly typed value (e.g. extra=3)
            raise ConfigError(f"{where}: {exc}") from None
        return cls(target, job, timeout)

    def counting(self) -> WorkloadSpec:
        """The same job, at most ~1 s long: the pass that counts traps and interrupts.

        Counting runs apart from the timed rounds because tracing has a cost per
        event (a log write per register access), and that cost grows with the very
        traps it counts: traced rounds would slow IDE more than virtio and bias the
        throughput comparison.  Counts per I/O do not depend on the run's length.
        """
        job = self.job
        if isinstance(job, fio_mod.FioJob) and job.time_based and job.runtime is not None:
            if fio_mod.runtime_ns(job.runtime) > 1_000_000_000:
                job = dataclasses.replace(job, runtime="1s")
        elif isinstance(job, iperf_mod.IperfJob):
            job = dataclasses.replace(job, seconds=min(job.seconds, 1.0))
        return dataclasses.replace(self, job=job)

    @property
    def name(self) -> str:
        """The workload column of the report, e.g. ``randread 4k qd16``.

        Short and made of the options that change the numbers, so two tests
        running the same job share a row label (and a chart group).
        """
        job = self.job
        if isinstance(job, FioJobfile):
            return job.label or "fio jobfile"
        if isinstance(job, fio_mod.FioJob):
            return f"{job.rw} {_short_size(parse_size(job.bs))} qd{job.iodepth}"
        if isinstance(job, dd_mod.DdJob):
            return f"dd {job.direction} {_short_size(job.bs)}"
        return f"iperf3 tcp {'host→guest' if job.reverse else 'guest→host'}"


def _short_size(num_bytes: int) -> str:
    return format_size(num_bytes).replace(" ", "").replace("iB", "")


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(key)}: {value!r} must be the {key} name from @pytest.mark.vm")
    return value


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{_where('timeout')}: {value!r} must be a positive number of seconds")
    return float(value)


def _fio_job(opts: dict[str, Any]) -> fio_mod.FioJob | FioJobfile:
    """A fio job from FioJob fields over :data:`FIO_DEFAULTS`, or a job file."""
    if "jobfile" in opts:
        return FioJobfile(opts["jobfile"], opts.get("label"))
    return fio_mod.FioJob(filename=MARKED_DISK, **{**FIO_DEFAULTS, **opts})


_JOBS: Mapping[str, Callable[[dict[str, Any]], Job]] = {
    "fio": _fio_job,
    "dd": lambda opts: dd_mod.DdJob(**opts),
    "iperf3": lambda opts: iperf_mod.IperfJob(**opts),
}


# --- running ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What a workload produced: its own result plus the report's numbers."""

    device: str
    workload: str
    kind: str
    result: fio_mod.FioResult | dd_mod.DdResult | iperf_mod.NetResult
    iops: float
    bw: float
    lat_p99_ns: float | None = None
    extra: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)
    #: The workload's own count of I/Os (fio ios, dd blocks, packets for iperf3).
    ios: int = 0
    #: How starved QEMU was while it ran (see :func:`measure`; None: not measured).
    cpu_starved: float | None = None

    def to_record(self, test_id: str, accel: str, group: str) -> Record:
        """The report's view: ``group`` (the test function) lets relative perf checks
        find the other matrix items of the same test; ``kind`` picks the chart panel.
        Mechanism counts come from a separate traced run (see marked_workload)."""
        return Record(test_id, self.device, self.workload, accel, machine_id(),
                      iops=self.iops, bw=self.bw, lat_p99_ns=self.lat_p99_ns,
                      extra=dict(self.extra), kind=self.kind, sequential=self.sequential,
                      group=group, cpu_starved=self.cpu_starved)

    @property
    def sequential(self) -> bool:
        """Streaming I/O (judged by bandwidth in the chart): what the job says, not its label."""
        if self.kind == "dd":
            return True
        if isinstance(self.result, fio_mod.FioResult):
            modes = {j.options.get("rw", "") for j in self.result.jobs}
            return bool(modes) and not any("rand" in m for m in modes)
        return False


def device_of(guest: GuestLike, spec: WorkloadSpec) -> str:
    """The bus of the named disk / model of the named NIC: the report's device column."""
    devices = ({n.name: n.model for n in guest.spec.nics} if spec.kind == "iperf3"
               else {d.name: d.bus for d in guest.spec.disks})
    if spec.target in devices:
        return str(devices[spec.target])
    what = "nic" if spec.kind == "iperf3" else "disk"
    have = ", ".join(devices) or "none"
    raise ConfigError(
        f"{_where(what)}: this guest has no {what} named {spec.target!r} (it has: {have}); "
        "name one from @pytest.mark.vm"
    )


def run_workload(guest: GuestLike, spec: WorkloadSpec) -> Measurement:
    """Run ``spec`` on ``guest``; WorkloadError (with the program's stderr) if it failed."""
    device = device_of(guest, spec)
    job = spec.job
    if isinstance(job, dd_mod.DdJob):
        return _run_dd(guest, spec, device, job)
    if isinstance(job, iperf_mod.IperfJob):
        return _run_iperf3(guest, spec, device, job)
    return _run_fio(guest, spec, device, job)


class _Window(Protocol):
    def __enter__(self) -> object: ...
    def __exit__(self, *exc: object) -> None: ...
    def mechanism(self, ios: int) -> Mechanism: ...


class _QemuWindow(TraceWindow):
    def mechanism(self, ios: int) -> Mechanism:
        traps, irqs = self.counts(ios)
        return Mechanism(ios, traps, irqs, source="qemu-trace")


def mechanism_window(guest: CountableGuest, spec: WorkloadSpec, device: str
                     ) -> _Window | None:
    """Where the traps of ``device`` are counted: our backend's counters for a disk we
    serve, else QEMU's trace events for a device with a plan (None: not countable)."""
    backend = guest.backends.get(spec.target)
    if backend is not None and spec.kind != "iperf3":
        return BackendWindow(backend)
    plan = PLANS.get(device)
    if plan is None:
        return None
    if plan.intx:
        plan = with_pins(plan, _pci_irqs(guest.machine, _pci_function(spec, device)))
    return _QemuWindow(guest.machine, plan, guest.run_dir / "trace.log")


def _pci_function(spec: WorkloadSpec, device: str) -> str:
    """The qdev id of the PCI function that raises ``spec``'s interrupts: the NIC
    itself, or the controller its disk hangs off."""
    if spec.kind == "iperf3":
        return ids.nic_device_id(spec.target)
    if device == "lsi":
        return ids.LSI_CONTROLLER
    raise ConfigError(f"no PCI function known for the interrupts of a {device} disk")


def _pci_irqs(machine: MachineLike, qdev_id: str) -> set[int]:
    """The legacy interrupt line QEMU routes a PCI device's INTx to (``query-pci``)."""
    pins: set[int] = set()
    for bus in _objects(machine.qmp("query-pci")):
        for dev in _objects(bus.get("devices")):
            if dev.get("qdev_id") == qdev_id and isinstance(irq := dev.get("irq"), int):
                pins.add(irq)
    return pins


def _objects(value: object) -> list[Mapping[str, object]]:
    """The JSON objects of a QMP reply's list (anything else in it is skipped)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def count_mechanism(guest: CountableGuest, spec: WorkloadSpec) -> Mechanism | None:
    """Traps, interrupts and backend CPU per I/O of ``spec`` on ``guest``, from one short
    traced run (:meth:`WorkloadSpec.counting`); None when the device is not countable."""
    window = mechanism_window(guest, spec, device_of(guest, spec))
    if window is None:
        return None
    with window:
        measured = run_workload(guest, spec.counting())
    return window.mechanism(measured.ios)


def measure(guest: CountableGuest, spec: WorkloadSpec) -> Measurement:
    """:func:`run_workload`, untraced (mechanism counts: :func:`count_mechanism`).

    Also records how starved QEMU was: the share of its runnable time spent waiting
    for a CPU (:attr:`Measurement.cpu_starved`).  A timed comparison of two guests that
    the host could not run is about the host, not the devices (see perf.STARVED_LIMIT).
    """
    pid = guest.machine.pid
    before = schedstat(pid) if pid is not None else None
    measured = run_workload(guest, spec)
    if before is None or pid is None:
        return measured
    ran, waited = (b - a for a, b in zip(before, schedstat(pid), strict=True))
    if ran + waited <= 0:
        return measured
    return dataclasses.replace(measured, cpu_starved=round(waited / (ran + waited), 3))


def _run_fio(guest: GuestLike, spec: WorkloadSpec, device: str,
             job: fio_mod.FioJob | FioJobfile) -> Measurement:
    path = guest.disk_path(spec.target)
    if isinstance(job, FioJobfile):
        # fio expands ${DISK} in job files from the environment.
        cmd = f"export DISK={shlex.quote(path)}; {job.command}"
        t = spec.timeout or guest.default_timeout() * 4
        res = guest.run(cmd, timeout=t)
        result = fio_mod.check_fio_run(res.rc, res.stdout, res.stderr)
    else:
        result = guest.fio(dataclasses.replace(job, filename=path), timeout=spec.timeout)
    return Measurement(
        device, spec.name, "fio", result, iops=result.iops, bw=result.bw,
        lat_p99_ns=result.lat_p99_ns,
        extra={"lat_mean_ns": result.lat_mean_ns, "guest_device": path},
        ios=result.read.total_ios + result.write.total_ios,
    )


def _run_dd(guest: GuestLike, spec: WorkloadSpec, device: str,
            job: dd_mod.DdJob) -> Measurement:
    path = guest.disk_path(spec.target)
    if job.direction == "write":
        src, dst, flags = "/dev/zero", path, {"oflag": "direct"}
    else:
        src, dst, flags = path, "/dev/null", {"iflag": "direct"}
    result = guest.dd(src, dst, bs=job.bs, count=job.count, timeout=spec.timeout, **flags)
    ios = job.count / result.seconds if result.seconds > 0 else 0.0
    return Measurement(device, spec.name, "dd", result, iops=ios, bw=result.bw,
                       extra={"guest_device": path}, ios=job.count)


def _run_iperf3(guest: GuestLike, spec: WorkloadSpec, device: str,
                job: iperf_mod.IperfJob) -> Measurement:
    seconds = job.seconds
    packets = _packets_shell(guest, spec.target)
    before = _packets(guest, packets)
    with host_iperf3_server(host_of(guest.nets, guest.spec, spec.target).server_place()) as port:
        gateway = iperf_mod.GUEST_GATEWAY
        cmd = iperf_mod.iperf3_client_shell(gateway, port, seconds, job.reverse)
        t = spec.timeout or guest.default_timeout() + seconds * 3
        res = guest.run(cmd, timeout=t)
    after = _packets(guest, packets)
    if res.rc != 0 and "{" not in res.stdout:
        raise WorkloadError(
            f"iperf3 in the guest exited with status {res.rc} (is the NIC up?)\n"
            f"--- iperf3 output ---\n{(res.stdout + res.stderr).strip()[-2000:]}"
        )
    result = iperf_mod.parse_iperf3_json(res.stdout)
    return Measurement(
        device, spec.name, "net", result, iops=0.0, bw=result.bits_per_second / 8,
        extra={"bits_per_second": result.bits_per_second, "retransmits": result.retransmits},
        ios=max(0, after - before),
    )


def _packets_shell(guest: GuestLike, nic: str) -> str:
    """The guest command printing the NIC's rx+tx packet counters: a network "I/O" is
    a packet."""
    stats = f"/sys/class/net/{guest.nic_interface(nic)}/statistics"
    return f"echo $(( $(cat {stats}/rx_packets) + $(cat {stats}/tx_packets) ))"


def _packets(guest: GuestLike, cmd: str) -> int:
    out = guest.run(cmd).stdout.strip()
    return int(out) if out.isdigit() else 0



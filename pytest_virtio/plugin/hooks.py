"""pytest hooks, and only hooks: options, markers, header, collection, reports.

Settings are resolved once at configure time and kept in the config stash;
marker arguments are validated at collection so a typo is a collection error
naming the marker and the key, not a failure minutes into a boot.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from pytest_virtio import interrupts
from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import BackendError, ConfigError, VirtioError
from pytest_virtio.guests import measure as workload_mod
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import OPTIONS, Settings, resolve_values
from pytest_virtio.guests.sharing import SCOPES
from pytest_virtio.plugin import splat_check, tracebacks
from pytest_virtio.plugin.plan import build_plan
from pytest_virtio.plugin.state import (
    FINISH_KEY,
    GUESTS_KEY,
    OUTCOME_KEY,
    PLANS_KEY,
    REPORTS_KEY,
    RESULTS_KEY,
    SESSION_KEY,
    SETTINGS_KEY,
    SIGTERM_KEY,
    USES_GUEST_KEY,
    artifacts_dir,
    plan_of,
)
from pytest_virtio.results import finish as results_mod
from pytest_virtio.results import perf as perf_mod
from pytest_virtio.results.records import Role, SessionResults


def _keys(keys: tuple[str, ...] | list[str], fmt: str = "{}=") -> str:
    return ", ".join(fmt.format(k) for k in keys)


def _marker_docs() -> dict[str, str]:
    """``pytest --markers`` text, built from the tables the validators use.

    Why generated: a hand-written line drifts (``vm`` once lacked
    ``initramfs_modules`` and ``extra_args``); these are the keys that pass.
    """
    items = "; ".join(f"{kind}: {_keys(keys, '{}')}"
                      for kind, keys in spec_mod.item_keys().items())
    workload = "; ".join(
        f"{kind}: {_keys(keys)}" for kind, keys in workload_mod.MARKER_KEYS.items()
    )
    return {
        "vm": f"vm({_keys(spec_mod.SPEC_KEYS)}, scope=): the machine the `guest` fixture "
        f"boots for this test; scope={'|'.join(SCOPES)} shares one guest per machine shape "
        f"among those tests. disks=/nics=/devices= items are a bus, model or kind name, or "
        f"a dict of — {items}.",
        "virtio_matrix": f"virtio_matrix({_keys(spec_mod.MATRIX_AXES, '{}=[...]')}): run the "
        "test once per device choice, ids like [disk=ahci-nic=e1000]; the choice is the "
        "`virtio_choice` fixture.",
        "expect_drivers": "expect_drivers(*names, absent=[...]): after boot, fail unless these "
        "guest drivers are bound/loaded (built-ins count) and the absent ones are not.",
        "workload": f"workload(kind, ...): run a workload in the guest before the test body; "
        f"its result is the `workload` fixture. Keys per kind — {workload}.",
        "splats": "splats(allow=[patterns], expect=[patterns]): kernel splats this test "
        "tolerates, and those it must cause; each a regular expression searched in a splat's "
        "report (others fail the test unless --virtio-splats=off).",
        "perf": f"perf({_keys(perf_mod.PERF_KEYS)}): assert the workload's figures; "
        "per-accelerator values as {'kvm': .., 'tcg': ..}; metric= one of "
        f"{', '.join(perf_mod.METRICS)}; stack several perf marks for several promises.",
    }


MARKERS = _marker_docs()

pytest_plugins = ["pytest_virtio.plugin.fixtures", "pytest_virtio.plugin.crash_check"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("virtio", "pytest-virtio: QEMU guests and virtio devices")
    for opt in OPTIONS:
        # argparse %-formats help text: a literal '%' (as in 'iops:10%') must be doubled.
        text = f"{opt.help} (ini {opt.ini}, env {opt.env})".replace("%", "%%")
        names, how = opt.cli()
        group.addoption(*names, default=None, help=text, **how)
        parser.addini(opt.ini, help=opt.help, default=None)


def _getini(config: pytest.Config, name: str) -> Any:
    """Ini values; a relative ``virtio_image`` recipe path is relative to the ini file."""
    value = config.getini(name)
    if name == "virtio_image" and value and config.inipath is not None:
        return str(config.inipath.parent / Path(value).expanduser())
    return value


def _log_trail(config: pytest.Config) -> None:
    """Let our INFO records (QMP traffic, launches, boots) reach pytest's log capture.

    pytest shows a failed test's captured log by itself, but the root logger
    passes only WARNING and up unless ``log_level`` is set; our package logger
    at INFO makes the trail show without it.  A level the user set wins.
    """
    logger = logging.getLogger("pytest_virtio")
    user_level = any(config.getoption(name, None) or config.getini(name)
                     for name in ("log_level", "log_cli_level"))
    if logger.level == logging.NOTSET and not user_level:
        logger.setLevel(logging.INFO)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _log_trail(config)
    try:
        settings = Settings.from_values(resolve_values(config.getoption,
                                                       lambda name: _getini(config, name)))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = settings
    config.stash[REPORTS_KEY] = {}
    config.stash[RESULTS_KEY] = SessionResults()
    config.stash[OUTCOME_KEY] = []
    progress = terminal_progress(config)
    session = VirtioSession(settings, progress)
    config.stash[SESSION_KEY] = session
    # Also at interpreter exit: an interrupted xdist worker whose controller is
    # gone fails in pytest_sessionfinish (cannot send) and never unconfigures.
    atexit.register(session.close)
    install_signal_handling(config)


def terminal_progress(config: pytest.Config) -> Callable[[str], None]:
    """Where session progress (an image build, a wait for another worker's) is shown.

    The terminal reporter is looked up per message: it registers after this
    plugin's ``pytest_configure``, so a lookup there found none and a first-run
    image build sat silent for minutes.  Capture is suspended for the line, as
    live logging does.  An xdist worker's terminal is not shown: it writes to its
    stderr, which xdist passes through to the user's terminal, naming itself.
    """
    # Not $PYTEST_XDIST_WORKER: a pytest run started from inside a worker inherits it.
    worker = getattr(config, "workerinput", {}).get("workerid")

    def progress(msg: str) -> None:
        capman = config.pluginmanager.get_plugin("capturemanager")
        suspended = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        with suspended:
            if worker is not None or reporter is None:
                prefix = f"pytest-virtio [{worker}]" if worker else "pytest-virtio"
                sys.stderr.write(f"{prefix}: {msg}\n")
                sys.stderr.flush()
            else:
                reporter.write_line(f"pytest-virtio: {msg}")

    return progress


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        atexit.unregister(session.close)
        try:
            session.close()
        except BackendError as exc:  # a guest no fixture closed: too late to fail a test
            sys.stderr.write(f"pytest-virtio: at session end: {exc}\n")
    previous = config.stash.get(SIGTERM_KEY, None)
    if previous is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def install_signal_handling(config: pytest.Config) -> None:
    """Turn SIGTERM into a clean teardown; make an xdist worker die with its controller."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = interrupts.install_sigterm_handler()
    if previous is not None:
        config.stash[SIGTERM_KEY] = previous
    if hasattr(config, "workerinput"):
        interrupts.term_with_parent()
    else:
        config.pluginmanager.register(ControllerInterrupts(config), "pytest_virtio_interrupts")


class ControllerInterrupts:
    """On an xdist controller, pass an interrupt on to the workers.

    A SIGTERM or SIGINT sent to the controller alone would otherwise reach the
    workers only when xdist kills them ten seconds later (see :mod:`.interrupts`).
    Whether this process is a controller is asked when the interrupt comes:
    xdist registers its ``dsession`` plugin after our ``pytest_configure``.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        if self.config.pluginmanager.has_plugin("dsession"):
            interrupts.forward_to_children()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """QEMU version, accelerator (with the probe's verdict) and image."""
    session = config.stash[SESSION_KEY]
    try:
        choice = session.accel()
        return [
            f"virtio: QEMU {session.qemu_version()} ({session.qemu}), accel {choice.accel} "
            f"— {choice.note}, image {session.image().key}"
        ]
    except VirtioError as exc:
        return [f"virtio: guests unavailable: {str(exc).splitlines()[0]}"]


class BadMarkers(pytest.Collector):
    """Stands in for a test whose markers are invalid: collecting it raises their error.

    Why a node of its own: raising from ``pytest_generate_tests`` aborts the
    whole module, so only the first bad test of a file was reported; as one
    failing collector per test, pytest lists every one (as it does for files).
    """

    def __init__(self, *, error: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        raise self.CollectError(self.error)


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Turn one test's marker error into its own collection error (see BadMarkers)."""
    try:
        return (yield)
    except pytest.Collector.CollectError as exc:
        if not getattr(exc, "virtio_markers", False):
            raise
        return BadMarkers.from_parent(collector, name=name, error=str(exc.args[0]))


def _marker_error(message: str) -> pytest.Collector.CollectError:
    error = pytest.Collector.CollectError(message)
    error.virtio_markers = True  # type: ignore[attr-defined]
    return error


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    try:
        plan = build_plan(definition, metafunc.config.stash[SETTINGS_KEY])
    except ConfigError as exc:
        raise _marker_error(f"{definition.nodeid}: {exc}") from None
    metafunc.config.stash.setdefault(PLANS_KEY, {})[definition.nodeid] = plan
    if plan.matrix is not None:
        if "virtio_choice" not in metafunc.fixturenames:
            raise _marker_error(
                f"{metafunc.definition.nodeid}: @pytest.mark.virtio_matrix needs the "
                "`guest` fixture (or `virtio_choice`)"
            )
        metafunc.parametrize(
            "virtio_choice", [dict(m.choice) for m in plan.matrix],
            ids=[m.id for m in plan.matrix],
            indirect=True,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Shorten reports of our own errors; remember each phase's report for artifacts."""
    report = yield
    if call.excinfo is not None and report.failed:
        concise = tracebacks.concise_longrepr(item, call.excinfo)
        if concise is not None:
            report.longrepr = concise
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    kept = artifacts_dir(item)
    if report.failed and report.when == "call" and item.stash.get(USES_GUEST_KEY, False):
        settings = item.config.stash[SETTINGS_KEY]
        if settings.keep != "never":
            report.sections.append(("pytest-virtio artifacts", str(kept)))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After the body, the kernel splats its guests logged (:mod:`.splat_check`); after
    a passing body, the absolute ``perf`` thresholds fail the test's call phase."""
    try:
        result = yield
    except BaseException as exc:
        verdict = _splats(item, exc)
        if verdict and isinstance(exc, pytest.skip.Exception):
            raise pytest.fail.Exception(verdict.message(), pytrace=False) from exc
        if verdict:  # shown with the failure (a note would be lost with pytrace=False)
            item.add_report_section("call", "kernel splats", verdict.message())
        raise
    verdict = _splats(item, None)
    if verdict:
        pytest.fail(verdict.message(), pytrace=False)
    records = [r for r in item.config.stash[RESULTS_KEY].records
               if r.test_id == item.nodeid and r.role is not Role.REFERENCE]
    failures = [line for perf in plan_of(item).perfs if records
                for line in results_mod.absolute_failures(perf, records)]
    policy = item.config.stash[SETTINGS_KEY].perf_inconclusive
    if failures and policy == "pass" and results_mod.starvation(records) is not None:
        # Timed on a host that did not let QEMU run: not a verdict on the device.
        warnings.warn(PerfInconclusiveWarning(
            "performance thresholds not judged (inconclusive):\n  " + "\n  ".join(failures)),
            stacklevel=1)
    elif failures:
        pytest.fail("performance below threshold:\n  " + "\n  ".join(failures),
                    pytrace=False)
    return result


def _splats(item: pytest.Item, exc: BaseException | None) -> splat_check.Verdict | None:
    """The splats of the guests this test used (None: not looked), never masking ``exc``.

    The guests are let go here: the item keeps no closed guest until the session ends."""
    guests = item.stash.get(GUESTS_KEY, [])
    item.stash[GUESTS_KEY] = []
    if (not guests or item.config.stash[SETTINGS_KEY].splats == "off"
            or not splat_check.worth_a_look(exc)):
        return None
    try:
        return splat_check.judge(guests, plan_of(item).splats)
    except Exception as err:
        if exc is None:
            raise
        exc.add_note(f"(kernel splats not checked: {err!r})")
        return None


class PerfInconclusiveWarning(pytest.PytestWarning):
    """Absolute ``perf`` thresholds missed while QEMU was starved of CPU (see
    perf.STARVED_LIMIT); ``--virtio-perf-inconclusive=fail`` fails the test instead."""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Workers ship their results; the controller (or a plain run) judges and writes them."""
    config = session.config
    results = config.stash.get(RESULTS_KEY, None)
    if results is None:
        return
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["pytest_virtio"] = results.to_dict()
        return
    done = results_mod.finish(results, config.stash[SETTINGS_KEY])
    config.stash[OUTCOME_KEY] = list(done.lines)
    config.stash[FINISH_KEY] = done
    if done.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: merge a finished worker's results into the session's."""
    data = getattr(node, "workeroutput", {}).get("pytest_virtio")
    if data:
        node.config.stash[RESULTS_KEY].merge_dict(data)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The results table, then relative-perf and baseline verdicts and written files."""
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or (not results.records and not results.crash
                           and not config.stash.get(OUTCOME_KEY, [])):
        return
    terminalreporter.section("pytest-virtio results")
    outcome: list[str] = config.stash.get(OUTCOME_KEY, [])
    for line in results_mod.summary_lines(results, outcome):
        terminalreporter.write_line(line)
    done = config.stash.get(FINISH_KEY, None)
    if done is not None:
        # Entries in the reporter's stats appear in pytest's last line, so a session
        # failed by a relative check says why instead of "2 passed".
        for what, count in done.stats().items():
            terminalreporter.stats.setdefault(what, []).extend([what] * count)

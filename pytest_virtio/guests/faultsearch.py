"""Fault schedules that search themselves (issue 28 item 5).

``search_faults(trial, max_faults=2, types=("write",), max_ordinal=8)`` asks
"does ``trial`` hold under every schedule of at most two I/O errors on the
first eight writes?"  Hypothesis draws schedules (:class:`~pytest_virtio.
vhost_user.faultschedule.Schedule`), ``trial(schedule)`` arms one on a disk
(``with armed(disk.faults, schedule): ...``), runs the guest-side program
and asserts its property; when a schedule breaks it, Hypothesis shrinks it to
a minimal one (fewest faults, then earliest requests), which the report
prints in text form and which replays by seed or by ``Schedule.parse``.

A trial's AssertionError is a counterexample; any other exception (a guest
that stopped answering, a broken queue) ends the search and propagates: a
broken guest is not a counterexample.  Each distinct schedule runs once per
search (Hypothesis revisits schedules while shrinking; a guest trial costs
seconds), so the search's verdicts are as repeatable as the trial.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from pytest_virtio.errors import ConfigError, VirtioError
from pytest_virtio.vhost_user.faultschedule import Fault, FaultKind, RequestType, Schedule

__all__ = ["FaultScheduleFailed", "FaultSearchReport", "TrialResult", "schedules",
           "search_faults"]

log = logging.getLogger(__name__)

Trial = Callable[[Schedule], object]


class FaultScheduleFailed(VirtioError):
    """A fault schedule broke the trial's property: the message names the minimal one."""

    def __init__(self, message: str, schedule: Schedule, seed: int) -> None:
        super().__init__(message)
        self.schedule = schedule
        self.seed = seed


@dataclass(frozen=True)
class TrialResult:
    """One schedule tried: ``failure`` is the trial's AssertionError text, or None."""

    schedule: Schedule
    failure: str | None

    @property
    def failed(self) -> bool:
        return self.failure is not None


@dataclass(frozen=True)
class FaultSearchReport:
    """What a search tried and the minimal failing schedule it found (None: none failed)."""

    seed: int
    trials: tuple[TrialResult, ...]
    minimal: Schedule | None
    message: str

    @property
    def failed(self) -> bool:
        return self.minimal is not None

    def summary(self) -> str:
        head = f"{len(self.trials)} fault schedule(s) tried (seed {self.seed})"
        if self.minimal is None:
            return f"{head}, none broke the property"
        failing = sum(t.failed for t in self.trials)
        return (f"{head}, {failing} broke the property; minimal: {self.minimal} "
                f"({len(self.minimal)} fault(s)): {self.message}\n"
                f"replay it: trial(Schedule.parse({str(self.minimal)!r})), or search again "
                f"with seed={self.seed}")

    def raise_on_failure(self) -> None:
        """:class:`FaultScheduleFailed` with :meth:`summary` if a schedule broke the property."""
        if self.minimal is not None:
            raise FaultScheduleFailed(self.summary(), self.minimal, self.seed)


def schedules(*, max_faults: int = 2, types: Iterable[RequestType | str] = ("write", "flush"),
              max_ordinal: int = 8, delays: Iterable[float] = ()) -> st.SearchStrategy[Schedule]:
    """Schedules of up to ``max_faults`` faults on the first ``max_ordinal`` requests
    of each of ``types``; each an I/O error, or (if ``delays`` are given) one of those
    delays.  Shrinks towards fewer faults, the first type listed, earlier requests,
    I/O errors."""
    kinds = _kinds(delays)
    request_types = [_request_type(t) for t in types]
    if not request_types:
        raise ConfigError("fault search: types=() leaves no request to fail; name at least one "
                          f"of {', '.join(t.value for t in RequestType)}")
    if max_faults < 0 or max_ordinal < 1:
        raise ConfigError(f"fault search: needs max_faults >= 0 and max_ordinal >= 1, got "
                          f"max_faults={max_faults}, max_ordinal={max_ordinal}")
    fault = st.builds(
        lambda request, ordinal, kind: Fault(request, ordinal, *kind),
        st.sampled_from(request_types), st.integers(1, max_ordinal), st.sampled_from(kinds))
    return st.lists(fault, max_size=max_faults, unique=True).map(lambda fs: Schedule(tuple(fs)))


def _request_type(name: RequestType | str) -> RequestType:
    try:
        return RequestType(name)
    except ValueError:
        raise ConfigError(f"fault search: unknown request type {name!r}; one of "
                          f"{', '.join(t.value for t in RequestType)}") from None


def _kinds(delays: Iterable[float]) -> list[tuple[FaultKind, float]]:
    kinds = [(FaultKind.IOERR, 0.0)]
    for seconds in delays:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"fault search: delays are seconds > 0, got {seconds!r}")
        kinds.append((FaultKind.DELAY, float(seconds)))
    return kinds


class _TrialBroke(BaseException):
    """Carries a trial's own error out of Hypothesis, which would shrink an Exception."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _Trials:
    """Runs each distinct schedule once, logs it, and keeps its verdict."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial
        self.verdicts: dict[Schedule, TrialResult] = {}

    def fails(self, schedule: Schedule) -> bool:
        known = self.verdicts.get(schedule)
        if known is None:
            known = self.verdicts[schedule] = self._run(schedule)
        return known.failed

    def _run(self, schedule: Schedule) -> TrialResult:
        n = len(self.verdicts) + 1
        try:
            self.trial(schedule)
        except AssertionError as exc:
            log.info("fault search trial %d: %s broke the property: %s", n, schedule,
                     _one_line(exc))
            return TrialResult(schedule, _one_line(exc))
        except Exception as exc:
            log.info("fault search trial %d: %s ended the search: %r", n, schedule, exc)
            raise _TrialBroke(exc) from None
        log.info("fault search trial %d: %s held", n, schedule)
        return TrialResult(schedule, None)


def _one_line(exc: AssertionError) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def search_faults(trial: Trial, *, max_faults: int = 2,
                  types: Iterable[RequestType | str] = ("write", "flush"),
                  max_ordinal: int = 8, delays: Iterable[float] = (), examples: int = 20,
                  seed: int = 0) -> FaultSearchReport:
    """Search schedules of up to ``max_faults`` faults for one that fails ``trial``.

    ``trial(schedule)`` arms the schedule itself (``with armed(injector,
    schedule):`` around the program, after any preparation of its own, since
    ordinals count from arming) and raises AssertionError when the property
    fails.  At most ``examples`` schedules are drawn, plus the shrinking of a
    failing one; the same seed draws the same schedules.  Any other exception
    from ``trial`` ends the search and propagates.
    """
    trials = _Trials(trial)
    strategy = schedules(max_faults=max_faults, types=types, max_ordinal=max_ordinal,
                         delays=delays)
    # Every setting that moves the draws or costs trials is ours, not a profile's.
    config = settings(database=None, max_examples=examples, deadline=None, derandomize=False,
                      phases=(Phase.generate, Phase.shrink),
                      suppress_health_check=list(HealthCheck))
    minimal: Schedule | None = None
    broken: BaseException | None = None
    try:
        minimal = find(strategy, trials.fails, settings=config, random=random.Random(seed))
    except NoSuchExample:
        pass
    except _TrialBroke as broke:
        broken = broke.error
    if broken is not None:  # raised here, out of the handler: its own chain stays as it was
        raise broken
    tried = tuple(trials.verdicts.values())
    message = "" if minimal is None else trials.verdicts[minimal].failure or ""
    report = FaultSearchReport(seed, tried, minimal, message)
    log.info("fault search: %s", report.summary().splitlines()[0])
    return report

"""Crash-state counts of a session (issue 28 item 4): plain data from the tests to the
summary and the JSON.

Why its own record type and not a :class:`~pytest_virtio.results.records.Record`:
a crash check measures no throughput; what a reader of the session wants is how
many states were generated, checked and failed per test and disk, and where the
first failure's image and ``reproduce.sh`` are.  Like a Record, it travels from
an xdist worker to the controller as a dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields

from pytest_virtio.errors import ConfigError

__all__ = ["CrashCount", "crash_lines"]


@dataclass(frozen=True)
class CrashCount:
    """One crash check of one logged disk in one test."""

    test_id: str
    disk: str
    seed: int
    generated: int
    checked: int
    failed: int
    seconds: float
    #: ``StateVerdict.describe()`` of the first failed state; None when none failed.
    first_failure: str | None = None
    #: The kept image of that state and the script that boots a guest on it.
    kept_image: str | None = None
    reproducer: str | None = None

    def to_dict(self) -> dict[str, str | int | float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CrashCount:
        """Inverse of :meth:`to_dict`; a field missing or of the wrong type is a ConfigError."""
        values: dict[str, object] = {}
        for f in fields(cls):
            value = data.get(f.name)
            allowed = _TYPES[f.name]
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise ConfigError(f"crash count {dict(data)!r}: field {f.name!r} is "
                                  f"{value!r}, not {' or '.join(t.__name__ for t in allowed)}")
            values[f.name] = value
        return cls(**values)  # type: ignore[arg-type]

    def line(self) -> str:
        head = (f"{self.test_id} disk {self.disk!r}: {self.generated} generated, "
                f"{self.checked} checked, {self.failed} failed (seed {self.seed}, "
                f"{self.seconds:.1f}s)")
        if self.first_failure is None:
            return head
        return f"{head}\n    first failure: {self.first_failure}\n    reproduce: {self.reproducer}"


_NONE = type(None)
_TYPES: dict[str, tuple[type, ...]] = {
    "test_id": (str,), "disk": (str,), "seed": (int,), "generated": (int,), "checked": (int,),
    "failed": (int,), "seconds": (int, float), "first_failure": (str, _NONE),
    "kept_image": (str, _NONE), "reproducer": (str, _NONE),
}


def crash_lines(counts: Iterable[CrashCount]) -> list[str]:
    """The summary's crash section: a total line, then one line per check (sorted)."""
    ordered = sorted(counts, key=lambda c: (c.test_id, c.disk))
    if not ordered:
        return []
    total = (f"crash states: {sum(c.generated for c in ordered)} generated, "
             f"{sum(c.checked for c in ordered)} checked, "
             f"{sum(c.failed for c in ordered)} failed in {len(ordered)} check(s)")
    return [total, *(c.line() for c in ordered)]

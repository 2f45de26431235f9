"""Guests shared by the tests of a class, module or session: ``vm(scope=...)``.

Why a marker key rather than a new fixture: pytest users already say how long
a thing lives with a fixture's ``scope=``; ``@pytest.mark.vm(scope="module")``
reads the same way, keeps the ``guest`` fixture the one thing a test asks for,
and works on a module's ``pytestmark`` or a class.  One pool per scope holds
the guests by machine shape; the pool is a fixture of that scope, so pytest
itself decides when the last test of the module (class, session) is done and
tears the guests down — the session's reaper still covers a killed run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import ConfigError, VirtioError
from pytest_virtio.guests import provision
from pytest_virtio.guests.guest import Guest

#: The values ``vm(scope=...)`` takes; "function" (the default) boots per test.
SCOPES = ("function", "class", "module", "session")

Boot = Callable[[spec_mod.MachineSpec, str], Guest]


def split_scope(kwargs: Mapping[str, Any], where: str = "vm") -> tuple[str, dict[str, Any]]:
    """``(scope, the other keys)`` of a ``vm`` marker; a bad scope names marker and key."""
    rest = dict(kwargs)
    scope = rest.pop("scope", "function")
    if scope not in SCOPES:
        raise ConfigError(f"@pytest.mark.{where}: scope={scope!r} is not one of "
                          f"{', '.join(SCOPES)}")
    return scope, rest


def pool_fixture_name(scope: str) -> str:
    """The fixture that holds the shared guests of ``scope``."""
    return f"_virtio_{scope}_guests"


class SharedGuests:
    """The live shared guests of one scope instance, one per machine shape.

    A guest that died (a test panicked or powered it off) is replaced by a
    fresh boot for the next test that asks, so one broken test does not fail
    the rest of the module for a reason of its own.
    """

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._guests: dict[spec_mod.MachineSpec, Guest] = {}

    def get(self, spec: spec_mod.MachineSpec, boot: Boot) -> Guest:
        guest = self._guests.get(spec)
        if guest is not None and not guest.machine.is_running():
            self._discard(spec)
            guest = None
        if guest is None:
            guest = boot(spec, f"{self.scope}-guest{len(self._guests)}")
            self._guests[spec] = guest
        return guest

    def _discard(self, spec: spec_mod.MachineSpec) -> None:
        guest = self._guests.pop(spec)
        with contextlib.suppress(VirtioError, OSError):
            guest.close()

    def close(self) -> list[Guest]:
        """Shut every guest down (soft, then hard); returns them for bookkeeping."""
        closed = list(self._guests.values())
        for spec in list(self._guests):
            self._discard(spec)
        return closed


@dataclass(frozen=True, slots=True)
class Shared:
    """Strategy: ``pool``'s live guest of the shape, else one ``inner`` reaches (named
    by the pool, kept in it for the next test of the scope)."""

    pool: SharedGuests
    inner: provision.Strategy

    def provide(self, spec: spec_mod.MachineSpec, name: str) -> Guest:
        return self.pool.get(spec, lambda s, n: provision.reach(self.inner, s, n))


__all__ = ["SCOPES", "Shared", "SharedGuests", "pool_fixture_name", "split_scope"]

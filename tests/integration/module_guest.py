"""A guest shared by one test module (boots are expensive under TCG)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pytest_virtio.guest import Guest
from pytest_virtio.session import VirtioSession
from pytest_virtio.spec import MachineSpec


@contextlib.contextmanager
def module_guest(session: VirtioSession, spec: MachineSpec, name: str) -> Iterator[Guest]:
    """Boot ``spec``; afterwards shut it down and raise its backends' errors,
    as ``make_guest`` does for a test's own guests."""
    g = session.boot(spec, name=name)
    try:
        yield g
    finally:
        g.close()
        if g in session.guests:
            session.guests.remove(g)
    g.raise_backend_errors()

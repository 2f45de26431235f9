"""After a test body: the kernel splats its guests logged fail it (issue 26 item 1).

Each guest the test used is asked for the kernel records logged since its last look
(:class:`~pytest_virtio.guests.kernel_log.KernelLog`), so on a shared guest a splat
is charged to the test during which it was logged.  ``@pytest.mark.splats(allow=,
expect=)`` tolerates or demands splats by pattern; ``--virtio-splats=off`` skips
the look.  The look happens whether the body passed or failed: a failed body's
error gets the splats as a note, and the cursor moves on either way, so the next
test on a shared guest is not charged for them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import pytest

from pytest_virtio.channels.splats import Splat
from pytest_virtio.errors import ChannelError, GuestPanic, GuestTimeout, VirtioError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.plugin.plan import SplatPolicy

__all__ = ["SplatsNotChecked", "Verdict", "judge", "look", "worth_a_look"]

log = logging.getLogger(__name__)


class SplatsNotChecked(pytest.PytestWarning):
    """A guest's kernel log could not be read after the test (the guest was lost or
    paused): its splats were not checked, which is said rather than passed over."""


#: The look's own command budget, as a share of the guest's default command timeout:
#: a wedged guest must not hold every failing test for a whole timeout more.
LOOK_SHARE = 0.25


def look(guests: Sequence[Guest]) -> list[tuple[str, Splat]]:
    """(guest name, splat) for each splat the running ``guests`` logged since the last look."""
    found: list[tuple[str, Splat]] = []
    for guest in {id(g): g for g in guests}.values():  # a guest taken twice is read once
        if not guest.machine.is_running():
            continue  # powered off or killed by the test: nothing to read
        try:
            budget = guest.default_timeout() * LOOK_SHARE
            found += [(guest.name, s) for s in guest.kernel_log.new_splats(budget)]
        except VirtioError as exc:
            warnings.warn(SplatsNotChecked(
                f"kernel splats not checked on guest {guest.name!r}: {str(exc).splitlines()[0]}"),
                stacklevel=1)
    return found


class Verdict:
    """What the splats found mean for the test under its ``splats`` marker."""

    def __init__(self, found: list[tuple[str, Splat]], policy: SplatPolicy) -> None:
        self.unexpected = [(g, s) for g, s in found
                           if not any(s.matches(p) for p in (*policy.allow, *policy.expect))]
        self.missing = [p.pattern for p in policy.expect
                        if not any(s.matches(p) for _, s in found)]

    def message(self) -> str:
        parts = []
        for guest, splat in self.unexpected:
            parts.append(f"kernel splat ({splat.kind}) on guest {guest!r}:\n{splat.report}")
        for pattern in self.missing:
            parts.append(f"expected kernel splat matching {pattern!r} was not logged")
        return "\n\n".join(parts)

    def __bool__(self) -> bool:
        return bool(self.unexpected or self.missing)


def judge(guests: Sequence[Guest], policy: SplatPolicy) -> Verdict:
    """Look at ``guests`` and judge what they logged."""
    return Verdict(look(guests), policy)


def worth_a_look(exc: BaseException | None) -> bool:
    """Whether to read the guests' logs after a body that raised ``exc``.

    Not after an interrupt or ``pytest.exit`` (the user wants out now), nor after
    the guest itself stopped answering (a timeout, a lost shell, a panic): the look
    would only wait again on the same guest.  After any other error, yes: a splat
    may be why it failed."""
    if exc is None:
        return True
    if isinstance(exc, KeyboardInterrupt | SystemExit | pytest.exit.Exception):
        return False
    return not isinstance(exc, GuestTimeout | GuestPanic | ChannelError)
